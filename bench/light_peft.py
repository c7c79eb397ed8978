#!/usr/bin/env python
"""Light-PEFT early pruning against plain LoRA, on MiniLM + Rotten Tomatoes (acceptance 2).

(a) LoRA: `peftlab train`'s LoRA on MiniLM (its default targets attn.q, attn.v, r=8, the
    classification head trained alongside), STEPS steps, batch 16, lr 2e-3.
(b) Light-PEFT: the same adapter trained for ESTIMATE steps with head and neuron masks (L1 1e-4,
    mask lr × coef) and the rank-importance recorder, then the base model and the adapter are
    pruned (the paper's ratios: heads 1/3 per layer, neurons 1/3 globally, LoRA modules 3/4
    globally, rank units 1/2 globally among the kept modules) and training goes
    on from the estimation weights for the remaining STEPS - ESTIMATE steps (fresh optimiser).

Both score accuracy on the first EVAL held-out test reviews; parameter counts come from the
models; inference latency is one forward of a batch of 32 × 128 tokens with the adapter merged,
the median of several runs alternating between the two models in this process, one thread.
Acceptance: fewer parameters, lower latency, accuracy within 3 points of (a).

Usage: python bench/light_peft.py [--steps 300] [--estimate-steps 100] [--eval-size 1000]
                                  [--prune heads=1/3,neurons=1/3,ranks=0.5,modules=0.75]
                                  [--mask-lr-scale 1] [--out docs/results/light_peft_minilm.md]
(about 10 minutes on one CPU thread)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import peftlab
from peftlab.apps.recipes import MODEL_DEFAULTS, build_job, method_config
from peftlab.methods import get_method
from peftlab.training.loop import TrainConfig, train
from peftlab.training.pruning import EarlyPruning, parse_prune_spec

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # bench/common.py

NAME = "lora"
BATCH = 16


def new_job(seed: int):
    """MiniLM with a fresh LoRA adapter (and head copy), active and trainable; the task and data."""
    model, _, task, data = build_job("minilm", "sentiment", seed=seed, max_length=96)
    am = peftlab.adapt(model)
    am.add_adapter(NAME, method_config(get_method("lora"), None, 8, train_head=True))
    am.set_active([NAME])
    am.set_trainable(NAME)
    return am, task, data


def counts(am: peftlab.AdaptedModel) -> dict[str, int]:
    head = sum(p.numel() for w in am.adapters[NAME].copies.values() for p in w.copies[NAME].parameters())
    return {"base": am.base_parameters(), "adapter": am.count_parameters(NAME) - head, "head": head}


def run_lora(args, lr: float) -> tuple[peftlab.AdaptedModel, dict]:
    am, task, data = new_job(args.seed)
    t = time.perf_counter()
    result = train(am, NAME, task, data.train, None, TrainConfig(
        steps=args.steps, batch_size=BATCH, lr=lr, seed=args.seed, progress=not args.quiet))
    row = {"name": "LoRA", "train_s": time.perf_counter() - t, "before": counts(am), "after": counts(am),
           "accuracy": task.evaluate(am.eval(), data.test[: args.eval_size], 64)["accuracy"],
           "final_loss": statistics.mean(result.losses[-20:])}
    return am, row


def run_light_peft(args, lr: float) -> tuple[peftlab.AdaptedModel, dict]:
    am, task, data = new_job(args.seed)
    before = counts(am)
    ratios = parse_prune_spec(args.prune)
    t = time.perf_counter()
    ep = EarlyPruning(am, NAME, ratios, l1=args.l1, mask_lr_scale=args.mask_lr_scale,
                      estimate_steps=args.estimate_steps)
    ep.start()
    train(am, NAME, task, data.train, None, TrainConfig(
        steps=args.estimate_steps, batch_size=BATCH, lr=lr, seed=args.seed, lr_scale=ep.lr_scale,
        progress=not args.quiet))
    masks = torch.cat([m.detach().flatten() for m in am.pruning_masks.parameters()])
    units = sum(layer.deltas[NAME].r for layer in am.adapters[NAME].layers.values())
    plan = ep.finish()
    print(f"   pruned: {plan.describe()}; LoRA rank units {sum(map(len, ep.kept_ranks.values()))}/{units} "
          f"kept, {len(ep.dropped)} modules dropped; masks {float(masks.min()):.3f}..{float(masks.max()):.3f}",
          flush=True)
    result = train(am, NAME, task, data.train, None, TrainConfig(
        steps=args.steps - args.estimate_steps, batch_size=BATCH, lr=lr, seed=args.seed + 1,
        progress=not args.quiet))
    row = {"name": "Light-PEFT", "train_s": time.perf_counter() - t, "before": before, "after": counts(am),
           "accuracy": task.evaluate(am.eval(), data.test[: args.eval_size], 64)["accuracy"],
           "final_loss": statistics.mean(result.losses[-20:]), "plan": plan.describe()}
    return am, row


@torch.no_grad()
def latencies(models: list[peftlab.AdaptedModel], repeats: int, seed: int) -> list[float]:
    """Median seconds of one forward of 32 × 128 tokens per model (adapters merged), the runs
    alternating between the models so that load on the machine hits them alike."""
    g = torch.Generator().manual_seed(seed)
    vocab = models[0].config.vocab_size
    batch = {"input_ids": torch.randint(1000, vocab, (32, 128), generator=g),
             "attention_mask": torch.ones(32, 128, dtype=torch.long)}
    for am in models:
        am.eval()
        am.merge()
        am(**batch)   # warm-up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, am in enumerate(models):
            t = time.perf_counter()
            am(**batch)
            times[i].append(time.perf_counter() - t)
    for am in models:
        am.unmerge()
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--estimate-steps", type=int, default=100)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--prune", default="heads=1/3,neurons=1/3,ranks=0.5,modules=0.75")
    ap.add_argument("--l1", type=float, default=1e-4)
    ap.add_argument("--mask-lr-scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/light_peft_minilm.md")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lr = MODEL_DEFAULTS["minilm"]["lr"]

    print("== LoRA ==", flush=True)
    lora_am, lora = run_lora(args, lr)
    print(f"   accuracy {lora['accuracy']:.4f}  ({lora['train_s']:.0f} s)", flush=True)
    print("== Light-PEFT ==", flush=True)
    light_am, light = run_light_peft(args, lr)
    print(f"   accuracy {light['accuracy']:.4f}  ({light['train_s']:.0f} s)", flush=True)
    lat = latencies([lora_am, light_am], args.repeats, args.seed)
    lora["latency_ms"], light["latency_ms"] = 1e3 * lat[0], 1e3 * lat[1]

    head = ("run", "accuracy", "vs LoRA", "base params", "LoRA params", "head params", "latency (ms)",
            "latency ratio", "train (s)")
    body = [(r["name"], f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - lora['accuracy']):+.1f} pt",
             f"{r['after']['base']:,}", f"{r['after']['adapter']:,}", f"{r['after']['head']:,}",
             f"{r['latency_ms']:.0f}", f"{r['latency_ms'] / lora['latency_ms']:.3f}", f"{r['train_s']:.0f}")
            for r in (lora, light)]
    print()
    print_columns(head, body)
    ok = (light["after"]["base"] < lora["after"]["base"] and light["after"]["adapter"] < lora["after"]["adapter"]
          and light["latency_ms"] < lora["latency_ms"] and light["accuracy"] >= lora["accuracy"] - 0.03)
    lines = [
        "# Light-PEFT early pruning vs LoRA: MiniLM-L6 + Rotten Tomatoes",
        "",
        (f"`python bench/light_peft.py` (torch {torch.__version__}, 1 thread, seed {args.seed}). LoRA r=8 on "
        f"MiniLM's default targets (attn.q, attn.v) with the classification head trained alongside, "
        f"batch {BATCH}, lr {lr:g}, {args.steps} steps. Light-PEFT: {args.estimate_steps} estimation steps "
        f"with masks (L1 {args.l1:g}, mask lr × {args.mask_lr_scale:g}), prune `{args.prune}` "
        f"({light['plan']}), then {args.steps - args.estimate_steps} more steps from the estimation "
        f"weights. Accuracy on {args.eval_size} held-out test reviews; latency: median of "
        f"{args.repeats} forwards of 32 × 128 tokens, adapter merged, alternating between the two models."),
        "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *["| " + " | ".join(row) + " |" for row in body],
        "",
        (f"Base parameters before pruning: {light['before']['base']:,}; LoRA parameters before rank "
         f"pruning: {light['before']['adapter']:,}."),
        "",
        (f"Acceptance (fewer parameters, lower latency, accuracy within 3 points of LoRA): "
         f"{'met' if ok else 'NOT met'}."),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nacceptance {'met' if ok else 'NOT met'}; wrote {out}")


if __name__ == "__main__":
    main()
