"""The `peftlab` command. Each subcommand is a function `cmd_<name>(args)` registered in `main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PeftlabError


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
    from .tasks import format_metrics
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
    before = task.evaluate(model.eval(), eval_rows, args.eval_batch_size)
    print(f"before training: {format_metrics(before)}")
    torch.manual_seed(args.seed)
    am = adapt(model)
    am.add_adapter(args.method, config)
    am.set_active([args.method])
    am.set_trainable(args.method)
    result = train(am, args.method, task, data.train, None, TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        seed=args.seed, bf16=args.bf16, out=out))
    if result.interrupted:
        print(f"interrupted after {result.steps_done} steps; the last saved adapter is intact: "
              f"{result.saved.get('last', 'none saved yet')}")
        return 130
    after = task.evaluate(am.eval(), eval_rows, args.eval_batch_size)
    print(f"after {result.steps_done} steps: {format_metrics(after)}")
    run = {"model": args.model, "task": args.task, "method": args.method, "seed": args.seed,
           "max_length": args.max_length, "eval_size": len(eval_rows), "steps": result.steps_done,
           "metric": task.metric, "before": before, "after": after,
           "seconds": round(time.perf_counter() - started, 1)}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(card(am, args.method))
    print(f"adapter saved: {result.saved['last']}  (run record: {out / 'run.json'}; "
          f"total {run['seconds']:.0f} s)")
    return 0


def _run_record(adapter_dir: Path) -> dict:
    import json
    for candidate in (adapter_dir / "run.json", adapter_dir.parent / "run.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise PeftlabError(f"no run.json beside {adapter_dir}: pass --model and --task")


def _load_for_adapter(args: argparse.Namespace):
    from . import adapt
    adapter_dir = Path(args.adapter)
    run = _run_record(adapter_dir) if not (args.model and args.task) else {}
    model_name, task_name = args.model or run["model"], args.task or run["task"]
    model, tok, task, data = build_job(model_name, task_name, seed=run.get("seed", args.seed),
                                       max_length=run.get("max_length", args.max_length))
    am = adapt(model)
    am.load_adapter(adapter_dir, "adapter")
    am.set_active(["adapter"])
    return am.eval(), tok, task, data, run


def cmd_eval(args: argparse.Namespace) -> int:
    from .tasks import format_metrics
    am, _, task, data, run = _load_for_adapter(args)
    rows = data.test[: args.eval_size or run.get("eval_size", 300)]
    metrics = task.evaluate(am, rows, args.eval_batch_size)
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
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="reload a saved adapter and score it on held-out data")
    _add_job_options(p)
    p.add_argument("--adapter", required=True, help="adapter directory written by peftlab train")
    p.add_argument("--eval-size", type=int, default=None)
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
