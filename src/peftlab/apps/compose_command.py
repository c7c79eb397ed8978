"""`peftlab compose`: saved adapters combined into a new one (peftlab.compose's operators and
merges), the option checks made before anything loads, and the run record that lets `eval` and
`generate` take the result as they take a trained adapter."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from ..core.errors import PeftlabError
from .recipes import (
    CHECKPOINT_NAMES,
    POSITIVE,
    SEED,
    RunOutput,
    base_for_adapter,
    base_for_run,
    find_adapter,
    prune_plan,
    read_run_record,
    recorded_model,
    same_model,
    write_run_record,
)

# The operators and merges of peftlab.compose, listed here so that `--help` does not import torch
# (tests/test_cli_compose.py checks they are compose's).
COMPOSE_OPERATORS = ("add", "subtract", "negate", "scale", "analogy")
RULES = ("ties", "dare", "dare_ties", "magnitude")
COMPOSE_MERGES = ("linear", *RULES, *(f"{m}_{way}" for way in ("svd", "factors") for m in RULES))
# op -> (number of adapter directories, how to call it), for the ops that take a fixed number.
COMPOSE_ARITY = {"negate": (1, "negate ADAPTER"), "scale": (1, "scale ADAPTER --weights FACTOR"),
                 "subtract": (2, "subtract A B (A − B)"),
                 "analogy": (3, "analogy A B C [--weights L1,L2] (L1·A + L2·(B − C))")}


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    weights = []
    for part in text.split(","):
        try:
            weights.append(float(part))
        except ValueError:
            raise PeftlabError(f"--weights {text!r}: {part.strip()!r} is not a number; give "
                               "comma-separated numbers, e.g. --weights 0.5,0.5") from None
        if not math.isfinite(weights[-1]):
            raise PeftlabError(f"--weights {text!r}: weights must be finite numbers")
    return weights


def _check_compose_request(args: argparse.Namespace) -> list[float] | None:
    """The --weights as floats, or a clear error when the op does not fit the other arguments."""
    op, n = args.op, len(args.adapters)
    if op in COMPOSE_ARITY:
        want, usage = COMPOSE_ARITY[op]
        if n != want:
            raise PeftlabError(f"--op {op} takes {want} adapter director{'y' if want == 1 else 'ies'} "
                               f"({usage}); got {n}")
    elif n < 2:
        raise PeftlabError(f"--op {op} combines two or more adapter directories; got {n}")
    weights = parse_weights(args.weights)
    expected = {"negate": 0, "subtract": 0, "scale": 1, "analogy": 2}.get(op, n)
    if op == "scale" and weights is None:
        raise PeftlabError("--op scale needs the factor: --weights FACTOR (e.g. --weights 0.5)")
    if weights is not None and len(weights) != expected:
        if expected == 0:
            raise PeftlabError(f"--op {op} takes no --weights (its weights are fixed); use --op "
                               f"{'scale' if op == 'negate' else 'add'} for other weights")
        what = {"scale": "one factor", "analogy": "two weights L1,L2 (L1·A + L2·(B − C))"}.get(
            op, f"one weight per adapter directory ({n})")
        raise PeftlabError(f"--op {op} takes {what}; got {len(weights)} weights ({args.weights})")
    merge = op in COMPOSE_MERGES
    if merge and args.mode == "parameter":
        raise PeftlabError(f"--mode parameter is for add/subtract/negate/scale/analogy; --op {op} "
                           "merges in delta space (use --op add --mode parameter for the paper's rule)")
    if args.rank is not None and op in ("negate", "scale"):
        raise PeftlabError(f"--op {op} keeps the adapter's rank; --rank is for ops that combine "
                           "several adapters")
    if args.density is not None and not (merge and op != "linear"):
        raise PeftlabError(f"--density is for --op magnitude, ties, dare or dare_ties (and their _svd / "
                           f"_factors forms), not {op}")
    if args.seed is not None and not op.startswith("dare"):
        raise PeftlabError(f"--seed (DARE's drop masks) is for --op dare or dare_ties (and their _svd / "
                           f"_factors forms), not {op}")
    if args.lam is not None and not merge:
        raise PeftlabError(f"--lam scales a merged task vector; it is for the merges, not {op} "
                           "(use --op scale to scale one adapter)")
    if args.lam is not None and not math.isfinite(args.lam):
        raise PeftlabError(f"--lam must be a finite number, got {args.lam}")
    return weights


def rank_value(text: str) -> int | str:
    """--rank: a positive whole number, or 'full' (no truncation)."""
    return text if text == "full" else POSITIVE(text)


def adapter_name(directory: Path, taken: set[str]) -> str:
    """A valid, unused adapter name from a directory name (RUN/last -> RUN)."""
    import torch
    stem = directory.name
    if stem in CHECKPOINT_NAMES and directory.parent.name:
        stem = directory.parent.name
    name = re.sub(r"[^0-9A-Za-z_-]", "_", stem) or "adapter"
    if hasattr(torch.nn.ModuleDict(), name):   # adapters are keys of ModuleDicts: no attribute names
        name = f"adapter_{name}"
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique)
    return unique


def cmd_compose(args: argparse.Namespace) -> int:
    import warnings

    from ..compose import add, analogy, merge_adapters, negate, scale, subtract

    weights = _check_compose_request(args)
    RunOutput(Path(args.out))   # refuses an --out that cannot be written, before any work
    inputs = [find_adapter(a) for a in args.adapters]
    runs = [None if record is None else read_run_record(record) for _, record in inputs]
    for (_, record), run in zip(inputs, runs, strict=True):
        if run is not None and ("model" not in run or "task" not in run):
            raise PeftlabError(f"{record} names no model and task: it is not a run record of "
                               "peftlab train or compose")
    (first_dir, _), first = inputs[0], runs[0]
    models = [recorded_model(d, run) for (d, _), run in zip(inputs, runs, strict=True)]
    for (d, _), model in zip(inputs[1:], models[1:], strict=True):
        if model and models[0] and not same_model(model, models[0]):
            raise PeftlabError(f"{d} was trained on model {model!r} but {first_dir} on "
                               f"{models[0]!r}: composition needs adapters of one base model")
    plans = [prune_plan(d) for d, _ in inputs]
    for (d, _), plan in zip(inputs[1:], plans[1:], strict=True):
        if (plan and plan.to_dict()) != (plans[0] and plans[0].to_dict()):
            raise PeftlabError(f"{d} and {first_dir} were trained on differently pruned bases (their "
                               "Light-PEFT prune plans differ): they cannot be combined")
    out = Path(args.out)
    for d, record in inputs:
        if out.resolve() in (d.resolve(), *([] if record is None else [record.parent.resolve()])):
            raise PeftlabError(f"--out {out} would overwrite the input {d} (or its run record); "
                               "choose a new directory")
    # a run rebuilds its base as trained (the seed draws a new head); a bare adapter its record's
    am = (base_for_run(first, first_dir, model=args.model)[0] if first is not None
          else base_for_adapter(first_dir, args.model))
    taken: set[str] = set()
    names = [adapter_name(d, taken) for d, _ in inputs]
    for (d, _), name in zip(inputs, names, strict=True):
        am.load_adapter(d, name)
    copies = [am.adapters[n].copies for n in names]
    seeds = {run.get("seed") for run in runs if run is not None}
    if any(copies) and len(seeds) > 1:
        raise PeftlabError(f"the inputs were trained with different seeds ({sorted(seeds, key=str)}) and "
                           f"train whole modules ({', '.join(next(c for c in copies if c))}), e.g. a "
                           "classification head that the seed draws: their bases differ. Compose "
                           "adapters trained with the same --seed")
    name = adapter_name(out, taken)
    mode = args.mode or "delta"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.op == "add":
            adapter = add(am, names, weights, name=name, mode=mode, rank=args.rank)
        elif args.op == "negate":
            adapter = negate(am, names[0], name=name, mode=mode)
        elif args.op == "scale":
            adapter = scale(am, names[0], weights[0], name=name, mode=mode)
        elif args.op == "subtract":
            adapter = subtract(am, *names, name=name, mode=mode, rank=args.rank)
        elif args.op == "analogy":
            adapter = analogy(am, *names, name=name, weights=tuple(weights or (1.0, 1.0)),
                              mode=mode, rank=args.rank)
        else:
            adapter = merge_adapters(am, names, name=name, how=args.op, weights=weights,
                                     density=0.5 if args.density is None else args.density,
                                     seed=args.seed or 0, rank=args.rank,
                                     lam=1.0 if args.lam is None else args.lam)
    for w in caught:
        print(f"peftlab compose: warning: {w.message}", file=sys.stderr)

    am.save_adapter(out, name)
    if plans[0] is not None:
        from ..training.pruning import save_plan
        save_plan(out, plans[0])
    p = adapter.provenance
    record = None
    if first is not None:   # eval and generate take the result as they take a trained adapter
        run = {k: v for k, v in first.items() if k not in ("after", "steps", "seconds", "composed")}
        run["model"] = args.model or run["model"]
        run["composed"] = {
            "op": args.op, "inputs": [str(d.resolve()) for d, _ in inputs],
            "weights": [i["weight"] for i in p["inputs"]], "mode": p["mode"], "merge": p["merge"],
            **{k: p[k] for k in ("density", "seed", "lam") if p.get(k) is not None},
            **({"rank": args.rank} if args.rank is not None else {}),
        }
        record = write_run_record(out, run)
    print(am.card(name))
    if p.get("form") == "dense":
        print(f"{p['merge']} at full rank: exact, no truncation (rank {p['rank']})")
    if p.get("form") == "svd":
        err = p["svd_relative_error"]
        print(f"SVD truncation ({'rank ' + str(args.rank) if args.rank else 'sum of the input ranks'}): "
              f"relative error max {err['max']:.3e}, mean {err['mean']:.3e} over {len(err['per_site'])} sites")
    print(f"adapter saved: {out}" + (f"  (run record: {record})" if record else ""))
    return 0


def add_compose_parser(sub: argparse._SubParsersAction) -> None:
    """The `compose` subcommand's options."""
    p = sub.add_parser("compose", help="combine saved adapters (arithmetic, TIES/DARE merges) into a new one")
    p.add_argument("--op", required=True, choices=COMPOSE_OPERATORS + COMPOSE_MERGES,
                   help="add, subtract (A − B), negate, scale (--weights FACTOR), analogy (A + (B − C)); "
                        "or a merge: linear, ties, dare, dare_ties, magnitude; for LoRA adapters "
                        "RULE_svd (the rule on dense ΔW, re-factored: what the plain name does) or "
                        "RULE_factors (peft's: the rule on A and B separately, at the inputs' rank)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="adapter directories written by peftlab train (RUN/last), compose, "
                        "am.save_adapter or peft")
    p.add_argument("--weights", default=None,
                   help="comma-separated weights, one per adapter (default 1/N); scale: the factor; "
                        "analogy: L1,L2")
    p.add_argument("--mode", choices=["delta", "parameter"], default=None,
                   help="delta (default; exact ΔW arithmetic) or parameter (LoRA factors combined "
                        "separately, the paper's rule)")
    p.add_argument("--rank", type=rank_value, default=None,
                   help="re-factor LoRA results by truncated SVD at this rank (merges default to the "
                        "sum of the input ranks; the error is printed), or 'full': exact, no truncation")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of entries kept by magnitude/ties/dare/dare_ties (default 0.5)")
    p.add_argument("--seed", type=SEED, default=None, help="seed of DARE's drop masks (default 0)")
    p.add_argument("--lam", type=float, default=None,
                   help="scale of the merged task vector (TIES's λ; default 1)")
    p.add_argument("--out", required=True, help="directory for the new adapter and its run.json")
    p.add_argument("--model", default=None,
                   help="the base model (smollm2, minilm or a local directory) when the adapters' "
                        "records name none that exists here")
    p.set_defaults(run=cmd_compose)
