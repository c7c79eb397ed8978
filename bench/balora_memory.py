#!/usr/bin/env python
"""BA-LoRA's training-step memory against plain LoRA with the same rank, targets and PiSSA init.

Model: the SmolLM2-135M architecture (bench/common.py) with --layers decoder layers (default 4),
random weights, fp32, CPU, train mode. Input: batch x seq random token ids, labels = the ids
with the first quarter of each row set to −100 (a prompt), so the label-mask path is exercised.

Variants, on one seeded base (deep-copied):
* lora:   LoraConfig(r=8, alpha=8, targets="all-linear", init="pissa"); step = forward with labels,
          loss.backward().
* balora: BALoraConfig(r=8, targets="all-linear") (PiSSA, form "auto" -> "nlg"; or --form);
          step = forward with labels, + am.auxiliary_loss() (the adapters-disabled no-grad
          reference forward and the three regularisers), backward of the sum.
The adapters get the same seeded perturbation so the two steps do the same LoRA math.

Memory (as bench/train_step.py): glibc switched to a fixed 64 KiB mmap threshold and trimmed,
VmHWM reset via /proc/self/clear_refs; "step peak growth" = VmHWM − VmRSS before the step: one
warm-up step per variant first, then the measured step (--repeats, the median is reported).
The goal: balora / lora <= 1.3. Linux + glibc only.

Usage: python bench/balora_memory.py [--layers 8] [--batch 4] [--seq 128] [--form auto]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import re
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common import print_columns, smollm2_config  # bench/common.py
from transformers import LlamaForCausalLM

import peftlab
from peftlab.methods.balora import BALoraConfig

GOAL = 1.3
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: 1024 * int(re.search(rf"^{k}:\s+(\d+) kB", s, re.MULTILINE).group(1)) for k in ("VmRSS", "VmHWM")}


def memory_probe():
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-3, 64 * 1024) != 1:    # M_MMAP_THRESHOLD
        raise SystemExit("mallopt failed: needs glibc")

    def growth(fn) -> int:
        gc.collect()
        libc.malloc_trim(0)
        rss0 = _status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return _status()["VmHWM"] - rss0

    return growth


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--form", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    cfg = smollm2_config()
    cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).train()
    ids = torch.randint(1, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100

    def build(config):
        am = peftlab.adapt(copy.deepcopy(base))
        am.add_adapter("a", config)
        am.set_active("a")
        am.set_trainable("a")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in am.adapter_parameters("a"):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        am.train()
        return am

    log("base built")
    variants = {
        "lora": build(peftlab.LoraConfig(r=args.rank, alpha=float(args.rank), targets="all-linear", init="pissa")),
        "balora": build(BALoraConfig(r=args.rank, targets="all-linear", form=args.form)),
    }
    log("adapters added")
    info = {}

    def step(name):
        am = variants[name]

        def run():
            out = am(input_ids=ids, labels=labels)
            loss = out.loss
            aux, parts = am.auxiliary_loss(99, 100)   # the last step: every schedule on
            if aux is not None:
                loss = loss + aux
            loss.backward()
            info[name] = (float(out.loss), parts)
            for p in am.adapter_parameters("a"):
                p.grad = None
        return run

    growth = memory_probe()
    results = {}
    for name in variants:
        step(name)()                       # warm-up
        log(f"{name}: warm-up step done")
        results[name] = statistics.median(growth(step(name)) for _ in range(args.repeats))
        log(f"{name}: measured")
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    ratio = results["balora"] / results["lora"]
    logits = args.batch * args.seq * cfg.vocab_size * 4
    print(f"SmolLM2 architecture, {args.layers} layers, batch {args.batch} x {args.seq}, r={args.rank} all-linear "
          f"PiSSA, fp32 CPU; one logits tensor = {mib(logits)}")
    print_columns(("variant", "step peak growth", "x lora"),
                  [(n, mib(b), f"{b / results['lora']:.3f}") for n, b in results.items()])
    print(f"balora terms: {info['balora'][1]}")
    print(f"ratio {ratio:.3f} (goal <= {GOAL}): {'OK' if ratio <= GOAL else 'NO'}   [{time.perf_counter() - t0:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
