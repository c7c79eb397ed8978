#!/usr/bin/env python
"""Every registered method against the frozen-encoder linear probe, on MiniLM + Rotten Tomatoes.

Each row is one cell of `peftlab.apps.compare` (`run_cell`): a fresh copy of MiniLM-L6 (same seed, so
the same new classification head) trained for the same number of steps with `peftlab.train`
(AdamW, warm-up + cosine, batch 16, the method's `train_lr` or the MiniLM default 2e-3), with the
head trained alongside the adapter (modules_to_save), then scored on the first N held-out test
reviews. The probe trains the head alone (lr 1e-2, the best of 2e-3 / 1e-2 / 3e-2). Step time is
the training wall time over the steps (evaluation excluded).

Usage: python bench/methods_vs_probe.py [--steps 300] [--eval-size 1000] [--methods lora,ia3,...]
                                        [--out docs/results/methods_minilm]   (~3 min a method)
Writes OUT.md (the table) and OUT.json (the rows plus the environment).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from peftlab.apps.compare import Cell, Settings, environment, run_cell
from peftlab.methods import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # noqa: E402  (bench/common.py)


def run_one(name: str, args) -> dict:
    """One method's row: accuracy, trainable parameters (and those outside the head), step time."""
    settings = Settings(model="minilm", task="sentiment", steps=args.steps, batch_size=16,
                        eval_size=args.eval_size, evals=1, max_length=96, rank=8)
    r = run_cell(settings, Cell(name, args.seed, None), progress=not args.quiet)
    if r["status"] != "ok":   # a method that cannot run on this model says why
        return {"method": name, "error": r["reason"]}
    return {"method": name, "accuracy": r["score"], "trainable": r["trainable"],
            "adapter_params": r["trainable"] - r["head_params"], "step_ms": r["step_ms"],
            "lr": r["spec"]["lr"], "final_loss": sum(r["losses"][-20:]) / len(r["losses"][-20:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--methods", default=",".join(["probe", *METHODS]))
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
        results.append(run_one(name, args))
        if "error" in results[-1]:
            print(f"   not run: {results[-1]['error']}", flush=True)
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
    env = {**environment(), "steps": args.steps, "eval_size": args.eval_size, "seed": args.seed}
    lines = [(f"MiniLM-L6 + Rotten Tomatoes, {args.steps} steps, batch 16, accuracy on {args.eval_size} "
              f"held-out test reviews (`python bench/methods_vs_probe.py`; torch {env['torch']}, "
              f"{env['torch_threads']} threads)."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": results}, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
