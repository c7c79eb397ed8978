#!/usr/bin/env python
"""Optimizer state memory and step time of GaLore and Natural GaLore against AdamW, in one process.

Model: all-MiniLM-L6-v2 (peftlab.assets "minilm", BERT: hidden 384, 6 layers, FFN 1536) when its
asset package is installed, else a random BertForSequenceClassification of the same shape; fp32,
train mode, on --device (cpu default). Full-weight training of the attention and FFN weights
(roles attn.q, attn.k, attn.v, attn.o, ffn.up, ffn.down: 36 matrices, 10.6M weights); everything
else is frozen, so every optimizer sees the same 36 weights (plus their biases, which take plain
AdamW steps inside the GaLore optimizers). Input: batch x seq random token ids, 2 random labels.

Variants (one seeded base, deep-copied; peftlab.training.optim.build_optimizer, lr 1e-4):
adamw (torch.optim.AdamW), galore r8 / r64, natural-galore r8 / r64 with s = 20 (update_gap 200,
scale 0.25, two-sided projection, relative λ 1: the defaults), and natural-galore one-sided (the
papers' projection) r8 / r64.

Memory: optimizer_state_bytes after the first step (every state tensor exists then).
Time: time.perf_counter around forward + backward and around optimizer.step (CUDA synchronised).
A GaLore step either recomputes the projectors (an SVD per matrix, every update_gap steps:
"refresh step") or reuses them ("steady step"). After one warm-up step per variant, interleaved
rounds run every variant in a rotated order: one steady step, then (GaLore variants) one step
forced to refresh. Times are medians over rounds; a ratio is the median over rounds of
(variant / adamw in the same round), which cancels the drift of a shared machine.
"step x adamw" compares whole training steps (forward + backward + optimizer step) with the
refresh cost amortised over update_gap steps: (refresh + (T−1)·steady) / T.

A forced refresh costs ~2-3 s on one CPU thread (36 SVDs), so a full run (5 rounds) takes
~2 min on a shared 2-core CPU and --quick (2 rounds, batch 4) ~1 min.
Natural GaLore's history is s·r·n per matrix one-sided: at r = 64, s = 20 on 384-wide matrices
it is larger than AdamW's 2·m·n, so that variant holds more state than AdamW; two-sided it is
s·r² (r×r projected gradients).

Usage: python bench/optimizer_state.py [--quick] [--rounds N] [--batch 8] [--seq 64]
                                       [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common import print_columns  # bench/common.py
from transformers import BertConfig, BertForSequenceClassification

from peftlab.core.errors import MissingAssetError
from peftlab.core.sites import site_roles
from peftlab.training.optim import build_optimizer, optimizer_state_bytes

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")
UPDATE_GAP = 200
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def minilm() -> tuple[torch.nn.Module, str]:
    """MiniLM (real weights if installed, else its shape with random weights) and a label."""
    torch.manual_seed(0)
    try:
        from peftlab.assets import load_model
        model, _ = load_model("minilm", kind="classification", num_labels=2)
        return model, "all-MiniLM-L6-v2"
    except MissingAssetError:
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, num_labels=2)
        return BertForSequenceClassification(cfg), "MiniLM-shaped BERT (random weights)"


def mark_trainable(model: torch.nn.Module) -> int:
    """Freeze everything but the attention / FFN projections; returns their weight count."""
    paths = {path for path, role in site_roles(model).items() if role in ROLES}
    model.requires_grad_(False)
    count = 0
    for path in paths:
        module = model.get_submodule(path)
        module.requires_grad_(True)
        count += module.weight.numel()
    return count


def refresh_next_step(optimizer: torch.optim.Optimizer) -> None:
    """Make the next step recompute every projector (SubspaceAdamW refreshes when the step
    count it is about to take is 1 + a multiple of update_gap)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "projector" in state:
                state["step"] = group["update_gap"] * (1 + state["step"] // group["update_gap"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 rounds, batch 4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.batch = 2, 4
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    base, label = minilm()
    weights = mark_trainable(base)
    base.to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, base.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    variants = {
        "adamw": {},
        "galore r8": {"rank": 8},
        "galore r64": {"rank": 64},
        "natural r8 s20": {"rank": 8, "history": 20},                    # two-sided: the default
        "natural r64 s20": {"rank": 64, "history": 20},
        "natural one-sided r8 s20": {"rank": 8, "history": 20, "projection": "one-sided"},
        "natural one-sided r64 s20": {"rank": 64, "history": 20, "projection": "one-sided"},
    }
    models, optimizers = {}, {}
    for name, options in variants.items():
        models[name] = copy.deepcopy(base)
        kind = "adamw" if name == "adamw" else "galore" if name.startswith("galore") else "natural-galore"
        optimizers[name] = build_optimizer(list(models[name].named_parameters()), kind, lr=1e-4,
                                           update_gap=UPDATE_GAP, **options)
    log(f"{label}: {len(variants)} copies, {weights / 1e6:.1f}M trainable weights on {device}")

    def step(name: str) -> tuple[float, float]:
        """(forward + backward seconds, optimizer.step seconds) of one training step."""
        model, opt = models[name], optimizers[name]
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    state = {}
    for name in variants:                 # warm-up: the first step builds state and projectors
        first = step(name)[1]
        state[name] = optimizer_state_bytes(optimizers[name])
        log(f"{name}: first step {first * 1e3:.0f} ms, state {state[name] / 2**20:.1f} MiB")
    names = list(variants)
    rounds: list[dict[str, tuple[float, float, float]]] = []   # name -> (fwd+bwd, steady, refresh)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        times = {}
        for name in order:
            fwd_bwd, steady = step(name)
            refresh = steady
            if name != "adamw":
                refresh_next_step(optimizers[name])
                refresh = step(name)[1]
            times[name] = (fwd_bwd, steady, refresh)
        rounds.append(times)
    log(f"{args.rounds} rounds done")

    median = statistics.median
    amortised = lambda t: (t[2] + (UPDATE_GAP - 1) * t[1]) / UPDATE_GAP
    body = []
    for name in names:
        # Per-round ratio of whole steps against adamw's step in the same round.
        whole = median((t[name][0] + amortised(t[name])) / (t["adamw"][0] + t["adamw"][1]) for t in rounds)
        refresh = "-" if name == "adamw" else f"{median(t[name][2] for t in rounds) * 1e3:.0f}"
        body.append((name, f"{state[name] / 2**20:.1f}", f"{state[name] / state['adamw']:.3f}", refresh,
                     f"{median(t[name][1] for t in rounds) * 1e3:.1f}",
                     f"{median(amortised(t[name]) for t in rounds) * 1e3:.1f}",
                     f"{median(t[name][0] for t in rounds) * 1e3:.0f}", f"{whole:.2f}"))
    print(f"{label}, fp32 {device}, full-weight training of {', '.join(ROLES)} "
          f"({weights / 1e6:.1f}M weights), batch {args.batch} x {args.seq}, update_gap {UPDATE_GAP}, "
          f"{args.rounds} rounds, {args.threads} thread(s)")
    print_columns(("optimizer", "state MiB", "x adamw", "refresh step ms", "steady step ms",
                   "amortised step ms", "fwd+bwd ms", "step x adamw"), body)
    print(f"[{time.perf_counter() - _T0:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
