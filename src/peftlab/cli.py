"""The `peftlab` command. Each subcommand is a function `cmd_<name>(args)` registered in `main`."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from .errors import PeftlabError


# The optimiser names of peftlab.optim, listed here so that `--help` does not import torch.
OPTIMIZER_CHOICES = ("adamw", "galore", "natural-galore", "loraplus")
# |z| above which an FFN activation counts as active in the reported density: GELU and SiLU are
# never exactly 0 (except far in their negative tail), so an exact count says little for them.
DEFAULT_DENSITY_THRESHOLD = 1e-2


def load_model_skeleton(path: str):
    """The model class a local transformers directory declares, built on the meta device: the
    module tree without reading or allocating any weights."""
    import torch
    import transformers

    if not Path(path).is_dir():
        raise PeftlabError(f"--model {path!r} is not a directory; give a local transformers model "
                           "directory (with config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"cannot read a transformers config in {path}: {e}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _compress(paths: list[str]) -> list[str]:
    """'model.layers.{0-29}.self_attn.q_proj' for a run of paths that differ in the layer index."""
    from .sites import layer_index
    groups: dict[str, list[int]] = {}
    singles = []
    for p in paths:
        idx = layer_index(p)
        if idx is None:
            singles.append(p)
            continue
        parts = p.split(".")
        at = next(i for i, part in enumerate(parts) if part.isdigit())
        groups.setdefault(".".join(parts[:at] + ["{}"] + parts[at + 1:]), []).append(idx)
    out = []
    for template, idx in groups.items():
        idx = sorted(idx)
        span = str(idx[0]) if len(idx) == 1 else (
            f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx)))
        out.append(template.replace("{}", "{" + span + "}"))
    return out + singles


def cmd_inspect(args: argparse.Namespace) -> int:
    from .sites import describe_sites, model_family
    model = load_model_skeleton(args.model)
    print(f"{type(model).__name__}  (architecture map: {model_family(model)})")
    for role, paths in describe_sites(model).items():
        shown = paths if args.full else _compress(paths)
        print(f"  {role:<9} {len(paths):>4}  {shown[0]}")
        for p in shown[1:]:
            print(f"  {'':<9} {'':>4}  {p}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .typology import render_table
    print(render_table(((name, m.typology) for name, m in METHODS.items()), args.format))
    return 0


# ---- train / eval / generate ----------------------------------------------------------------------
# Per-model defaults for the main job: small, fast, and known to learn within the step budget.
# Targets default to the method's own (LoRA: attn.q, attn.v).
MODEL_DEFAULTS = {
    "smollm2": {"steps": 40, "batch_size": 8, "lr": 2e-3, "rank": 8},
    "minilm": {"steps": 200, "batch_size": 16, "lr": 2e-3, "rank": 8},
    "path": {"steps": 100, "batch_size": 8, "lr": 1e-3, "rank": 8},
}


def _is_causal(model_name: str) -> bool:
    if model_name == "smollm2":
        return True
    if model_name == "minilm":
        return False
    import json
    config = Path(model_name) / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise PeftlabError(f"--model {model_name!r}: cannot read {config} ({e}); give 'smollm2', "
                           "'minilm' or a local transformers model directory") from None
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def build_job(model_name: str, task_name: str, *, seed: int, max_length: int):
    """(model, tokenizer, task, dataset) for a model name and a task name, as `train` and
    `eval` both need them."""
    import torch
    import transformers

    from .assets import load_dataset, load_model

    # Our own progress bar and messages say what happens; silence transformers' load reports.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from .tasks import (
        CausalLMTask,
        ClassificationTask,
        InstructionClassificationTask,
        RegressionTask,
    )

    data = load_dataset(task_name, seed=seed)
    causal = _is_causal(model_name)
    torch.manual_seed(seed)   # a new classification head is drawn here
    if data.kind in ("lm", "chat"):
        if not causal:
            raise PeftlabError(f"task {task_name!r} is language modelling; it needs a causal LM "
                               "(--model smollm2 or a causal model directory)")
        model, tok = load_model(model_name, kind="causal-lm")
        task = CausalLMTask(tok, max_length=max_length)
    elif data.kind == "regression":
        if causal:
            raise PeftlabError(f"task {task_name!r} is regression; use an encoder (--model minilm)")
        model, tok = load_model(model_name, kind="classification", num_labels=1)
        task = RegressionTask(tok, max_length=max_length)
    elif causal:
        model, tok = load_model(model_name, kind="causal-lm")
        task = InstructionClassificationTask(tok, labels=list(data.labels), max_text_tokens=max_length)
    else:
        model, tok = load_model(model_name, kind="classification", num_labels=len(data.labels))
        task = ClassificationTask(tok, max_length=max_length)
    return model, tok, task, data



def method_config(method, targets: str | None, rank: int, *, train_head: bool):
    """The method's config for `peftlab train`: its own default targets unless --targets is
    given, --rank where the method has a rank (alpha keeps the method's default alpha/r: 2 for
    LoRA, 1 for BA-LoRA's PiSSA start), and the classification head trained with the adapter
    when the model gets a new one."""
    default = method.config_cls()
    fields = {"r": rank}
    if getattr(default, "alpha", None) and getattr(default, "r", None):
        fields["alpha"] = rank * default.alpha / default.r
    if targets:
        fields["targets"] = targets.split(",")
    if train_head:
        fields["modules_to_save"] = ["head"]
    known = method.config_cls.__dataclass_fields__
    config = method.config_cls(**{k: v for k, v in fields.items() if k in known})
    config.validate()
    return config


def cmd_train(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from . import adapt, card
    from .methods import get_method
    from .objectives import density_term
    from .train import TrainConfig, train

    method = get_method(args.method)
    defaults = dict(MODEL_DEFAULTS.get(args.model, MODEL_DEFAULTS["path"]))
    if method.train_lr is not None:
        defaults["lr"] = method.train_lr
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out or f"runs/{Path(args.model).name}-{Path(args.task).stem}-{args.method}")
    started = time.perf_counter()
    model, tok, task, data = build_job(args.model, args.task, seed=args.seed, max_length=args.max_length)
    eval_rows = data.test[: args.eval_size]
    print(f"model {args.model} ({type(model).__name__}), task {args.task} ({data.kind}): "
          f"{len(data.train):,} train rows, scoring on {len(eval_rows):,} held-out test rows")
    config = method_config(method, args.targets, args.rank,
                           train_head=not _is_causal(args.model) and data.kind != "lm")
    torch.manual_seed(args.seed)
    am = adapt(model)
    am.add_adapter(args.method, config)
    am.set_active([args.method])
    am.set_trainable(args.method)
    if args.density_loss is not None:
        am.add_loss_term(density_term(args.density_loss, eps=args.density_eps))
    report = _Report(am, task, eval_rows, args)
    before = report.measure("before training", base=True)
    optimizer = {"optimizer": args.optimizer, "optimizer_options": _optimizer_options(args)}
    if args.prune:
        from .pruning import save_plan
        plan = _early_prune(am, args, task, data.train, optimizer)
        if plan is None:
            return 130
        save_plan(out, plan)
    result = train(am, args.method, task, data.train, None, TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        seed=args.seed, bf16=args.bf16, out=out, **optimizer))
    if result.interrupted:
        print(f"interrupted after {result.steps_done} steps; the last saved adapter is intact: "
              f"{result.saved.get('last', 'none saved yet')}")
        return 130
    after = report.measure(f"after {result.steps_done} steps")
    run = {"model": args.model, "task": args.task, "method": args.method, "seed": args.seed,
           "max_length": args.max_length, "eval_size": len(eval_rows), "steps": result.steps_done,
           "metric": task.metric, "before": before, "after": after, "optimizer": args.optimizer,
           "seconds": round(time.perf_counter() - started, 1)}
    if args.density_loss is not None:
        run["density_loss"] = {"lambda": args.density_loss, "eps": args.density_eps}
    if args.prune:
        run["prune"] = {"spec": args.prune, "estimate_steps": args.estimate_steps}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(card(am, args.method))
    print(f"adapter saved: {result.saved['last']}  (run record: {out / 'run.json'}; "
          f"total {run['seconds']:.0f} s)")
    return 0


class _Report:
    """Held-out metrics printed before and after training; with --density-loss (or
    --density-threshold) also DEFT's exact FFN activation density on the same rows."""

    def __init__(self, am, task, rows, args: argparse.Namespace) -> None:
        self.am, self.task, self.rows = am, task, rows
        self.batch_size = args.eval_batch_size
        self.threshold = args.density_threshold
        if self.threshold is None and getattr(args, "density_loss", None) is not None:
            self.threshold = DEFAULT_DENSITY_THRESHOLD

    def measure(self, when: str, *, base: bool = False) -> dict[str, float]:
        """Score the model (`base`: with the adapters disabled) and print the metrics."""
        from .tasks import format_metrics
        with self.am.disabled() if base else nullcontext():
            metrics = self.task.evaluate(self.am.eval(), self.rows, self.batch_size)
            if self.threshold is not None:
                metrics["ffn_density"] = self.density()
        print(f"{when}: {format_metrics(metrics)}")
        return metrics

    def density(self) -> float:
        from .objectives import activation_density
        batches = ({k: v for k, v in self.task.collate(self.rows[i:i + self.batch_size]).items()
                    if k != "labels"} for i in range(0, len(self.rows), self.batch_size))
        return activation_density(self.am, batches, threshold=self.threshold)["density"]


def _early_prune(am, args: argparse.Namespace, task, rows, optimizer: dict):
    """Light-PEFT: train the adapter with head / neuron masks for --estimate-steps, prune the
    model and the adapter structurally, and return the plan (None if interrupted). Training then
    continues from the estimation weights."""
    from .pruning import EarlyPruning, parse_prune_spec
    from .train import TrainConfig, train
    ratios = parse_prune_spec(args.prune)
    steps = args.estimate_steps or max(1, args.steps // 3)
    pruning = EarlyPruning(am, args.method, ratios, estimate_steps=steps)
    pruning.start()
    before = sum(p.numel() for p in am.model.parameters())
    result = train(am, args.method, task, rows, None, TrainConfig(
        steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        seed=args.seed, bf16=args.bf16, lr_scale=pruning.lr_scale, **optimizer))
    if result.interrupted:
        return None
    plan = pruning.finish()
    after = sum(p.numel() for p in am.model.parameters())
    print(f"pruned after {steps} estimation steps: {plan.describe()}; model parameters "
          f"{before:,} -> {after:,} ({after / before:.1%})")
    return plan


def _optimizer_options(args: argparse.Namespace) -> dict:
    if args.optimizer in ("galore", "natural-galore"):
        return {"rank": args.galore_rank, "update_gap": args.galore_gap, "scale": args.galore_scale}
    if args.optimizer == "loraplus":
        return {"loraplus_ratio": args.loraplus_ratio}
    return {}


def _run_record(adapter_dir: Path) -> dict:
    import json
    for candidate in (adapter_dir / "run.json", adapter_dir.parent / "run.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise PeftlabError(f"no run.json beside {adapter_dir}: pass --model and --task")


def _load_for_adapter(args: argparse.Namespace):
    from . import adapt
    from .pruning import load_plan
    adapter_dir = Path(args.adapter)
    run = _run_record(adapter_dir) if not (args.model and args.task) else {}
    model_name, task_name = args.model or run["model"], args.task or run["task"]
    model, tok, task, data = build_job(model_name, task_name, seed=run.get("seed", args.seed),
                                       max_length=run.get("max_length", args.max_length))
    # A Light-PEFT run saved its plan in the run directory: prune the fresh base the same way.
    plan = load_plan(adapter_dir, missing_ok=True) or load_plan(adapter_dir.parent, missing_ok=True)
    if plan is not None:
        plan.apply(model)
    am = adapt(model)
    am.load_adapter(adapter_dir, "adapter")
    am.set_active(["adapter"])
    return am.eval(), tok, task, data, run


def cmd_eval(args: argparse.Namespace) -> int:
    from .tasks import format_metrics
    am, _, task, data, run = _load_for_adapter(args)
    rows = data.test[: args.eval_size or run.get("eval_size", 300)]
    report = _Report(am, task, rows, args)
    metrics = task.evaluate(am, rows, args.eval_batch_size)
    if report.threshold is not None:
        metrics["ffn_density"] = report.density()
    print(f"{args.adapter}: {format_metrics(metrics)} on {len(rows):,} held-out test rows")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    am, tok, _, _, _ = _load_for_adapter(args)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        ids = tok(args.prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = am.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="smollm2, minilm or a local model directory")
    p.add_argument("--task", default=None,
                   help="sentiment, imdb, shakespeare, sts, chat, or a .csv/.jsonl file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=96, help="tokens kept per text")
    p.add_argument("--eval-batch-size", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab", description="Parameter-efficient fine-tuning on one reference architecture.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="list a model's PEFT-Ref sites: role -> module paths")
    p.add_argument("--model", required=True, help="local transformers model directory")
    p.add_argument("--full", action="store_true", help="one line per module instead of per layer range")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("methods", help="the PEFT-Ref typology table of every registered method")
    p.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("train", help="fine-tune a model with a PEFT method and save the adapter")
    _add_job_options(p)
    p.set_defaults(model="smollm2", task="sentiment")
    p.add_argument("--method", default="lora", help="a registered method (peftlab methods)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--targets", default=None, help="comma-separated roles, names, globs or all-linear")
    p.add_argument("--eval-size", type=int, default=300, help="held-out test rows scored before and after")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on GPUs and AMX CPUs)")
    p.add_argument("--out", default=None, help="run directory (default runs/MODEL-TASK-METHOD)")
    g = p.add_argument_group("training-side methods")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_CHOICES,
                   help="adamw; galore / natural-galore (low-rank optimiser state for the trainable "
                        "matrices wider than --galore-rank); loraplus (LoRA B at lr × --loraplus-ratio)")
    g.add_argument("--galore-rank", type=int, default=8)
    g.add_argument("--galore-gap", type=int, default=200, help="steps between projector refreshes")
    g.add_argument("--galore-scale", type=float, default=0.25)
    g.add_argument("--loraplus-ratio", type=float, default=16.0)
    g.add_argument("--density-loss", type=float, default=None, metavar="LAMBDA",
                   help="DEFT: add LAMBDA × the smooth density of the FFN activations to the loss")
    g.add_argument("--density-eps", type=float, default=1e-7, help="DEFT's ε (default 1e-7)")
    g.add_argument("--density-threshold", type=float, default=None, metavar="TAU",
                   help="report the FFN activation density (|z| > TAU) before and after training "
                        f"(default {DEFAULT_DENSITY_THRESHOLD} with --density-loss)")
    g.add_argument("--prune", default=None, metavar="SPEC",
                   help="Light-PEFT early pruning, e.g. heads=0.33,neurons=0.33,ranks=0.5")
    g.add_argument("--estimate-steps", type=int, default=None,
                   help="Light-PEFT estimation steps before pruning (default: a third of --steps)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="reload a saved adapter and score it on held-out data")
    _add_job_options(p)
    p.add_argument("--adapter", required=True, help="adapter directory written by peftlab train")
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--density-threshold", type=float, default=None, metavar="TAU",
                   help="also report the FFN activation density (fraction of |z| > TAU)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="generate text with a saved adapter")
    _add_job_options(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except PeftlabError as e:
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
