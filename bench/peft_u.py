"""Personalisation, PEFT-U style: one adapter per user on one base, served in one mixed batch.

The users read the same kind of text (Rotten Tomatoes reviews) but label it their own way:
  critic       1 when the review is positive (the dataset's label)
  contrarian   1 when it is negative (the opposite taste)
  skimmer      1 when it is longer than the median training review (in words), whatever it says
Each user owns a disjoint slice of the training reviews, labelled by their rule.

Adapters (MiniLM-L6, LoRA r 8 on attn.q, attn.v, each with its own copy of the classification head):
  one per user    trained on that user's slice, STEPS steps
  shared          one adapter of the same shape trained on the union of the slices (each row with
                  its owner's label), 3 × STEPS steps: as many examples per user as a user's own
All with `peftlab.train`, batch 16, lr 2e-3 (the CLI's MiniLM default), seed 0, the same start.

Scored on the first N held-out test reviews, labelled by every user's rule: the accuracy of every
adapter for every user. Then served: the adapters are saved, a fresh base loads them lazily
through `AdapterBank`, and the test reviews go through in mixed batches where review i belongs
to user i mod 3 and is routed to that user's adapter (`adapter_ids=`); the mixed predictions are
checked against the single-adapter runs and the logits against them within 1e-5.

Usage: python bench/peft_u.py [--steps 300] [--per-user 2000] [--eval-size 1000]
                              [--out docs/results/peft_u]          (~10 min on 2 cores)
Writes OUT.md (the tables) and OUT.json (the numbers plus the environment).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import peftlab
from peftlab.apps.recipes import MODEL_DEFAULTS, build_job
from peftlab.training.loop import TrainConfig, train

sys.path.insert(0, str(Path(__file__).parent))
from common import print_columns  # bench/common.py

MAX_LENGTH = 64
USERS = ("critic", "contrarian", "skimmer")
SHARED = "shared"


def user_labels(rows: list[dict], median_words: float) -> dict[str, list[int]]:
    """Every user's label for every row."""
    sentiment = [int(r["label"]) for r in rows]
    return {"critic": sentiment,
            "contrarian": [1 - s for s in sentiment],
            "skimmer": [int(len(r["text"].split()) > median_words) for r in rows]}


def relabel(rows: list[dict], labels: list[int]) -> list[dict]:
    return [{"text": r["text"], "label": y} for r, y in zip(rows, labels, strict=True)]


def adapter_config() -> peftlab.LoraConfig:
    return peftlab.LoraConfig(r=8, alpha=16, targets=["attn.q", "attn.v"], modules_to_save=["head"])


