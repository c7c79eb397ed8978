#!/usr/bin/env python
"""Every registered method against the frozen-encoder linear probe, on MiniLM + Rotten Tomatoes.

Each row trains a fresh copy of MiniLM-L6 (same seed, so the same new classification head) for
the same number of steps with `peftlab.train` (AdamW, warm-up + cosine, batch 16, the method's
`train_lr` or the MiniLM default 2e-3), with the head trained alongside the adapter
(modules_to_save), then scores accuracy on the first N held-out test reviews. The probe trains
the head alone: a LoRA adapter whose (zero-initialised) factors are frozen, so only its head copy
learns. Step time is the training wall time over the steps (evaluation excluded).

Usage: python bench/methods_vs_probe.py [--steps 300] [--eval-size 1000] [--methods lora,ia3,...]
                                        [--out docs/results/methods_minilm]   (~3 min a method)
Writes OUT.md (the table) and OUT.json (the rows plus the environment).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import peftlab
from peftlab.cli import MODEL_DEFAULTS, build_job, method_config
from peftlab.errors import PeftlabError
from peftlab.methods import METHODS, get_method
from peftlab.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # noqa: E402  (bench/common.py)


def run_one(name: str, args) -> dict:
    probe = name == "probe"
    method = get_method("lora" if probe else name)
    model, _, task, data = build_job("minilm", "sentiment", seed=args.seed, max_length=96)
    rows = data.test[: args.eval_size]
    am = peftlab.adapt(model)
    am.add_adapter(name, method_config(method, None, 8, train_head=True))
    am.set_active([name])
    am.set_trainable(name)
    if probe:   # only the head copy learns; LoRA's B = 0 keeps the encoder exactly frozen
        for layer in am.adapters[name].layers.values():
            layer.deltas[name].requires_grad_(False)
    lr = method.train_lr if (method.train_lr and not probe) else MODEL_DEFAULTS["minilm"]["lr"]
    if probe:
        lr = args.probe_lr
    result = train(am, name, task, data.train, None, TrainConfig(
        steps=args.steps, batch_size=16, lr=lr, seed=args.seed, progress=not args.quiet))
    metrics = task.evaluate(am.eval(), rows, 64)
    trainable = sum(p.numel() for p in am.parameters() if p.requires_grad)
    return {"method": name, "accuracy": metrics["accuracy"], "trainable": trainable,
            "adapter_params": trainable - sum(p.numel() for p in am.adapters[name].copies[
                next(iter(am.adapters[name].copies))].copies[name].parameters()),
            "step_ms": 1e3 * result.seconds / max(result.steps_done, 1), "lr": lr,
            "final_loss": sum(result.losses[-20:]) / len(result.losses[-20:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--methods", default=",".join(["probe", *METHODS]))
    ap.add_argument("--probe-lr", type=float, default=1e-2, help="best of 2e-3/1e-2/3e-2 in a sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/methods_minilm")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.methods.split(","):
        t = time.perf_counter()
        print(f"== {name} ==", flush=True)
        try:
            results.append(run_one(name, args))
        except PeftlabError as e:    # a method that cannot run on this model says why
            print(f"   not run: {e}", flush=True)
            results.append({"method": name, "error": str(e)})
            continue
        print(f"   accuracy {results[-1]['accuracy']:.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)
    probe = next((r["accuracy"] for r in results if r["method"] == "probe" and "error" not in r), None)
    head = ("method", "accuracy", "vs probe", "trainable params", "of which adapter", "step (ms)", "lr")
    body = [(r["method"], f"{r['accuracy']:.4f}",
             "-" if probe is None or r["method"] == "probe" else f"{100 * (r['accuracy'] - probe):+.1f} pt",
             f"{r['trainable']:,}", f"{r['adapter_params']:,}", f"{r['step_ms']:.0f}", f"{r['lr']:g}")
            if "error" not in r else (r["method"], "not run", r["error"].split(";")[0][:90], "", "", "", "")
            for r in results]
    print()
    print_columns(head, body)
    env = {"peftlab": peftlab.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "steps": args.steps,
           "eval_size": args.eval_size, "seed": args.seed}
    lines = [f"MiniLM-L6 + Rotten Tomatoes, {args.steps} steps, batch 16, accuracy on {args.eval_size} "
             f"held-out test reviews (`python bench/methods_vs_probe.py`; torch {env['torch']}, "
             f"{env['threads']} threads).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": results}, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
