"""The continuous-batching scheduler on a tiny Llama: requests join and leave the running batch
between decode steps, and every greedy answer equals the request served alone (`am.generate`
of that prompt with that adapter active); max_tokens, EOS, stop tokens, cancel, adapter errors,
stop() and concurrent submitters."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import torch
from test_serve import pytestmark, save_random_adapter, tiny_lm, tok  # noqa: F401

import peftlab
from peftlab.apps.serve import Engine, RequestError
from peftlab.apps.serve.scheduler import (
    Finished,
    GenerationRequest,
    RequestStream,
    Scheduler,
)
from peftlab.core.bank import AdapterBank, UnknownAdapterError

# LoRA on attention, LoRA on the MLP, IA3 (rescaling vectors): different sites and forms
CONFIGS = {
    "attn": lambda: peftlab.LoraConfig(r=4, alpha=32, init="random", targets=["attn.q", "attn.v"]),
    "mlp": lambda: peftlab.LoraConfig(r=4, alpha=32, init="random", targets=["ffn.up", "ffn.down"]),
    "ia3": lambda: peftlab.IA3Config(),
}
ADAPTERS = (None, *CONFIGS)


@pytest.fixture(scope="module")
def adapter_dir(tok, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sched_adapters")
    am = peftlab.adapt(tiny_lm(tok))
    for seed, (name, config) in enumerate(CONFIGS.items()):
        save_random_adapter(am, root / name, name, seed + 10, config())
    return root


@pytest.fixture(scope="module")
def alone(tok, adapter_dir):
    """(adapter, prompt ids, max_tokens) -> the new token ids of a lone greedy am.generate."""
    am = peftlab.adapt(tiny_lm(tok))
    for name in CONFIGS:
        am.load_adapter(adapter_dir / name, name)
    cache: dict = {}

    def answer(adapter: str | None, ids: list[int], max_tokens: int) -> list[int]:
        key = (adapter, tuple(ids), max_tokens)
        if key not in cache:
            am.set_active([] if adapter is None else [adapter])
            x = torch.tensor([ids])
            with torch.no_grad():
                out = am.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
            cache[key] = out[0, x.shape[1]:].tolist()
        return cache[key]
    return answer


def engine_for(tok, root: Path, *, max_adapters: int = 4) -> Engine:
    am = peftlab.adapt(tiny_lm(tok))
    return Engine(am, tok, AdapterBank(am, root, max_adapters=max_adapters), model_name="tiny",
                  max_new_tokens=40, max_input_tokens=60)


@pytest.fixture
def scheduler(tok, adapter_dir):
    made: list[Scheduler] = []

    def make(**kwargs) -> Scheduler:
        s = Scheduler(engine_for(tok, adapter_dir, max_adapters=kwargs.pop("max_adapters", 4)), **kwargs)
        s.start()
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 5000, (n,), generator=g).tolist()


def collect(stream: RequestStream) -> tuple[list[int], Finished]:
    return asyncio.run(stream.collect())


def steps_seen(s: Scheduler, at_least: int) -> None:
    """Wait until the scheduler has run `at_least` decode steps."""
    while s.steps < at_least:
        threading.Event().wait(0.001)


# ---- answers ------------------------------------------------------------------------------------------
def test_requests_joining_at_different_steps_answer_as_served_alone(scheduler, alone):
    s = scheduler()
    plan = [(a, prompt(n, seed), m) for seed, (a, n, m) in enumerate(
        [(None, 5, 30), ("attn", 17, 12), ("mlp", 3, 25), ("ia3", 11, 6), ("attn", 29, 20),
         (None, 8, 3), ("mlp", 21, 17), ("ia3", 2, 9)])]
    streams = []
    for i, (adapter, ids, max_tokens) in enumerate(plan):
        if i:   # each newcomer joins a batch already decoding
            steps_seen(s, s.steps + 2)
        streams.append(s.submit(GenerationRequest(ids, adapter, max_tokens)))
    for (adapter, ids, max_tokens), stream in zip(plan, streams, strict=True):
        tokens, finished = collect(stream)
        assert tokens == alone(adapter, ids, max_tokens), adapter
        assert finished == Finished("length", len(ids), max_tokens)
    assert max(s.admitted) == 1 and s.steps >= 29 and s.step_rows / s.steps > 2   # they ran together
    # the adapters really differ
    assert len({tuple(alone(a, plan[0][1], 8)) for a in ADAPTERS}) == len(ADAPTERS)
    assert s.decoding() == 0 and s._cache is None   # every row left


def test_a_burst_is_prefilled_together_and_streams_tokens(scheduler, alone):
    s = scheduler(max_prefill_tokens=64)
    requests = [GenerationRequest(prompt(3 + 5 * i, 100 + i), ADAPTERS[i % 4], 4 + 3 * i) for i in range(8)]
    streams = [s.submit(r) for r in requests]

    async def read(stream: RequestStream) -> tuple[list[list[int]], Finished]:
        items = [item async for item in stream]
        return items[:-1], items[-1]

    async def read_all():
        return await asyncio.gather(*(read(st) for st in streams))

    for request, (chunks, finished) in zip(requests, asyncio.run(read_all()), strict=True):
        assert all(chunks) and sum(chunks, []) == alone(request.adapter, request.prompt_ids, request.max_tokens)
        assert finished.completion_tokens == request.max_tokens
    # prefill capped at 64 padded tokens: the 8 prompts (3..38 tokens) came in several groups
    assert sum(k * v for k, v in s.admitted.items()) == 8 and max(s.admitted) < 8


def test_eos_and_stop_tokens_end_a_request_and_count(scheduler, alone, tok):
    s = scheduler()
    ids = prompt(9, 7)
    full = alone("attn", ids, 20)
    stop_at = full[5]
    first = full.index(stop_at)
    tokens, finished = collect(s.submit(GenerationRequest(ids, "attn", 20, stop_token_ids=frozenset({stop_at}))))
    assert tokens == full[: first + 1] and finished == Finished("stop", 9, first + 1)
    s.engine.eos_ids = {full[2]}          # as if the model's EOS were this token
    end = full.index(full[2])
    tokens, finished = collect(s.submit(GenerationRequest(ids, "attn", 20)))
    assert tokens == full[: end + 1] and finished.reason == "stop"


def test_seeded_sampling_repeats_alone_and_in_company(scheduler):
    s = scheduler()
    request = GenerationRequest(prompt(6, 3), "mlp", 12, temperature=0.9, top_p=0.9, seed=5)
    alone_tokens, _ = collect(s.submit(request))
    company = [s.submit(GenerationRequest(prompt(4 + i, i), ADAPTERS[i % 4], 10)) for i in range(5)]
    again = s.submit(request)
    other_seed = s.submit(GenerationRequest(request.prompt_ids, "mlp", 12, temperature=0.9, top_p=0.9, seed=6))
    assert collect(again)[0] == alone_tokens and collect(other_seed)[0] != alone_tokens
    for stream in company:
        collect(stream)


# ---- leaving ------------------------------------------------------------------------------------------
def test_cancel_frees_the_row_and_the_others_carry_on(scheduler, alone):
    s = scheduler()
    keep = GenerationRequest(prompt(12, 1), "ia3", 30)
    kept = s.submit(keep)
    doomed = s.submit(GenerationRequest(prompt(40, 2), "attn", 40))
    steps_seen(s, 3)
    assert s.decoding() == 2
    doomed.cancel()
    tokens, finished = collect(doomed)
    assert finished.reason == "cancelled" and 0 < finished.completion_tokens < 40
    steps_seen(s, s.steps + 1)
    # the 40-token prompt's row is gone and the cache is cut to the remaining row's width
    assert s.decoding() in (0, 1) and (s._mask is None or bool(s._mask.all()))
    assert collect(kept)[0] == alone("ia3", keep.prompt_ids, 30)


def test_an_adapter_error_reaches_only_its_requests(tok, adapter_dir, tmp_path, alone):
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dir, root)
    shutil.copytree(root / "attn", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    s = Scheduler(engine_for(tok, root))
    s.start()
    try:
        good = GenerationRequest(prompt(7, 1), "mlp", 15)
        streams = [s.submit(good), s.submit(GenerationRequest(prompt(5, 2), "broken", 5)),
                   s.submit(GenerationRequest(prompt(5, 3), "nope", 5))]
        assert collect(streams[0])[0] == alone("mlp", good.prompt_ids, 15)
        with pytest.raises(Exception, match="truncated or corrupted"):
            collect(streams[1])
        with pytest.raises(UnknownAdapterError):
            collect(streams[2])
        # mid-decode: a running request's adapter is deleted from disk and from the model
        running = s.submit(GenerationRequest(prompt(5, 4), "ia3", 40))
        other = s.submit(GenerationRequest(prompt(6, 5), None, 40))
        steps_seen(s, s.steps + 2)
        with s.bank.using([]):     # between two steps
            shutil.rmtree(root / "ia3")
            s.bank.unload("ia3")
        with pytest.raises(UnknownAdapterError):
            collect(running)
        assert collect(other)[0] == alone(None, prompt(6, 5), 40)
    finally:
        s.stop()


def test_stop_drains_then_refuses(tok, adapter_dir, alone):
    s = Scheduler(engine_for(tok, adapter_dir))
    with pytest.raises(RequestError, match="not running") as e:
        s.submit(GenerationRequest([5, 6], None, 3))
    assert e.value.status == 503
    s.start()
    streams = [s.submit(GenerationRequest(prompt(4 + i, i), ADAPTERS[i % 4], 10 + i)) for i in range(6)]
    s.stop()   # finishes all six first
    for i, stream in enumerate(streams):
        assert stream.done and collect(stream)[0] == alone(ADAPTERS[i % 4], prompt(4 + i, i), 10 + i)
    with pytest.raises(RequestError):
        s.submit(GenerationRequest([5, 6], None, 3))


def test_bank_capacity_makes_newcomers_wait(scheduler, alone):
    s = scheduler(max_adapters=1)
    requests = [GenerationRequest(prompt(5, i), ("attn", "mlp", "attn", None)[i], 6) for i in range(4)]
    streams = [s.submit(r) for r in requests]
    for r, stream in zip(requests, streams, strict=True):
        assert collect(stream)[0] == alone(r.adapter, r.prompt_ids, 6)
    assert s.bank.loaded() in (["attn"], ["mlp"])


# ---- many submitters ----------------------------------------------------------------------------------
def test_submitters_on_many_threads_and_tasks(scheduler, alone):
    s = scheduler(max_running=6)
    results: dict[int, list[int]] = {}
    plan = {i: GenerationRequest(prompt(2 + i % 9, i), ADAPTERS[i % 4], 3 + i % 7) for i in range(24)}

    def worker(indices: list[int]) -> None:
        async def run() -> None:
            streams = {i: s.submit(plan[i]) for i in indices}
            answers = await asyncio.gather(*(st.collect() for st in streams.values()))
            for i, (tokens, _) in zip(streams, answers, strict=True):
                results[i] = tokens
        asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(list(range(k, 24, 4)),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, request in plan.items():
        assert results[i] == alone(request.adapter, request.prompt_ids, request.max_tokens), i
    assert s.step_rows / s.steps > 2


def test_sampling_warps_logits_as_generate_does():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from peftlab.apps.serve.scheduler import warp
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.5), (1.0, 1.0), (0.5, 0.05)):
        scores = 3 * torch.randn(1, 50, generator=g)
        expected = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
        got = warp(scores[0], temperature, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expected[0]))
        assert torch.allclose(got[~torch.isinf(got)], expected[0][~torch.isinf(got)])


def test_requests_the_loop_cannot_take_run_in_static_batches(tok, adapter_dir, tmp_path, alone):
    from peftlab.apps.serve import Batcher
    root = tmp_path / "adapters"
    shutil.copytree(adapter_dir, root)
    am = peftlab.adapt(tiny_lm(tok))
    save_random_adapter(am, root / "soft", "soft", 3, peftlab.PromptTuningConfig(num_virtual_tokens=4))
    for continuous in (True, False):
        engine = engine_for(tok, root)
        batcher = Batcher(engine.run, max_wait_ms=50)
        s = Scheduler(engine, static=batcher.submit, continuous=continuous)
        batcher.start()
        s.start()
        try:
            soft = GenerationRequest(prompt(6, 1), "soft", 12)
            plain = GenerationRequest(prompt(9, 2), "attn", 12)
            first, second = s.submit(soft), s.submit(plain)
            soft_tokens, finished = collect(first)
            assert collect(second)[0] == alone("attn", plain.prompt_ids, 12)
            assert finished == Finished("length", 6, 12) and s.decoding() == 0
            # the soft prompt's answer is the lone generate with that adapter active
            engine.am.set_active(["soft"])
            x = torch.tensor([soft.prompt_ids])
            with torch.no_grad():
                out = engine.am.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
            engine.am.set_active([])
            assert soft_tokens == out[0, x.shape[1]:].tolist()
            # a stop token cuts the static answer too, and counts
            stopped, finished = collect(s.submit(GenerationRequest(soft.prompt_ids, "soft", 12,
                                                                   stop_token_ids=frozenset({soft_tokens[3]}))))
            cut = soft_tokens.index(soft_tokens[3]) + 1
            assert stopped == soft_tokens[:cut] and finished == Finished("stop", 6, cut)
            assert s.steps > 0 if continuous else s.steps == 0
        finally:
            s.stop()
            batcher.stop()


def test_a_failed_step_no_adapter_explains_fails_the_running_requests_and_the_loop_goes_on(scheduler, alone):
    s = scheduler()
    real, fail = s.engine.step, threading.Event()

    def flaky(ids, *args, **kwargs):
        if fail.is_set() and ids.shape[1] == 1:   # a decode step
            fail.clear()
            raise RuntimeError("out of memory, say")
        return real(ids, *args, **kwargs)

    s.engine.step = flaky
    streams = [s.submit(GenerationRequest(prompt(5 + i, i), ADAPTERS[i], 30)) for i in range(3)]
    while s.decoding() < 3:
        steps_seen(s, s.steps + 1)
    fail.set()
    for stream in streams:
        with pytest.raises(RuntimeError, match="out of memory"):
            collect(stream)
    after = GenerationRequest(prompt(7, 9), "mlp", 10)
    assert collect(s.submit(after))[0] == alone("mlp", after.prompt_ids, 10)


def test_cli_serve_refuses_bad_scheduler_options(capsys):
    from peftlab.apps.cli import main
    for option in ("--max-running", "--max-prefill-tokens"):
        assert main(["serve", "--model", "smollm2", "--adapters", ".", option, "0"]) == 2
        assert f"{option} must be >= 1, got 0" in capsys.readouterr().err