@torch.no_grad()
def logits_of(am, task, rows: list[dict], adapter_ids: list[str] | None, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, 2) of the rows: with the active adapter, or example i routed to adapter_ids[i]."""
    out = []
    for i in range(0, len(rows), batch_size):
        batch = task.collate(rows[i:i + batch_size])
        batch.pop("labels")
        ids = None if adapter_ids is None else adapter_ids[i:i + batch_size]
        out.append(am(**batch, adapter_ids=ids).logits)
    return torch.cat(out).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of a user's adapter")
    ap.add_argument("--per-user", type=int, default=2000, help="training reviews each user owns")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/peft_u")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    started = time.perf_counter()
    model, _tok, task, data = build_job("minilm", "sentiment", seed=args.seed, max_length=MAX_LENGTH)
    if len(USERS) * args.per_user > len(data.train):
        raise SystemExit(f"--per-user {args.per_user}: {len(USERS)} users need "
                         f"{len(USERS) * args.per_user} training reviews, there are {len(data.train)}")
    median_words = statistics.median(len(r["text"].split()) for r in data.train)
    slices = {u: data.train[i * args.per_user:(i + 1) * args.per_user] for i, u in enumerate(USERS)}
    train_rows = {u: relabel(rows, user_labels(rows, median_words)[u]) for u, rows in slices.items()}
    test = data.test[:args.eval_size]
    test_labels = user_labels(test, median_words)

    am = peftlab.adapt(model)
    lr = MODEL_DEFAULTS["minilm"]["lr"]
    runs = {}
    plan = [(u, train_rows[u], args.steps) for u in USERS]
    shared_rows = [r for u in USERS for r in train_rows[u]]
    plan.append((SHARED, shared_rows, len(USERS) * args.steps))
    for name, rows, steps in plan:
        print(f"== {name}: {len(rows)} rows, {steps} steps ==", flush=True)
        torch.manual_seed(args.seed)    # the same LoRA start for every adapter
        am.add_adapter(name, adapter_config())
        am.set_active([name])
        am.set_trainable(name)
        result = train(am, name, task, rows, None,
                       TrainConfig(steps=steps, batch_size=16, lr=lr, seed=args.seed,
                                   progress=not args.quiet))
        am.set_trainable(None)
        runs[name] = {"rows": len(rows), "steps": steps, "seconds": round(result.seconds, 1),
                      "loss_first": sum(result.losses[:10]) / 10, "loss_last": sum(result.losses[-20:]) / 20}
    am.eval()

    # every adapter, for every user's labels of the test reviews
    single = {}
    accuracy: dict[str, dict[str, float]] = {}
    for name in (*USERS, SHARED):
        am.set_active([name])
        single[name] = logits_of(am, task, test, None)
        pred = single[name].argmax(-1)
        accuracy[name] = {u: float((pred == torch.tensor(test_labels[u])).float().mean()) for u in USERS}

    # served: saved, loaded lazily by a bank on a fresh base, one mixed batch for all users
    owner = [USERS[i % len(USERS)] for i in range(len(test))]
    with tempfile.TemporaryDirectory(prefix="peft_u_") as tmp:
        for name in (*USERS, SHARED):
            am.save_adapter(Path(tmp) / name, name)
        fresh, *_ = build_job("minilm", "sentiment", seed=args.seed + 1, max_length=MAX_LENGTH)
        served = peftlab.adapt(fresh).eval()
        bank = peftlab.AdapterBank(served, tmp, max_adapters=len(USERS))
        with bank.using(USERS):
            mixed = logits_of(served, task, test, owner)
    own = torch.stack([single[u][i] for i, u in enumerate(owner)])
    max_diff = float((mixed - own).abs().max())
    same_predictions = bool((mixed.argmax(-1) == own.argmax(-1)).all())

    def on_own_reviews(logits: torch.Tensor) -> dict[str, float]:
        """Each user's accuracy on the reviews sent for them (owner), under their own labels."""
        pred = logits.argmax(-1).tolist()
        return {u: sum(pred[i] == test_labels[u][i] for i in range(len(test)) if owner[i] == u)
                / owner.count(u) for u in USERS}

    mixed_accuracy = on_own_reviews(mixed)
    shared_on_owner = on_own_reviews(single[SHARED])

    # --- report ---
    head = ("adapter \\ user's labels", *USERS, "mean")
    body = [(name, *(f"{accuracy[name][u]:.4f}" for u in USERS),
             f"{statistics.mean(accuracy[name].values()):.4f}") for name in (*USERS, SHARED)]
    own_row = ("own adapter", *(f"{accuracy[u][u]:.4f}" for u in USERS),
               f"{statistics.mean(accuracy[u][u] for u in USERS):.4f}")
    print()
    print_columns(head, [*body, own_row])
    serve_head = ("user", "reviews in the mixed batch", "own adapter, mixed batch", "shared adapter")
    serve_body = [(u, str(owner.count(u)), f"{mixed_accuracy[u]:.4f}", f"{shared_on_owner[u]:.4f}") for u in USERS]
    print()
    print_columns(serve_head, serve_body)
    print(f"\nmixed batch vs single-adapter runs: max |logit diff| {max_diff:.2e}, "
          f"same predictions: {same_predictions}; bank loads {bank.loads}")
    better = {u: accuracy[u][u] - accuracy[SHARED][u] for u in USERS}
    env = {"peftlab": peftlab.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "median_words": median_words,
           "seconds": round(time.perf_counter() - started, 1), **vars(args)}
    lines = [
        "# Personalisation (PEFT-U style): one adapter per user, served in one mixed batch", "",
        (f"`python bench/peft_u.py` (torch {env['torch']}, {env['threads']} threads, seed {args.seed}, "
        f"{env['seconds']:.0f} s). Base: all-MiniLM-L6-v2 with a new two-way head. Users label "
        "Rotten Tomatoes reviews their own way: `critic` = the review is positive, `contrarian` = "
        f"it is negative, `skimmer` = it is longer than the median training review ({median_words:g} "
        f"words). Each owns {args.per_user} training reviews (disjoint slices). A user's adapter: "
        f"LoRA r 8 on attn.q, attn.v with its own head copy, {args.steps} steps, batch 16, lr {lr:g}. "
        f"Shared: the same shape on the union of the slices with their owners' labels, "
        f"{len(USERS) * args.steps} steps (as many examples per user)."), "",
        (f"Accuracy on the first {len(test)} held-out test reviews, labelled by each user's rule "
        "(rows: adapter, columns: whose labels):"), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in [*body, own_row]]
    lines += ["", ("Served: the adapters saved, the users' three loaded lazily by `AdapterBank` into a "
              f"fresh base, review i sent for user i mod {len(USERS)} and routed to that user's adapter in mixed "
              "batches of 64 (`adapter_ids=`):"), "",
              "| " + " | ".join(serve_head) + " |", "|" + "---|" * len(serve_head)]
    lines += ["| " + " | ".join(r) + " |" for r in serve_body]
    lines += ["", ("Mixed batches against the same reviews run with only their owner's adapter active, "
              f"in the training process: max |logit difference| {max_diff:.1e}, same predictions: "
              f"{'yes' if same_predictions else 'no'}."), "",
              "Own adapter minus shared adapter, per user: "
              + ", ".join(f"{u} {100 * d:+.1f} pt" for u, d in better.items()) + ". "
              + ("Every user is served better by their own adapter." if all(d > 0 for d in better.values())
                 else "Not every user is served better by their own adapter."),
              "", ("The shared adapter sees the same reviews with contradicting labels (critic and "
              "contrarian disagree on every one), so the best it can do for those two is to side with "
              "one of them or with neither; a per-user adapter has no such conflict. The skimmer's rule (length) is "
              "independent of sentiment, so it is the one consistent signal in the union, and the shared "
              "adapter learns it nearly as well as the skimmer's own.")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"env": env, "training": runs, "accuracy": accuracy, "mixed_accuracy": mixed_accuracy,
         "shared_on_owner": shared_on_owner, "max_logit_diff": max_diff,
         "same_predictions": same_predictions}, indent=2) + "\n")
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
