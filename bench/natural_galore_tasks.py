#!/usr/bin/env python
"""AdamW, GaLore and Natural GaLore at equal steps on two fine-tuning tasks (issue 25, fix 1).

Tasks (pretrained weights and data from the asset packages, nothing downloaded):

* minilm: all-MiniLM-L6-v2 (BERT) on Rotten Tomatoes sentiment (`load_dataset("sentiment")`,
  split seed 0). Full-weight training of the attention and FFN matrices (roles attn.q/k/v/o,
  ffn.up/down: 36 matrices, with their biases) and a fresh classification head initialised from
  the run's seed; embeddings and LayerNorms frozen (as bench/optimizer_state.py). Batch 16,
  reviews truncated to 64 tokens, one pass over a seeded order of the training reviews. Metrics:
  training loss per step, validation accuracy / loss every --eval-every steps and at the end,
  test accuracy at the end.
* smollm2: SmolLM2-135M-Instruct, causal-LM fine-tuning on the shipped Shakespeare plays
  (`load_dataset("shakespeare")`, split seed 0: whole plays held out). Full-weight training of
  the attention and MLP matrices (attn.q/k/v/o, ffn.gate/up/down: 210 matrices, 106M weights);
  embeddings (tied head) and norms frozen. The training chunks are tokenized (+ eos), packed into
  one stream and cut into blocks of --lm-seq tokens; a run draws --lm-batch blocks a step in a
  seeded order. Held-out perplexity: exp(mean token NLL) over the first --eval-blocks blocks of
  the packed validation plays (and of the test plays at the end); the same blocks for every run.

Optimisers (`peftlab.training.optim.build_optimizer`, weight decay 0, betas (0.9, 0.999)), the
papers' forms first:
  adamw           torch.optim.AdamW
  galore          rank 8, one-sided, update_gap --update-gap, scale --scale (GaLore's
                  fine-tuning scale 4)
  natural-galore  the paper's form (Das, 2024): one-sided projection, absolute damping λ 1e-3,
                  history s 20, same rank / gap / scale as galore
  natural-ours    our variant: two-sided (r×r Tucker core) projection, relative damping λ 1
                  (λ·mean‖g‖² of the history), s 20: Natural GaLore's default in optim.py
update_gap 50 (not GaLore's 200/500): a run has ~200 steps, so a gap of 200 would fix every
projector at the first step's gradient (whose direction the fresh head's gradient dominates) for
the whole run; 50 gives four subspaces, and 50 ≥ 2.5·s so Natural GaLore's history (cleared at
each refresh) fills between refreshes.

Protocol: for each task and optimiser, a learning-rate sweep (--lrs-minilm / --lrs-smollm2, one
seed: the first of --seeds) chooses the lr on the validation split (minilm: highest final
validation accuracy, ties to lower validation loss; smollm2: lowest validation perplexity);
then the other seeds run at the chosen lr (the sweep's run at the first seed is reused). The seed
sets the head, dropout and the data order; the data split is fixed (seed 0). Reported: per-step
training loss mean ± std over seeds, validation curve, final validation and test metrics mean ±
std, optimiser state bytes after the first step (`optimizer_state_bytes`). The test split is
never used to choose anything.

Outputs: <out>.json (settings, every run, the summaries), <out>.md (written from the JSON, see
`write_markdown`) and <out>.png (loss curves). The JSON is rewritten after every run; --resume
reuses the runs it already holds (same settings), so an interrupted full run can continue.

Threads: 1 by default. On this shared 2-core machine, with other jobs running, 2 torch threads
made a MiniLM step ~6× slower (0.7 s → 4 s) and a 576×1536 SVD ~20× slower (0.14 s → 2.5-12 s):
OpenMP threads wait for a core that another process holds.

Time (1 thread): before starting, a few calibration steps per task give an estimate of the run
about to start and of the full default run, printed on stderr (and stdout). Measured here with
other jobs on the cores: MiniLM ~0.8 s a step (~3-4 min a run), SmolLM2 ~1.7-3.3 s a step plus
~16 s per projector refresh (~7-12 min a run: more than the 2-3 min the issue hoped for, with all
210 matrices trained); the full default grid (2 tasks × 4 optimisers × (3 lrs + 2 more seeds) ×
200 steps = 40 runs) ~4 h, ~2/3 of it SmolLM2. --quick (4 steps, 1 seed, 1 lr, update_gap 2,
64 reviews / 4 blocks held out) ~4 min, written to /tmp unless --out is given.

Usage: python bench/natural_galore_tasks.py [--quick] [--tasks minilm,smollm2] [--steps 200]
           [--seeds 0,1,2] [--lrs-minilm 3e-5,1e-4,3e-4] [--lrs-smollm2 1e-5,3e-5,1e-4]
           [--optimizers adamw,galore,natural-galore,natural-ours] [--rank 8] [--update-gap 50]
           [--scale 4] [--eval-every 50] [--lm-batch 2] [--lm-seq 64] [--eval-blocks 64]
           [--threads 1] [--estimate-only] [--resume] [--out docs/results/natural_galore]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # bench/common.py

import peftlab
from peftlab.core.sites import site_roles
from peftlab.training.optim import build_optimizer, optimizer_state_bytes

ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down")
TASKS = ("minilm", "smollm2")
OPTIMIZERS: dict[str, dict[str, Any]] = {   # label -> (build_optimizer name, options)
    "adamw": {"name": "adamw"},
    "galore": {"name": "galore", "projection": "one-sided"},
    "natural-galore": {"name": "natural-galore", "projection": "one-sided", "damping_mode": "absolute",
                       "damping": 1e-3, "history": 20},
    "natural-ours": {"name": "natural-galore", "projection": "two-sided", "damping_mode": "relative",
                     "damping": 1.0, "history": 20},
}
DESCRIPTION = {
    "adamw": "AdamW",
    "galore": "GaLore (one-sided)",
    "natural-galore": "Natural GaLore, the paper's form (one-sided, absolute λ 1e-3, s 20)",
    "natural-ours": "Natural GaLore, our variant (two-sided r×r core, relative λ 1, s 20)",
}
FULL = {"steps": 200, "seeds": [0, 1, 2], "lrs": {"minilm": [3e-5, 1e-4, 3e-4], "smollm2": [1e-5, 3e-5, 1e-4]},
        "eval_every": 50, "eval_blocks": 64}
MINILM_BATCH, MINILM_SEQ, EVAL_BATCH = 16, 64, 64
# "close to AdamW": within this much of AdamW's mean (or AdamW's seed std if larger)
CLOSE = {"minilm": ("accuracy points", 1.0), "smollm2": ("relative perplexity", 0.02)}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def mark_trainable(model: torch.nn.Module, extra: tuple[str, ...] = ()) -> int:
    """Freeze all but the attention / FFN projections (weights and biases) and the modules
    `extra`; returns the number of trainable projection weights."""
    paths = {path for path, role in site_roles(model).items() if role in ROLES}
    model.requires_grad_(False)
    count = 0
    for path in sorted(paths):
        module = model.get_submodule(path)
        module.requires_grad_(True)
        count += module.weight.numel()
    for path in extra:
        model.get_submodule(path).requires_grad_(True)
    return count


# ---- tasks -----------------------------------------------------------------------------------------
class MiniLMTask:
    name = "minilm"
    metric, better = "accuracy", max

    def __init__(self, args: argparse.Namespace) -> None:
        data = peftlab.load_dataset("sentiment", seed=0)
        _, self.tokenizer = peftlab.load_model("minilm", kind="classification", num_labels=2)
        self.train = data.train
        self.validation = data.validation[: args.eval_rows] if args.eval_rows else data.validation
        self.test = data.test[: args.eval_rows] if args.eval_rows else data.test
        self.info = {"dataset": "sentiment (Rotten Tomatoes)", "split_seed": 0, "source": data.info["source"],
                     "sizes": {"train": len(self.train), "validation": len(self.validation),
                               "test": len(self.test)},
                     "batch": MINILM_BATCH, "max_tokens": MINILM_SEQ, "head": "fresh, from the run's seed",
                     "trained": "attn.q/k/v/o, ffn.up/down (weights + biases) + classifier head"}

    def encode(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([r["text"] for r in rows], truncation=True, max_length=MINILM_SEQ,
                             padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([r["label"] for r in rows])
        return dict(enc)

    def model(self, seed: int) -> tuple[torch.nn.Module, int]:
        torch.manual_seed(seed)                     # the fresh head
        model, _ = peftlab.load_model("minilm", kind="classification", num_labels=2)
        return model, mark_trainable(model, ("classifier",))

    def batches(self, seed: int, steps: int, batch: int = MINILM_BATCH):
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * batch:
            order += torch.randperm(len(self.train), generator=g).tolist()
        for k in range(steps):
            yield self.encode([self.train[i] for i in order[k * batch:(k + 1) * batch]])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        rows = self.validation if split == "validation" else self.test
        model.eval()
        correct, loss = 0, 0.0
        for i in range(0, len(rows), EVAL_BATCH):
            enc = self.encode(rows[i:i + EVAL_BATCH])
            out = model(**enc)
            loss += float(out.loss) * len(enc["labels"])
            correct += int((out.logits.argmax(-1) == enc["labels"]).sum())
        model.train()
        return {"accuracy": 100.0 * correct / len(rows), "loss": loss / len(rows)}


class SmolLM2Task:
    name = "smollm2"
    metric, better = "perplexity", min

    def __init__(self, args: argparse.Namespace) -> None:
        data = peftlab.load_dataset("shakespeare", seed=0)
        self.base, self.tokenizer = peftlab.load_model("smollm2", kind="causal-lm")
        self.batch, self.seq = args.lm_batch, args.lm_seq
        self.train = self.pack(data.train, limit=(args.steps * args.lm_batch + 64) * args.lm_seq)
        self.validation = self.pack(data.validation)[: args.eval_blocks]
        self.test = self.pack(data.test)[: args.eval_blocks]
        self.info = {"dataset": "shakespeare", "split_seed": 0, "source": data.info["source"],
                     "validation_plays": data.info["validation_plays"], "test_plays": data.info["test_plays"],
                     "batch": f"{self.batch} x {self.seq} tokens",
                     "train_blocks": len(self.train),
                     "eval_tokens": {"validation": int(self.validation.numel()), "test": int(self.test.numel())},
                     "trained": "attn.q/k/v/o, ffn.gate/up/down (weights); embeddings/tied head, norms frozen"}

    def pack(self, rows: list[dict], limit: int | None = None) -> torch.Tensor:
        """Chunks (+ eos) concatenated in their split order and cut into (blocks, seq)."""
        ids: list[int] = []
        for r in rows:
            ids += self.tokenizer(r["text"])["input_ids"] + [self.tokenizer.eos_token_id]
            if limit is not None and len(ids) >= limit:
                break
        n = len(ids) // self.seq
        return torch.tensor(ids[: n * self.seq]).view(n, self.seq)

    def model(self, seed: int) -> tuple[torch.nn.Module, int]:
        torch.manual_seed(seed)
        model = copy.deepcopy(self.base)
        return model, mark_trainable(model)

    def batches(self, seed: int, steps: int):
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * self.batch:
            order += torch.randperm(len(self.train), generator=g).tolist()
        for k in range(steps):
            ids = self.train[order[k * self.batch:(k + 1) * self.batch]]
            yield {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        blocks = self.validation if split == "validation" else self.test
        model.eval()
        nll, count = 0.0, 0
        for i in range(0, len(blocks), 8):
            ids = blocks[i:i + 8]
            out = model(input_ids=ids, labels=ids)
            n = ids.numel() - ids.shape[0]                # shifted targets
            nll += float(out.loss) * n
            count += n
        model.train()
        return {"perplexity": math.exp(nll / count), "loss": nll / count}


# ---- one run ---------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, label: str, lr: float, args: argparse.Namespace):
    spec = dict(OPTIMIZERS[label])
    name = spec.pop("name")
    if name != "adamw":
        spec.update(rank=args.rank, update_gap=args.update_gap, scale=args.scale)
    return build_optimizer(list(model.named_parameters()), name, lr=lr, weight_decay=0.0, **spec)


def run_one(task, label: str, lr: float, seed: int, args: argparse.Namespace, tag: str) -> dict:
    model, weights = task.model(seed)
    model.train()
    opt = make_optimizer(model, label, lr, args)
    losses, curve, state = [], [], None
    t0 = time.perf_counter()
    for step, batch in enumerate(task.batches(seed, args.steps), 1):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if state is None:
            state = optimizer_state_bytes(opt)
        if not math.isfinite(float(loss)):
            log(f"{tag}: loss {float(loss)} at step {step}: stopped")
            losses.append(float("nan"))
            break
        losses.append(float(loss))
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **task.evaluate(model, "validation")})
        if step % max(1, args.steps // 4) == 0:
            log(f"{tag}: step {step}/{args.steps} loss {float(loss):.3f} "
                f"({(time.perf_counter() - t0) / step:.2f} s/step)")
    diverged = len(losses) < args.steps or not all(math.isfinite(x) for x in losses)
    final = {"validation": curve[-1] if curve and curve[-1]["step"] == args.steps and not diverged
             else None, "test": None if diverged else task.evaluate(model, "test")}
    return {"task": task.name, "optimizer": label, "lr": lr, "seed": seed, "losses": losses,
            "curve": curve, "final": final, "diverged": diverged, "state_bytes": state,
            "trainable_matrix_weights": weights, "seconds": time.perf_counter() - t0}


def run_key(task: str, label: str, lr: float, seed: int) -> str:
    return f"{task}|{label}|{lr:g}|{seed}"


def score(run: dict, task) -> tuple[float, float]:
    """Sort key of a sweep run, lower is better (diverged runs last)."""
    v = run["final"]["validation"]
    if run["diverged"] or v is None:
        return (math.inf, math.inf)
    return (-v["accuracy"], v["loss"]) if task.metric == "accuracy" else (v["perplexity"], v["loss"])


# ---- time estimate ---------------------------------------------------------------------------------
def calibrate(task, labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one evaluation and, per optimiser, of a first step (GaLore: every projector
    computed) and a steady step (forward, backward and optimiser step), on one model copy."""
    model, _ = task.model(0)
    model.train()
    batches = list(task.batches(0, 3))

    def timed(opt, batch) -> float:
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    timed(make_optimizer(model, "adamw", 1e-9, args), batches[0])          # warm-up
    steps = {}
    for label in labels:
        opt = make_optimizer(model, label, 1e-9, args)
        first = timed(opt, batches[1])
        steady = timed(opt, batches[2])
        steps[label] = {"steady_s": steady, "refresh_s": max(0.0, first - steady)}
    t = time.perf_counter()
    task.evaluate(model, "validation")
    evaluate = time.perf_counter() - t
    return {"steps": steps, "eval_s": evaluate}


