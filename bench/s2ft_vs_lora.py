#!/usr/bin/env python
"""S2FT against LoRA at equal trainable-parameter counts: training-step time and peak memory.

Model: the SmolLM2-135M architecture (bench/common.py) cut to --layers blocks (default 6 of 30,
to keep the run under ~3 minutes on 2 shared cores; every block is identical, so per-block
costs scale), random weights, fp32, train mode, CPU. Input: batch 4 x 128 random token ids;
loss = model(input_ids, labels=input_ids).loss.

Pairings (S2FT in the paper's LLaMA-3 form: down-projection columns only, random selection):

* "down":       LoRA r=8 on ffn.down (8·(1536+576) = 16,896 params a block) against S2FT with
                d_ratio = 16,896 / (576·1536) ≈ 0.0191 (≈ 29 down columns a block, 576 params
                each): the same sites, the same budget, so only the mechanism differs.
* "all-linear": LoRA r=8 on every linear layer but the head (81,408 params a block), the usual
                LoRA setup, against S2FT down-only with d_ratio ≈ 0.0920 (≈ 141 columns a block).
* floor:        the frozen model's forward + backward to the input embeddings (what any PEFT
                method pays), for scale.
Trainable-parameter counts of each pair are printed (they agree to within one column a model).

A step = forward + backward + AdamW(adapter params, lr 1e-4).step() + zero_grad, timed with
perf_counter (gc.collect() untimed before each). One warm-up step per variant, then interleaved
rounds in rotated order; a ratio is the median over rounds of the per-round ratio S2FT / LoRA,
which cancels drift of a shared machine. Memory, after timing: peak RSS growth of one step
(VmHWM after the step minus VmRSS before it, glibc's mmap threshold fixed at 64 KiB so RSS
follows live tensors), the method of bench/train_step.py (its `memory_probe`).

Usage:  python bench/s2ft_vs_lora.py [--layers N] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from common import print_columns, smollm2_config  # bench/common.py
from train_step import memory_probe  # bench/train_step.py
from transformers import LlamaForCausalLM

import peftlab
from peftlab.methods.s2ft import S2FTConfig

now = time.perf_counter
median = statistics.median
SEED, BATCH, SEQ, LR, RANK = 0, 4, 128, 1e-4, 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Step:
    """forward + backward (+ AdamW over `params` + zero_grad when there are any)."""

    def __init__(self, model, params=None, floor=False):
        self.model, self.floor = model, floor
        self.params = list(params or [])
        self.opt = torch.optim.AdamW(self.params, lr=LR) if self.params else None

    def __call__(self, ids) -> float:
        if self.floor:
            emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = self.model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        else:
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.item()


def adapted(base, config) -> tuple[Step, int]:
    am = peftlab.adapt(copy.deepcopy(base))
    am.add_adapter("a", config)
    am.set_active("a")
    am.set_trainable("a")
    am.train()
    if config.method == "lora":   # a non-zero B so LoRA does its full work (as train_step.py does)
        g = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for (_, tname), t in am.adapter_tensors("a").items():
                if tname == "lora_B":
                    t.copy_(0.02 * torch.randn(t.shape, generator=g))
    return Step(am, am.adapter_parameters("a")), am.trainable_parameters()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="SmolLM2 blocks to keep (default 6 of 30)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = now()
    cfg = smollm2_config()
    cfg.num_hidden_layers = args.layers
    d, f = cfg.hidden_size, cfg.intermediate_size
    torch.manual_seed(SEED)
    base = LlamaForCausalLM(cfg).train().requires_grad_(False)

    lora_down = RANK * (f + d)                                    # per block
    lora_all = RANK * sum(i + o for i, o in [(d, d), (d, 192), (d, 192), (d, d), (d, f), (d, f), (f, d)])
    pairs = {"down": (["ffn.down"], lora_down / (d * f)), "all-linear": ("all-linear", lora_all / (d * f))}
    variants: dict[str, Step] = {"floor": Step(base, floor=True)}
    counts: dict[str, int] = {}
    for pname, (targets, d_ratio) in pairs.items():
        variants[f"lora {pname}"], counts[f"lora {pname}"] = adapted(
            base, peftlab.LoraConfig(r=RANK, alpha=2 * RANK, targets=targets))
        variants[f"s2ft {pname}"], counts[f"s2ft {pname}"] = adapted(base, S2FTConfig(d_ratio=d_ratio))
    print(f"peftlab {peftlab.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"SmolLM2-135M arch cut to {args.layers} of 30 blocks, random weights, fp32, train mode; "
          f"batch {BATCH}x{SEQ}; AdamW lr {LR}; {args.rounds} interleaved rounds")
    for pname, (targets, d_ratio) in pairs.items():
        print(f"pairing {pname}: LoRA r={RANK} on {targets} {counts[f'lora {pname}']:,} trainable params; "
              f"S2FT d_ratio={d_ratio:.4f} (down columns) {counts[f's2ft {pname}']:,} "
              f"(ratio {counts[f's2ft {pname}'] / counts[f'lora {pname}']:.4f})")

    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED + 2))
    names = list(variants)
    for n in names:
        t = now()
        loss = variants[n](ids)
        log(f"warm-up {n:<16} {1e3 * (now() - t):7.0f} ms  loss {loss:.4f}")
    times = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            t = now()
            variants[n](ids)
            times[n].append(now() - t)
        log(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n}={1e3 * times[n][-1]:.0f}" for n in names))

    growth = memory_probe()
    mem = {n: growth(lambda n=n: variants[n](ids)) if growth else None for n in names}

    def per_round(a, b):
        return median(x / y for x, y in zip(times[a], times[b], strict=True))

    body = []
    for pname in pairs:
        lo, s2 = f"lora {pname}", f"s2ft {pname}"
        body.append((pname, f"{counts[lo]:,}", f"{counts[s2]:,}",
                     f"{1e3 * median(times[lo]):.0f}", f"{1e3 * median(times[s2]):.0f}",
                     f"{per_round(s2, lo):.3f}",
                     f"{per_round(lo, 'floor'):.3f} / {per_round(s2, 'floor'):.3f}",
                     "-" if mem[lo] is None else f"{mem[lo] / 2**20:.0f} / {mem[s2] / 2**20:.0f}",
                     "-" if mem[lo] is None else f"{mem[s2] / mem[lo]:.3f}"))
    print()
    print_columns(("pairing", "LoRA params", "S2FT params", "LoRA ms", "S2FT ms", "time S2FT/LoRA",
                   "x floor (LoRA / S2FT)", "peak RSS growth MB (LoRA / S2FT)", "mem S2FT/LoRA"), body)
    fl = mem["floor"]
    print(f"\nfloor: step {1e3 * median(times['floor']):.0f} ms" +
          ("" if fl is None else f", peak RSS growth {fl / 2**20:.0f} MB") +
          f"; total wall time {now() - t0:.0f} s")


if __name__ == "__main__":
    main()
