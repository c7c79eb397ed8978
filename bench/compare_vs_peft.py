#!/usr/bin/env python
"""peftlab against Hugging Face `peft` on one job: LoRA, IA3 and prompt tuning on MiniLM-L6 +
Rotten Tomatoes, trained the same way, in one process.

Both sides start from the same model (`build_job`, one seed: the same new classification head,
trained with the adapter: peftlab's `modules_to_save=["head"]`, peft's
`modules_to_save=["classifier"]`) with the same adapter sites (peft gets the module paths
peftlab's method resolved: LoRA r 8, alpha 16 on attn.q, attn.v; IA3 on attn.k, attn.v and the
input of ffn.down; 20 random soft tokens), and train through one plain torch loop: AdamW at the
method's `train_lr` (or MiniLM's 2e-3), peftlab's warm-up + cosine schedule and seeded data order,
gradient clipping at 1.0, batch 16. Each side keeps its own torch RNG state, so its dropout
masks are those of a run on its own.

Measured per side:
* peak memory: the first `--memory-steps` steps run one side at a time under
  `peftlab.apps.compare.PeakRSS` (growth of the resident set over its size at the start; freed heap
  trimmed first, the kernel's high-water mark reset);
* step time: the remaining steps alternate between the sides (which one goes first alternates
  too), so both see the same machine load; the median of those steps;
* score: accuracy on the first `--eval-size` held-out test reviews after training.

Usage: python bench/compare_vs_peft.py [--steps 100] [--eval-size 500] [--methods lora,ia3,prompt]
                                       [--out docs/results/compare_vs_peft.md]   (~6 min)
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

import peftlab
from peftlab.apps.compare import PeakRSS, environment, warm_up
from peftlab.apps.recipes import MODEL_DEFAULTS, build_job, method_config
from peftlab.methods import get_method
from peftlab.training.loop import index_stream, make_scheduler

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # noqa: E402  (bench/common.py)

HEAD = "classifier"   # BertForSequenceClassification's head, the site peftlab's role "head" finds


class Side:
    """One implementation's model in training: the shared loop, one step at a time."""

    def __init__(self, name: str, model: torch.nn.Module, task, rows: list[dict], *, lr: float,
                 steps: int, batch_size: int, seed: int) -> None:
        self.name, self.model, self.task, self.rows, self.batch_size = name, model, task, rows, batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = make_scheduler(self.optimizer, steps, math.ceil(0.1 * steps))
        self.stream = index_stream(len(rows), seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.rng = torch.get_rng_state()
        self.times: list[float] = []

    def step(self) -> None:
        """One optimisation step, timed; the torch RNG (dropout) is this side's own."""
        self.model.train()
        start = time.perf_counter()
        with torch.random.fork_rng():
            torch.set_rng_state(self.rng)
            batch = self.task.collate([self.rows[i] for i in itertools.islice(self.stream, self.batch_size)])
            self.task.loss(self.model, batch).backward()
            self.rng = torch.get_rng_state()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def peftlab_model(method: str, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """The model with peftlab's adapter, and the site paths it chose by role (for peft)."""
    am = peftlab.adapt(model)
    am.add_adapter(method, method_config(get_method(method), None, 8, train_head=True))
    am.set_active([method])
    am.set_trainable(method)
    roles: dict[str, list[str]] = {}
    for site in am.adapters[method].sites:
        roles.setdefault(site.role, []).append(site.path)
    return am, roles


def peft_model(method: str, model: torch.nn.Module, roles: dict[str, list[str]]) -> torch.nn.Module:
    """The model with peft's adapter on the same sites and the same head."""
    sites = [p for paths in roles.values() for p in paths]
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                            target_modules=sites, modules_to_save=[HEAD])
    elif method == "ia3":
        config = IA3Config(task_type="SEQ_CLS", target_modules=sites, feedforward_modules=roles["ffn.down"],
                           modules_to_save=[HEAD])
    else:
        config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20, prompt_tuning_init="RANDOM",
                                    modules_to_save=[HEAD])
    return get_peft_model(model, config)