def estimate(cal: dict[str, Any], steps: int, n_lrs: int, n_seeds: int, eval_every: int,
             update_gap: int, optimizers: list[str], eval_scale: float = 1.0) -> float:
    runs_per_opt = n_lrs + max(0, n_seeds - 1)
    evals = math.ceil(steps / eval_every) + 1                    # curve points + the test split
    refreshes = math.ceil(steps / update_gap)
    total = 0.0
    for label in optimizers:
        c = cal["steps"].get(label) or cal["steps"].get("galore") or cal["steps"]["adamw"]
        per_run = steps * c["steady_s"] + refreshes * c["refresh_s"] + evals * cal["eval_s"] * eval_scale
        total += runs_per_opt * (per_run + 3.0)                 # + ~3 s to build each run's model
    return total


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ---- summaries -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (math.nan, math.nan)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[str, dict], task_name: str, label: str, lr: float, seeds: list[int],
              metric: str) -> dict:
    chosen = [runs[run_key(task_name, label, lr, s)] for s in seeds]
    steps = max(len(r["losses"]) for r in chosen)
    loss_mean, loss_std = [], []
    for k in range(steps):
        m, s = mean_std([r["losses"][k] for r in chosen if k < len(r["losses"])])
        loss_mean.append(m)
        loss_std.append(s)
    curve_steps = sorted({c["step"] for r in chosen for c in r["curve"]})
    curve = []
    for st in curve_steps:
        vals = [c[metric] for r in chosen for c in r["curve"] if c["step"] == st]
        m, s = mean_std(vals)
        curve.append({"step": st, "mean": m, "std": s, "n": len(vals)})
    finals = {}
    for split in ("validation", "test"):
        vals = [r["final"][split][metric] for r in chosen if r["final"][split] is not None]
        m, s = mean_std(vals)
        finals[split] = {"mean": m, "std": s, "n": len(vals), "values": vals}
    tail = max(1, steps // 10)
    last = [statistics.fmean(r["losses"][-tail:]) for r in chosen if not r["diverged"]]
    m, s = mean_std(last)
    return {"lr": lr, "seeds": seeds, "loss_mean": loss_mean, "loss_std": loss_std, "curve": curve,
            "final": finals, "final_train_loss": {"mean": m, "std": s, "last_steps": tail},
            "diverged": sum(r["diverged"] for r in chosen),
            "state_bytes": chosen[0]["state_bytes"]}


def verdicts(result: dict) -> dict:
    """Per task and Natural GaLore form: does the paper's direction hold? (Natural GaLore's final
    validation metric at least GaLore's; close to AdamW's; state within 1.2× GaLore's.)"""
    out: dict[str, dict] = {}
    for task_name, summary in result["summary"].items():
        metric = "accuracy" if task_name == "minilm" else "perplexity"
        sign = 1.0 if metric == "accuracy" else -1.0     # + when higher is better
        need = ("adamw", "galore")
        if not all(k in summary for k in need):
            continue
        adam, gal = (summary[k]["final"]["validation"] for k in need)
        tol = CLOSE[task_name][1]
        for label in ("natural-galore", "natural-ours"):
            if label not in summary:
                continue
            ng = summary[label]["final"]["validation"]
            vs_galore = sign * (ng["mean"] - gal["mean"])
            gap = sign * (adam["mean"] - ng["mean"])           # > 0: AdamW better
            allowed = max(tol if metric == "accuracy" else tol * adam["mean"], adam["std"])
            memory = summary[label]["state_bytes"] / summary["galore"]["state_bytes"]
            out.setdefault(task_name, {})[label] = {
                "ge_galore": bool(vs_galore >= 0), "diff_vs_galore": sign * vs_galore,
                "within_seed_std_of_galore": bool(abs(ng["mean"] - gal["mean"]) <= max(ng["std"], gal["std"])),
                "close_to_adamw": bool(gap <= allowed), "gap_to_adamw": gap, "allowed_gap": allowed,
                "state_x_galore": memory, "equal_memory": bool(memory <= 1.2),
                "holds": bool(vs_galore >= 0 and gap <= allowed and memory <= 1.2)}
    return out


# ---- Markdown and plot -------------------------------------------------------------------------------
def pm(d: dict, digits: int) -> str:
    if d is None or not math.isfinite(d.get("mean", math.nan)):
        return "—"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" + (f" (n={d['n']})" if d.get("n", 3) < 3 else "")


def write_markdown(result: dict, path: Path) -> None:
    s = result["settings"]
    lines = [f"# Natural GaLore vs GaLore vs AdamW at equal steps{' (--quick: a check, not a result)' if s['quick'] else ''}",
             "",
             (f"Written by `bench/natural_galore_tasks.py` ({result['date']}; {s['threads']} CPU threads, "
              f"wall time {fmt_time(result['seconds'])}). Issue 25, fix 1."),
             "",
             "## Settings",
             "",
             (f"* Steps {s['steps']} per run; seeds {s['seeds']} (seed: head init, dropout, data order; the "
              "data split is fixed, seed 0); weight decay 0; betas (0.9, 0.999)."),
             (f"* GaLore / Natural GaLore: rank {s['rank']}, update_gap {s['update_gap']}, scale {s['scale']} "
              "(GaLore's fine-tuning scale); history s 20; the gradient history is cleared at each refresh."),
             "* Optimisers (paper's forms first): " + "; ".join(f"`{k}` = {DESCRIPTION[k]}" for k in s["optimizers"]) + ".",
             f"* Learning rate chosen per optimiser from a sweep at seed {s['seeds'][0]} on the **validation** split "
             "(MiniLM: final accuracy; SmolLM2: final perplexity), then all seeds at that lr; the test "
             "split is never used for a choice. Sweeps: "
             + "; ".join(f"{t}: {s['lrs'][t]}" for t in s["tasks"]) + ".",
             ]
    for t in s["tasks"]:
        info = result["tasks"].get(t, {})
        lines.append(f"* {t}: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".")
    lines += ["", "## Final metrics (mean ± std over seeds)", ""]
    for t in s["tasks"]:
        summary = result["summary"].get(t)
        if not summary:
            continue
        metric = "accuracy %" if t == "minilm" else "perplexity"
        digits = 2
        pre = result.get("pretrained", {}).get(t)
        lines += [f"### {t}" + (f" (pretrained, untuned: validation perplexity {pre['validation']:.2f}, "
                                 f"test {pre['test']:.2f})" if pre else ""), "",
                  (f"| optimiser | lr | state MiB | × AdamW | validation {metric} | test {metric} | "
                   f"train loss (last {summary[next(iter(summary))]['final_train_loss']['last_steps']} steps) | diverged |"),
                  "|---|---|---|---|---|---|---|---|"]
        adam_state = summary.get("adamw", {}).get("state_bytes")
        for label, row in summary.items():
            ratio = f"{row['state_bytes'] / adam_state:.3f}" if adam_state else "—"
            lines.append(f"| {label} | {row['lr']:g} | {row['state_bytes'] / 2**20:.1f} | {ratio} | "
                         f"{pm(row['final']['validation'], digits)} | {pm(row['final']['test'], digits)} | "
                         f"{pm(row['final_train_loss'], 3)} | {row['diverged']}/{len(row['seeds'])} |")
        sweep = result["sweep"].get(t, {})
        edge = [label for label, row in summary.items()
                if len(s["lrs"][t]) > 1 and row["lr"] in (min(s["lrs"][t]), max(s["lrs"][t]))]
        if edge:
            lines += ["", (f"The chosen lr is at the edge of the sweep for {', '.join(edge)}: a wider sweep "
                           "might find a better one.")]
        lines += ["", "Sweep (validation " + ("accuracy" if t == "minilm" else "perplexity")
                  + f", seed {s['seeds'][0]}): " + "; ".join(
                      f"{label}: " + ", ".join(f"{lr} → {v}" for lr, v in sorted(vals.items(), key=lambda x: float(x[0])))
                      for label, vals in sweep.items()), ""]
    lines += ["![training loss and validation metric](" + path.with_suffix(".png").name + ")", "",
              "## Does the paper's direction reproduce?", "",
              "The paper (Das, 2024) claims Natural GaLore trains better than GaLore at the same memory and "
              "comes close to AdamW. Tested per task on the final validation metric: (a) Natural GaLore's "
              "mean ≥ GaLore's, (b) within "
              + ", ".join(f"{t}: {CLOSE[t][1]} {CLOSE[t][0]}" for t in TASKS)
              + " of AdamW's mean (or AdamW's seed std if larger), (c) optimiser state ≤ 1.2 × GaLore's.", ""]
    v = result["verdicts"]
    for t, forms in v.items():
        for label, x in forms.items():
            unit = "accuracy points" if t == "minilm" else "perplexity"
            lines.append(f"* {t}, {label}: (a) {'yes' if x['ge_galore'] else 'no'} ({unit} {x['diff_vs_galore']:+.3g} "
                         f"vs GaLore{', inside the seed std' if x['within_seed_std_of_galore'] else ''}); (b) "
                         f"{'yes' if x['close_to_adamw'] else 'no'} ({'behind' if x['gap_to_adamw'] > 0 else 'ahead of'} AdamW by {abs(x['gap_to_adamw']):.3g} {unit}, "
                         f"allowed {x['allowed_gap']:.3g}); (c) {'yes' if x['equal_memory'] else 'no'} "
                         f"(state {x['state_x_galore']:.2f} × GaLore's).")
    lines += ["", closing_sentence(result), ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def closing_sentence(result: dict) -> str:
    v = result["verdicts"]
    tasks = list(v)
    if not tasks:
        return "Natural GaLore (Das, 2024): no verdict (the runs needed for one are missing)."
    paper = [v[t].get("natural-galore", {}).get("holds") for t in tasks]
    ours = [v[t].get("natural-ours", {}).get("holds") for t in tasks]
    where = " and ".join(tasks)
    caveat = " (from a --quick check: not evidence)" if result["settings"]["quick"] else ""
    if all(paper):
        return (f"Natural GaLore (Das, 2024): reproduced{caveat} — on {where}, the paper's form (one-sided, "
                "absolute λ 1e-3) matched or beat GaLore at ≤ 1.2 × its state and came close to AdamW.")
    failed = [f"{t} ({', '.join(k for k, ok in (('below GaLore', v[t]['natural-galore']['ge_galore']), ('not close to AdamW', v[t]['natural-galore']['close_to_adamw']), ('more state than GaLore', v[t]['natural-galore']['equal_memory'])) if not ok)})"
              for t, ok in zip(tasks, paper, strict=True) if not ok and "natural-galore" in v[t]]
    if all(ours):
        return (f"Natural GaLore (Das, 2024): reproduced with changes{caveat} — the paper's form fails on "
                f"{'; '.join(failed)}, but with the two-sided (r×r core) projection and relative damping λ 1 "
                f"Natural GaLore matched or beat GaLore at ≤ 1.2 × its state and came close to AdamW on {where}.")
    return (f"Natural GaLore (Das, 2024): not reproduced{caveat} — the paper's form fails on {'; '.join(failed)}"
            f", and our variant (two-sided, relative λ 1) fails on "
            + ", ".join(t for t, ok in zip(tasks, ours, strict=True) if not ok) + ".")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in result["settings"]["tasks"] if result["summary"].get(t)]
    if not tasks:
        return
    fig, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7.5), squeeze=False)
    for j, t in enumerate(tasks):
        for label, row in result["summary"][t].items():
            m = torch.tensor(row["loss_mean"], dtype=torch.float64)
            sd = torch.tensor(row["loss_std"], dtype=torch.float64)
            w = max(1, min(10, len(m) // 10))                # moving average over w steps
            kernel = torch.ones(w, dtype=torch.float64) / w
            ms, ss = (torch.nn.functional.conv1d(v.view(1, 1, -1), kernel.view(1, 1, -1)).view(-1)
                      for v in (m, sd))
            x = torch.arange(w, len(m) + 1)
            axes[0][j].plot(x, ms, label=f"{label} (lr {row['lr']:g})")
            axes[0][j].fill_between(x, ms - ss, ms + ss, alpha=0.2)
            cs = [c["step"] for c in row["curve"]]
            cm = torch.tensor([c["mean"] for c in row["curve"]])
            cd = torch.tensor([c["std"] for c in row["curve"]])
            axes[1][j].errorbar(cs, cm, yerr=cd, marker="o", capsize=3, label=label)
        axes[0][j].set_title(f"{t}: training loss (mean ± std over seeds, {w}-step average)")
        axes[0][j].set_xlabel("step")
        axes[0][j].legend(fontsize=8)
        axes[1][j].set_title(f"{t}: validation {'accuracy %' if t == 'minilm' else 'perplexity'}")
        axes[1][j].set_xlabel("step")
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 seed, 1 lr, tiny eval: a check")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=FULL["steps"])
    ap.add_argument("--seeds", default=",".join(map(str, FULL["seeds"])))
    ap.add_argument("--lrs-minilm", default=",".join(map(str, FULL["lrs"]["minilm"])))
    ap.add_argument("--lrs-smollm2", default=",".join(map(str, FULL["lrs"]["smollm2"])))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--update-gap", type=int, default=50)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--eval-every", type=int, default=FULL["eval_every"])
    ap.add_argument("--eval-rows", type=int, default=0, help="MiniLM: first N validation/test rows (0: all 1000)")
    ap.add_argument("--lm-batch", type=int, default=2)
    ap.add_argument("--lm-seq", type=int, default=64)
    ap.add_argument("--eval-blocks", type=int, default=FULL["eval_blocks"],
                    help="SmolLM2: held-out blocks of --lm-seq tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the shared 2-core machine 2 threads ran 4-6x slower, SVDs up to 20x)")
    ap.add_argument("--estimate-only", action="store_true", help="calibrate, print the estimates, exit")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in <out>.json")
    ap.add_argument("--out", default=None,
                    help="output stem (default docs/results/natural_galore; --quick: /tmp/natural_galore_quick)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_rows, args.eval_blocks = 4, 2, 64, 4
        args.seeds = args.seeds.split(",")[0]
        args.lrs_minilm = args.lrs_minilm.split(",")[len(args.lrs_minilm.split(",")) // 2]
        args.lrs_smollm2 = args.lrs_smollm2.split(",")[len(args.lrs_smollm2.split(",")) // 2]
        args.update_gap = 2                               # exercise a projector refresh
    out = Path(args.out or ("/tmp/natural_galore_quick" if args.quick else "docs/results/natural_galore"))
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    labels = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    seeds = [int(x) for x in args.seeds.split(",")]
    lrs = {"minilm": floats(args.lrs_minilm), "smollm2": floats(args.lrs_smollm2)}
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {TASKS}")
    for o in labels:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}; choose from {tuple(OPTIMIZERS)}")
    settings = {"quick": args.quick, "tasks": tasks, "optimizers": labels, "steps": args.steps,
                "seeds": seeds, "lrs": {t: lrs[t] for t in tasks}, "rank": args.rank,
                "update_gap": args.update_gap, "scale": args.scale, "eval_every": args.eval_every,
                "eval_rows": args.eval_rows, "lm_batch": args.lm_batch, "lm_seq": args.lm_seq,
                "eval_blocks": args.eval_blocks, "threads": args.threads, "weight_decay": 0.0,
                "optimizer_options": {k: OPTIMIZERS[k] for k in labels}}

    log(f"loading {', '.join(tasks)}")
    built = {"minilm": MiniLMTask, "smollm2": SmolLM2Task}
    task_objs = {t: built[t](args) for t in tasks}

    # ---- time estimate before starting ----
    total, full_total = 0.0, 0.0
    result_calibration: dict[str, Any] = {}
    for t, task in task_objs.items():
        # --quick: AdamW and GaLore only (each GaLore refresh costs ~15 s on SmolLM2); the
        # Natural GaLore variants are then estimated at GaLore's cost.
        cal = calibrate(task, ["adamw", "galore"] if args.quick else list(OPTIMIZERS), args)
        now = estimate(cal, args.steps, len(lrs[t]), len(seeds), args.eval_every, args.update_gap, labels)
        # The full default run: its eval sets are larger than --quick's (eval time scales with them).
        scale = (1000 / args.eval_rows if t == "minilm" and args.eval_rows else
                 FULL["eval_blocks"] / args.eval_blocks if t == "smollm2" else 1.0)
        full = estimate(cal, FULL["steps"], 3, 3, FULL["eval_every"], 50, list(OPTIMIZERS), eval_scale=scale)
        total += now
        full_total += full
        log(f"{t}: s/step " + ", ".join(f"{k} {v['steady_s']:.2f}" for k, v in cal["steps"].items())
            + "; projector refresh s " + ", ".join(f"{k} {v['refresh_s']:.1f}" for k, v in cal["steps"].items()
                                                 if k != "adamw")
            + f"; eval {cal['eval_s']:.1f} s -> this run ~{fmt_time(now)}, full default run ~{fmt_time(full)}")
        result_calibration[t] = cal
    log(f"estimate: this run ~{fmt_time(total)}; the full default run (2 tasks x 4 optimizers x (3 lrs + "
        f"2 seeds) x 200 steps) ~{fmt_time(full_total)} on this machine ({args.threads} threads)")
    print(f"estimated time: this run ~{fmt_time(total)}, full default run ~{fmt_time(full_total)}")
    if args.estimate_only:
        return 0

    runs: dict[str, dict] = {}
    js = out.with_suffix(".json")
    if args.resume and js.exists():
        old = json.loads(js.read_text())
        if {k: v for k, v in old["settings"].items() if k != "threads"} == \
                {k: v for k, v in settings.items() if k != "threads"}:
            runs = {run_key(r["task"], r["optimizer"], r["lr"], r["seed"]): r for r in old["runs"]}
            log(f"resuming: {len(runs)} runs from {js}")
        else:
            log(f"not resuming: {js} has other settings")
    result: dict[str, Any] = {"settings": settings, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "tasks": {t: task.info for t, task in task_objs.items()}, "sweep": {},
                              "chosen_lr": {}, "summary": {}, "verdicts": {}, "pretrained": {}, "runs": [],
                              "calibration": result_calibration,
                              "estimate_s": {"this_run": total, "full_default_run": full_total}}
    js.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: bool) -> None:
        result["runs"] = list(runs.values())
        result["partial"] = partial
        result["seconds"] = time.perf_counter() - _T0
        js.write_text(json.dumps(result, indent=1))

    def get(task, label: str, lr: float, seed: int) -> dict:
        key = run_key(task.name, label, lr, seed)
        if key not in runs:
            runs[key] = run_one(task, label, lr, seed, args, tag=f"{task.name} {label} lr {lr:g} seed {seed}")
            r = runs[key]
            v = r["final"]["validation"]
            log(f"{task.name} {label} lr {lr:g} seed {seed}: {r['seconds']:.0f} s, validation "
                f"{task.metric} {v[task.metric]:.3f}" if v else f"{task.name} {label} lr {lr:g} seed {seed}: diverged")
            save(partial=True)
        return runs[key]

    for t, task in task_objs.items():
        if t == "smollm2":
            model = task.base
            result["pretrained"][t] = {s: task.evaluate(model, s)["perplexity"] for s in ("validation", "test")}
            log(f"smollm2 pretrained perplexity: {result['pretrained'][t]}")
        result["sweep"][t], result["chosen_lr"][t], result["summary"][t] = {}, {}, {}
        for label in labels:
            sweep = {lr: get(task, label, lr, seeds[0]) for lr in lrs[t]}
            best = min(sweep, key=lambda lr: score(sweep[lr], task))
            result["sweep"][t][label] = {
                f"{lr:g}": (None if r["final"]["validation"] is None else round(r["final"]["validation"][task.metric], 4))
                for lr, r in sweep.items()}
            result["chosen_lr"][t][label] = best
            for seed in seeds[1:]:
                get(task, label, best, seed)
            result["summary"][t][label] = summarise(runs, t, label, best, seeds, task.metric)
    result["verdicts"] = verdicts(result)
    save(partial=False)
    write_markdown(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))

    for t in tasks:
        summary = result["summary"][t]
        metric = task_objs[t].metric
        adam = summary.get("adamw", {}).get("state_bytes")
        body = []
        for label, row in summary.items():
            body.append((label, f"{row['lr']:g}", f"{row['state_bytes'] / 2**20:.1f}",
                         f"{row['state_bytes'] / adam:.3f}" if adam else "-",
                         pm(row["final"]["validation"], 2), pm(row["final"]["test"], 2),
                         pm(row["final_train_loss"], 3)))
        print(f"\n{t}: {args.steps} steps, seeds {seeds}, final {metric} (mean ± std)")
        print_columns(("optimizer", "lr", "state MiB", "x adamw", f"val {metric}", f"test {metric}",
                       "train loss (tail)"), body)
    print("\n" + closing_sentence(result))
    print(f"\nwrote {js}, {out.with_suffix('.md')}, {out.with_suffix('.png')} "
          f"[{fmt_time(time.perf_counter() - _T0)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
