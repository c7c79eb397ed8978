"""Reliability of the server (issue 19, items 14-16): the adapter bank stays consistent through
failed changes, no request can stall the event loop, and loading by path reads nothing it will
refuse and tells the client nothing about paths it will not load.

| item | case | expected | observed before the fix |
|---|---|---|---|
| 14 | replace an adapter whose old directory is gone with a broken one | CheckpointError naming the new path; the old adapter serves on; bank and model hold the same names | the error named the old path; the name stayed in the bank, not in the model |
| 14 | LRU eviction after that failed replace | the old adapter is evicted, the others load | every load that had to evict it failed (AdapterError: no adapter 'extra') |
| 14 | the same over HTTP | 400 for the replace, then 200 for every adapter | 400 for the replaced name and for every request needing an eviction |
| 14 | a lazy load that fails while the bank is full | evicts nothing | evicted the least recently used adapter first |
| 14 | an adapter deleted from the model behind the bank's back | reloaded on next use; eviction skips the delete | AdapterError on use and on eviction |
| 15 | three 10 MB prompts at once while /health is polled (real uvicorn) | every /health within 0.5 s; the prompts 413 (Content-Length) | /health waited 15-25 s: the prompts were read and tokenized on the event loop |
| 15 | a 10 MB chunked body | 413 once the count passes the limit | read whole, then tokenized on the event loop |
| 15 | two prompts just under the body limit (~1 MB each) | tokenized in a worker thread: /health within 0.5 s; 413 from the token limit | /health waited ~1.3 s |
| 15 | `peftlab serve --max-body-bytes 0` | exit 2 naming the option | no such option |
| 16 | POST /v1/adapters of a directory holding a 538 MB (sparse) tensors file | 400 in < 1 s, the file never read | the 538 MB were read before the refusal |
| 16 | `max_adapter_bytes` one byte below an adapter's tensors file; `--max-adapter-bytes 0` | CheckpointError naming size and limit; exit 2 | no such setting |
| 16 | a missing path, a file, an empty directory, a FIFO for the tensors, a broken or foreign adapter | one identical message; the detail in the server log | "does not exist", "is a file", "is not an adapter directory", ... with the path |
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from fastapi.testclient import TestClient

# The bank tests' four saved LoRAs with their logits, and the server tests' tiny Llama with
# MiniLM's tokenizer, its saved adapters and reference answers (fixtures; skip marks included).
from test_bank import adapters, outputs, save_random_lora  # noqa: F401
from test_serve import (  # noqa: F401
    LIMIT,
    PROMPTS,
    clients,
    lm_adapters,
    lm_client,
    pytestmark,
    reference,
    tiny_lm,
    tok,
)

import peftlab
from peftlab.apps.cli import main
from peftlab.apps.serve import Engine, create_app
from peftlab.core.bank import AdapterBank
from peftlab.core.errors import CheckpointError
from peftlab.core.io import CONFIG_FILE, TENSORS_FILE

uvicorn = pytest.importorskip("uvicorn")

BIG = 10 * 2**20                 # the hostile prompts: 10 MB each
HEALTH_WITHIN_S = 0.5


# ---- helpers --------------------------------------------------------------------------------------
def server_broken_copy(source: Path, target: Path) -> Path:
    """A copy of adapter `source` whose tensors file is truncated to 16 zero bytes."""
    shutil.copytree(source, target)
    (target / TENSORS_FILE).write_bytes(b"\0" * 16)
    return target


def server_engine(tok, root: Path, **kwargs) -> Engine:
    am = peftlab.adapt(tiny_lm(tok))
    return Engine(am, tok, AdapterBank(am, root, max_adapters=2), model_name="tiny",
                  max_new_tokens=LIMIT, max_input_tokens=60, **kwargs)


@contextmanager
def server_uvicorn(app) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port (in a thread); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def server_flood(url: str, bodies: list) -> tuple[list[float], list[httpx.Response]]:
    """POST every body to /v1/generate at once (bytes: with Content-Length; an iterator of
    chunks: chunked) while polling /health; (every /health latency in s, the responses)."""
    responses: list = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            responses[i] = client.post(f"{url}/v1/generate", content=bodies[i],
                                       headers={"content-type": "application/json"})

    senders = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    latencies = []
    with httpx.Client(timeout=120) as client:
        assert client.get(f"{url}/health").status_code == 200
        for t in senders:
            t.start()
        while any(t.is_alive() for t in senders) or len(latencies) < 5:
            started = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    for t in senders:
        t.join()
    return latencies, responses


def server_prompt_body(n_bytes: int) -> bytes:
    """A generate body of about `n_bytes` bytes: a prompt of repeated words."""
    return json.dumps({"prompt": "word " * (n_bytes // 5)}).encode()


def server_read_bytes() -> int | None:
    """Bytes this process has read through system calls so far (Linux), or None."""
    try:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])
    except (OSError, KeyError, ValueError):
        return None


# ---- item 14: a failed replace leaves the bank consistent -----------------------------------------
def server_failed_replace(bank: AdapterBank, root: Path, tmp_path: Path) -> Path:
    """Load `extra` from a copy of alpha, delete that copy (so the old adapter cannot be loaded
    from disk again), then replace it with a broken adapter and with one made for another model:
    both must fail naming the new path, with alpha still serving as `extra`."""
    old = tmp_path / "old"
    shutil.copytree(root / "alpha", old)
    bank.load("extra", old)
    shutil.rmtree(old)
    broken = server_broken_copy(root / "beta", tmp_path / "broken")
    foreign = save_random_lora(peftlab.adapt(tiny_gpt2()), tmp_path / "foreign", "g", 0)
    for new, why in ((broken, "truncated or corrupted"), (foreign, "foreign")):
        with pytest.raises(CheckpointError, match=why) as e:
            bank.load("extra", new, replace=True)
        assert str(new) in str(e.value) and str(old) not in str(e.value), e.value
    return old


def test_item_14_failed_replace_keeps_the_old_adapter(adapters, ids, tmp_path):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    server_failed_replace(bank, root, tmp_path)
    assert bank.loaded() == ["extra"] and set(bank.am.adapters) == {"extra"}
    assert torch.allclose(outputs(bank, "extra", ids), expected["alpha"], atol=1e-6)
    assert bank.loads == 1   # the attempts loaded nothing under the served name


def test_item_14_lru_eviction_keeps_working_after_a_failed_replace(adapters, ids, tmp_path):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    old = server_failed_replace(bank, root, tmp_path)
    for name in ("beta", "gamma", "delta", "beta"):   # extra is the least recently used: evicted first
        assert torch.allclose(outputs(bank, name, ids), expected[name], atol=1e-6)
        assert set(bank.loaded()) == set(bank.am.adapters)
    assert bank.loaded() == ["delta", "beta"] and bank.evictions == 3
    # extra's directory is gone: asking for it now is an error naming that directory, and it
    # evicts nothing
    with pytest.raises(CheckpointError, match=str(old)):
        outputs(bank, "extra", ids)
    assert bank.loaded() == ["delta", "beta"] and set(bank.am.adapters) == {"delta", "beta"}


def test_item_14_server_keeps_serving_after_a_failed_replace(tok, lm_adapters, reference, clients, tmp_path):
    client = lm_client(clients, tok, lm_adapters, max_adapters=2, allow_load_from=[tmp_path])
    shutil.copytree(lm_adapters / "alpha", tmp_path / "old")
    assert client.post("/v1/adapters", json={"name": "extra", "path": str(tmp_path / "old")}).status_code == 200
    shutil.rmtree(tmp_path / "old")
    broken = server_broken_copy(lm_adapters / "beta", tmp_path / "broken")
    r = client.post("/v1/adapters", json={"name": "extra", "path": str(broken), "replace": True})
    assert r.status_code == 400, r.text
    for adapter, same_as in (("extra", "alpha"), ("beta", "beta"), ("gamma", "gamma"), (None, None)):
        r = client.post("/v1/generate", json={"prompt": PROMPTS[0], "adapter": adapter})
        assert r.status_code == 200 and r.json()["text"] == reference(same_as, PROMPTS[0])[0], r.text
    assert client.get("/health").json()["loaded"] == ["beta", "gamma"]


def test_item_14_a_failed_load_evicts_nothing(adapters, ids):
    root, _ = adapters
    server_broken_copy(root / "beta", root / "broken")
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    outputs(bank, "alpha", ids)
    outputs(bank, "gamma", ids)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        outputs(bank, "broken", ids)
    assert bank.loaded() == ["alpha", "gamma"] and set(bank.am.adapters) == {"alpha", "gamma"}
    assert bank.evictions == 0 and bank.loads == 2


def test_item_14_an_adapter_deleted_behind_the_banks_back_is_reloaded(adapters, ids):
    root, expected = adapters
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapters=2)
    outputs(bank, "alpha", ids)
    outputs(bank, "beta", ids)
    bank.am.delete_adapter("alpha")                  # the model no longer holds it; the bank did
    assert torch.allclose(outputs(bank, "alpha", ids), expected["alpha"], atol=1e-6)
    bank.am.delete_adapter("beta")                   # now the least recently used
    assert torch.allclose(outputs(bank, "gamma", ids), expected["gamma"], atol=1e-6)
    assert bank.loaded() == ["alpha", "gamma"] and set(bank.am.adapters) == {"alpha", "gamma"}


# ---- item 15: nothing blocks the event loop; the work per request is bounded ----------------------
def test_item_15_big_prompts_get_413_while_health_answers(tok, lm_adapters):
    app = create_app(server_engine(tok, lm_adapters))
    body = server_prompt_body(BIG)
    chunked = iter([body[i: i + 2**16] for i in range(0, len(body), 2**16)])
    with server_uvicorn(app) as url:
        latencies, responses = server_flood(url, [body, body, body])
        assert max(latencies) < HEALTH_WITHIN_S, f"/health took up to {max(latencies):.2f} s"
        for r in responses:
            assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"], r.text[:300]
            assert f"{len(body):,} bytes" in r.json()["detail"]
        latencies, (r,) = server_flood(url, [chunked])
        assert max(latencies) < HEALTH_WITHIN_S and r.status_code == 413, r.text[:300]
        assert "more than 1,048,576 bytes" in r.json()["detail"]
        # the server still answers as before
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/generate", json={"prompt": PROMPTS[0]})
            assert r.status_code == 200 and r.json()["tokens"] == min(16, LIMIT)


def test_item_15_prompts_are_tokenized_off_the_event_loop(tok, lm_adapters):
    app = create_app(server_engine(tok, lm_adapters))
    body = server_prompt_body(2**20 - 100)              # just under the default body limit
    with server_uvicorn(app) as url:
        latencies, responses = server_flood(url, [body, body])
    assert max(latencies) < HEALTH_WITHIN_S, f"/health took up to {max(latencies):.2f} s"
    for r in responses:   # the token limit, checked after tokenizing
        assert r.status_code == 413 and "this server takes at most 60" in r.json()["detail"], r.text[:300]


def test_item_15_the_body_limit_is_configurable(tok, lm_adapters, clients, capsys):
    small = clients.enter_context(TestClient(create_app(server_engine(tok, lm_adapters), max_body_bytes=64)))
    r = small.post("/v1/generate", json={"prompt": "word " * 20})
    assert r.status_code == 413 and "at most 64 bytes" in r.json()["detail"]
    assert small.post("/v1/generate", json={"prompt": "hi"}).status_code == 200
    assert main(["serve", "--model", "smollm2", "--adapters", ".", "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes must be >= 1, got 0" in capsys.readouterr().err


# ---- item 16: loading by path ---------------------------------------------------------------------
def test_item_16_a_huge_tensors_file_is_refused_unread(tok, lm_adapters, clients, tmp_path, caplog):
    client = lm_client(clients, tok, lm_adapters, allow_load_from=[tmp_path])
    huge = tmp_path / "huge"
    shutil.copytree(lm_adapters / "alpha", huge)
    with open(huge / TENSORS_FILE, "r+b") as f:   # sparse: costs no disk
        f.truncate(538_000_000)
    before, started = server_read_bytes(), time.perf_counter()
    r = client.post("/v1/adapters", json={"name": "huge", "path": str(huge)})
    seconds, after = time.perf_counter() - started, server_read_bytes()
    assert r.status_code == 400 and seconds < 1.0, (r.status_code, seconds)
    if before is not None:
        assert after - before < 2**20, f"read {after - before:,} bytes"
    assert client.get("/health").json()["loaded"] == []
    # the log says why: the tiny model's default limit is the 64 MiB floor
    assert "is 538,000,000 bytes, above this bank's limit of 67,108,864" in caplog.text


def test_item_16_the_adapter_size_limit_is_configurable(adapters, tmp_path, capsys):
    root, _ = adapters
    size = (root / "alpha" / TENSORS_FILE).stat().st_size
    bank = AdapterBank(peftlab.adapt(tiny_llama()), root, max_adapter_bytes=size - 1)
    with pytest.raises(CheckpointError, match=f"is {size:,} bytes, above this bank's limit of {size - 1:,}"):
        bank.load("alpha")
    assert bank.loaded() == [] and not bank.am.adapters
    AdapterBank(bank.am, root, max_adapter_bytes=size).load("alpha")
    assert main(["serve", "--model", "smollm2", "--adapters", ".", "--max-adapter-bytes", "0"]) == 2
    assert "--max-adapter-bytes must be >= 1, got 0" in capsys.readouterr().err


def test_item_16_one_message_for_every_path_it_will_not_load(tok, lm_adapters, clients, tmp_path, caplog):
    client = lm_client(clients, tok, lm_adapters, allow_load_from=[tmp_path])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "no_tensors").mkdir()
    shutil.copy(lm_adapters / "alpha" / CONFIG_FILE, tmp_path / "no_tensors")
    server_broken_copy(lm_adapters / "beta", tmp_path / "broken")
    save_random_lora(peftlab.adapt(tiny_gpt2()), tmp_path / "foreign", "g", 0)
    shutil.copytree(tmp_path / "no_tensors", tmp_path / "pipe")
    os.mkfifo(tmp_path / "pipe" / TENSORS_FILE)   # reading it would wait for a writer forever
    refused = [tmp_path / "missing", tmp_path / "file.txt", tmp_path / "empty",
               tmp_path / "no_tensors", tmp_path / "pipe", tmp_path / "broken", tmp_path / "foreign"]
    details = set()
    for path in refused:
        r = client.post("/v1/adapters", json={"name": "x", "path": str(path)})
        assert r.status_code == 400, (path, r.text)
        details.add(r.json()["detail"])
    assert len(details) == 1, details
    # paths outside the adapter roots (issue 23): one 403, whether they exist or not
    outside = {client.post("/v1/adapters", json={"name": "x", "path": p}).json()["detail"]
               for p in ("/nonexistent/adapter", "/etc/passwd", "/etc")}
    assert len(outside) == 1 and "only from under its adapter folders" in outside.pop()
    detail = details.pop()
    assert "peftlab.json" in detail and "peft adapter" in detail and "server log" in detail
    # the server's log keeps the reason for each refusal
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in ("does not exist", "is a file", "is not a regular file", "truncated or corrupted",
                   str(tmp_path / "foreign")):
        assert reason in logged, reason
    ok = client.post("/v1/adapters", json={"name": "x", "path": str(lm_adapters / "alpha")})
    assert ok.status_code == 200 and ok.json()["loaded"] == ["x"]