def compare_method(method: str, args, *, peftlab_first: bool) -> list[dict]:
    """Both sides of one method: memory alone (in the order given), then steps interleaved, then
    scores."""
    lr = get_method(method).train_lr or MODEL_DEFAULTS["minilm"]["lr"]
    sides, roles = [], {}
    for name in ("peftlab", "peft"):
        model, _, task, data = build_job("minilm", "sentiment", seed=args.seed, max_length=96)
        torch.manual_seed(args.seed)   # the adapter's initialisation
        if name == "peftlab":
            model, roles = peftlab_model(method, model)
        else:
            model = peft_model(method, model, roles)
        sides.append(Side(name, model, task, data.train, lr=lr, steps=args.steps, batch_size=16, seed=args.seed))
    eval_rows = data.test[: args.eval_size]
    peaks = {}
    for side in sides if peftlab_first else sides[::-1]:   # one side at a time: its own peak
        warm_up(side.model, side.task, side.rows[:16])
        with PeakRSS() as peak:
            for _ in range(args.memory_steps):
                side.step()
        peaks[side.name] = peak.peak_bytes
    for i in range(args.memory_steps, args.steps):
        for side in (sides if i % 2 else sides[::-1]):
            side.step()
    rows = []
    for side in sides:
        accuracy = side.task.evaluate(side.model.eval(), eval_rows, 64)["accuracy"]
        rows.append({"method": method, "side": side.name, "lr": lr, "trainable": side.trainable(),
                     "step_ms": 1e3 * statistics.median(side.times[args.memory_steps:]),
                     "peak_mib": peaks[side.name] / 2**20 if peaks[side.name] is not None else None,
                     "accuracy": accuracy})
        print(f"   {side.name}: accuracy {accuracy:.4f}, step {rows[-1]['step_ms']:.0f} ms", flush=True)
    return rows


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--memory-steps", type=int, default=5, help="first steps, run one side at a time")
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--methods", default="lora,ia3,prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/compare_vs_peft.md")
    args = ap.parse_args()
    started = time.perf_counter()
    rows = []
    for i, method in enumerate(args.methods.split(",")):
        print(f"== {method} ==", flush=True)
        rows += compare_method(method, args, peftlab_first=i % 2 == 0)   # alternate who goes first
    head = ("method", "trainable (peftlab / peft)", "step ms (peftlab / peft)", "step ratio",
            "peak MiB (peftlab / peft)", "memory ratio", "accuracy (peftlab / peft)", "score ratio")
    body = []
    for ours, theirs in zip(rows[::2], rows[1::2], strict=True):
        mib = [f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "n/a" for r in (ours, theirs)]
        body.append((ours["method"], f"{ours['trainable']:,} / {theirs['trainable']:,}",
                     f"{ours['step_ms']:.0f} / {theirs['step_ms']:.0f}", ratio(ours["step_ms"], theirs["step_ms"]),
                     " / ".join(mib), ratio(ours["peak_mib"], theirs["peak_mib"]),
                     f"{ours['accuracy']:.4f} / {theirs['accuracy']:.4f}", ratio(ours["accuracy"], theirs["accuracy"])))
    print()
    print_columns(head, body)
    env = environment()
    minutes = (time.perf_counter() - started) / 60
    import peft
    lines = [
        "# peftlab vs peft: LoRA, IA3 and prompt tuning on MiniLM-L6 + Rotten Tomatoes", "",
        "`python bench/compare_vs_peft.py` (see its docstring for the method). "
        f"{args.steps} steps of batch 16 through one plain torch loop (AdamW at the method's lr: "
        + ", ".join(f"{r['method']} {r['lr']:g}" for r in rows[::2])
        + f"), seed {args.seed}, the head trained with the adapter; accuracy on {args.eval_size} held-out "
        f"reviews. Peak memory: the first {args.memory_steps} steps of each side alone "
        f"({env['memory_measure']}); step time: median of the other {args.steps - args.memory_steps} "
        "steps, the two sides alternating. Ratios are peftlab / peft (below 1: peftlab is faster or "
        "smaller).", "",
        (f"{env['cpu']}, {env['usable_cores']} cores, torch threads: {env['torch_threads']}; torch "
         f"{env['torch']}, transformers {env['transformers']}, peft {peft.__version__}, "
         f"peftlab {env['peftlab']}; {minutes:.1f} min."), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in body),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
