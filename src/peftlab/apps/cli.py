"""The `peftlab` command: it parses the arguments and calls the recipes (`peftlab.apps.recipes`)
and the library. Each subcommand is a function `cmd_<name>(args)` registered in `main`; the
largest, `train` and `compose`, run in their own modules (`train_command.py`,
`compose_command.py`). Most of the length here is the argparse declarations.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..core.errors import PeftlabError
from .compose_command import adapter_name, add_compose_parser
from .recipes import (
    DEFAULT_DENSITY_THRESHOLD,
    POSITIVE,
    SEED,
    RunOutput,
    export_peft_files,
    find_adapter,
    import_peft_dir,
    is_causal,
    load_causal_adapter,
    load_model_skeleton,
    load_run_adapter,
    run_record_path,
    serve_model,
    serve_quantization,
)

# The optimiser names of peftlab.training.optim, listed here so that `--help` does not import torch.
OPTIMIZER_CHOICES = ("adamw", "galore", "natural-galore", "loraplus")


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..core.role_maps import ROLES, model_family, role_map
    from ..core.sites import compress_paths, describe_sites, describe_sliced_roles
    model = load_model_skeleton(args.model)
    used = role_map(model)[0]
    source = ("; projections from config.base_model_tp_plan, the rest from the hand map"
              if used.startswith("tp_plan+") else "")
    print(f"{type(model).__name__}  (architecture map: {model_family(model)}; role map: {used}{source})")
    found = {**describe_sites(model), **describe_sliced_roles(model)}    # sliced: "path[rows]"
    for role, paths in ((r, found[r]) for r in ROLES if r in found):
        shown = paths if args.full else compress_paths(paths)
        print(f"  {role:<9} {len(paths):>4}  {shown[0]}")
        for p in shown[1:]:
            print(f"  {'':<9} {'':>4}  {p}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..core.typology import render_table
    from ..methods import METHODS
    print(render_table(((name, m.typology) for name, m in METHODS.items()), args.format))
    return 0


def cmd_support(args: argparse.Namespace) -> int:
    import torch

    from .support import FAMILIES, render_matrix, support_matrix
    torch.set_num_threads(1)     # the tiny models run several times faster on one thread
    names = [n for part in args.family or [] for n in part.split(",") if n] or None
    unknown = sorted(set(names or []) - set(FAMILIES))
    if unknown:
        raise PeftlabError(f"--family {', '.join(unknown)}: unknown; known: {', '.join(FAMILIES)}")
    print(render_matrix(support_matrix(names), args.format), end="")
    return 0


# ---- train / eval / generate ----------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .train_command import run_train
    return run_train(args)


def _load_for_adapter(args: argparse.Namespace):
    """(am, tokenizer, task, data, run record) for --adapter, --model, --task, --seed and
    --max-length."""
    return load_run_adapter(Path(args.adapter), model=args.model, task=args.task, seed=args.seed,
                            max_length=args.max_length)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..training.tasks import format_metrics
    from .train_command import held_out_report
    am, _, task, data, run = _load_for_adapter(args)
    rows = data.test[: args.eval_size or run.get("eval_size", 300)]
    report = held_out_report(am, task, rows, args)
    metrics = task.evaluate(am, rows, args.eval_batch_size)
    if report.threshold is not None:
        metrics["ffn_density"] = report.density()
    print(f"{args.adapter}: {format_metrics(metrics)} on {len(rows):,} held-out test rows")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..training.chat import prompt_ids
    adapter_dir = find_adapter(args.adapter)[0]
    if args.task is None and run_record_path(adapter_dir) is None:   # no task needed to generate
        am, tok = load_causal_adapter(adapter_dir, args.model)
    else:
        am, tok, _, _, _ = _load_for_adapter(args)
    prompt = torch.tensor([prompt_ids(tok, args.prompt)])     # as training formats a prompt
    ids = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        out = am.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


# ---- export / import --------------------------------------------------------------------------------
def _source_and_out(args: argparse.Namespace) -> tuple[Path, Path]:
    """(the adapter directory args.adapter names, --out); an --out that is the source or cannot
    be written is refused before anything loads."""
    source, out = find_adapter(args.adapter)[0], Path(args.out)
    if out.resolve() == source.resolve():
        raise PeftlabError(f"--out {out} is the input directory itself; choose another directory")
    RunOutput(out)
    return source, out


def cmd_export(args: argparse.Namespace) -> int:
    adapter_dir, out = _source_and_out(args)
    names = export_peft_files(adapter_dir, out, args.model)
    print(f"peft adapter written: {out} ({', '.join(names)})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    peft_dir, out = _source_and_out(args)
    am = import_peft_dir(peft_dir, out, args.model, name=adapter_name(out, set()))
    print(am.card(next(iter(am.adapters))))
    print(f"adapter saved: {out}")
    return 0


# ---- compare ---------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_command
    return compare_command(args)


# ---- serve -----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeftlabError(f"peftlab serve needs {' and '.join(missing)}: pip install 'peftlab[serve]'")
    import transformers

    from .serve import load_engine, serve
    from .serve.guard import LoadRoots, api_key_from, check_bind

    transformers.logging.set_verbosity_error()
    # Who may connect and what may be loaded: judged before the model loads (seconds to minutes).
    api_key = api_key_from(args.api_key)
    check_bind(args.host, api_key=api_key, insecure=args.insecure)
    roots = LoadRoots([*([args.adapters] if args.adapters else []), *args.allow_load_from])
    for name in ("max_adapters", "max_batch_size", "max_new_tokens_limit", "max_input_tokens", "num_labels",
                 "max_body_bytes", "max_adapter_bytes", "max_running", "max_prefill_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PeftlabError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_wait_ms < 0:
        raise PeftlabError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.model is None and args.adapters is None:
        raise PeftlabError("peftlab serve needs --model (smollm2, minilm or a local model directory); "
                           "without --adapters there are no adapters to take the base model from")
    args.model = args.model or serve_model(Path(args.adapters))
    engine = load_engine(args.model, args.adapters, causal=is_causal(args.model),
                         max_adapters=args.max_adapters, labels=labels, num_labels=args.num_labels,
                         max_input_tokens=args.max_input_tokens,
                         max_new_tokens=args.max_new_tokens_limit,
                         max_adapter_bytes=args.max_adapter_bytes,
                         quantization=serve_quantization(Path(args.adapters)) if args.adapters else None)
    found = engine.bank.available()
    source = f"from {args.adapters}" if args.adapters else "(base only)"
    loads = (f"POST /v1/adapters loads from under {', '.join(map(str, roots.roots))}" if roots
             else "POST /v1/adapters is off (no --adapters or --allow-load-from)")
    print(f"serving {args.model} ({engine.kind}) with {len(found)} adapters {source} "
          f"({', '.join(list(found)[:10]) or 'none yet'}{' ...' if len(found) > 10 else ''}) on "
          f"http://{args.host}:{args.port}; {'API key required' if api_key else 'no API key'}; "
          f"{loads}", flush=True)
    serve(engine, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
          max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes, api_key=api_key,
          insecure=args.insecure, allow_load_from=args.allow_load_from,
          continuous=not args.static_batches, max_running=args.max_running,
          max_prefill_tokens=args.max_prefill_tokens)
    return 0


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="smollm2, minilm or a local model directory")
    p.add_argument("--task", default=None,
                   help="sentiment, imdb, shakespeare, sts, chat, or a .csv/.jsonl file")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--max-length", type=POSITIVE, default=96, help="tokens kept per text")
    p.add_argument("--eval-batch-size", type=POSITIVE, default=32)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets `run` to its `cmd_<name>`."""
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

    p = sub.add_parser("support", help="the model-support matrix: families x LoRA / IA3 / prompt "
                       "tuning, each checked by running it (docs/support.md)")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.add_argument("--family", action="append", help="only these families (repeat or comma-separate)")
    p.set_defaults(run=cmd_support)

    p = sub.add_parser("train", help="fine-tune a model with a PEFT method and save the adapter")
    _add_job_options(p)
    p.set_defaults(model="smollm2", task="sentiment")
    p.add_argument("--method", default="lora", help="a registered method (peftlab methods)")
    p.add_argument("--steps", type=POSITIVE, default=None)
    p.add_argument("--batch-size", type=POSITIVE, default=None)
    p.add_argument("--grad-accum", type=POSITIVE, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=POSITIVE, default=None)
    p.add_argument("--targets", default=None, help="comma-separated roles, names, globs or all-linear")
    p.add_argument("--eval-size", type=POSITIVE, default=300, help="held-out test rows scored before and after")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on GPUs and AMX CPUs)")
    p.add_argument("--out", default=None, help="run directory (default runs/MODEL-TASK-METHOD)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="non-reentrant", default=None,
                   choices=["non-reentrant", "reentrant"],
                   help="recompute each block's activations in the backward pass (less memory, more time)")
    p.add_argument("--distributed", choices=["ddp", "fsdp"], default=None,
                   help="under torchrun: ddp (the default; whole model per process) or fsdp (sharded)")
    q = p.add_argument_group("quantised base (QLoRA; needs bitsandbytes)")
    q.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                   help="load the base's linear layers quantised by bitsandbytes, frozen")
    q.add_argument("--double-quant", action="store_true", help="nf4/fp4: quantise the scales too")
    q.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="nf4/fp4: dtype the 4-bit layers compute in (default bfloat16 with --bf16, else float32)")
    g = p.add_argument_group("training-side methods")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZER_CHOICES,
                   help="adamw; galore / natural-galore (low-rank optimiser state for the trainable "
                        "matrices wider than --galore-rank); loraplus (LoRA B at lr × --loraplus-ratio)")
    g.add_argument("--galore-rank", type=POSITIVE, default=8)
    g.add_argument("--galore-gap", type=POSITIVE, default=200, help="steps between projector refreshes")
    g.add_argument("--galore-scale", type=float, default=0.25)
    g.add_argument("--loraplus-ratio", type=float, default=16.0)
    g.add_argument("--density-loss", type=float, default=None, metavar="LAMBDA",
                   help="DEFT: add LAMBDA × the smooth density of the FFN activations to the loss")
    g.add_argument("--density-eps", type=float, default=1e-7, help="DEFT's ε (default 1e-7)")
    g.add_argument("--density-start", type=float, default=0.0, metavar="FRACTION",
                   help="switch the density loss on after this fraction of the steps (default 0), so "
                        "that the task is learned first; it then ramps up linearly over --density-ramp")
    g.add_argument("--density-ramp", type=float, default=0.1, metavar="FRACTION",
                   help="fraction of the steps over which a delayed density loss ramps up (default 0.1)")
    g.add_argument("--density-threshold", type=float, default=None, metavar="TAU",
                   help="report the FFN activation density (|z| > TAU) before and after training "
                        f"(default {DEFAULT_DENSITY_THRESHOLD} with --density-loss)")
    g.add_argument("--prune", default=None, metavar="SPEC",
                   help="Light-PEFT early pruning; the paper's ratios: heads=1/3,neurons=1/3,ranks=0.5,modules=0.75 "
                        "(a kind left out is not pruned)")
    g.add_argument("--estimate-steps", type=POSITIVE, default=None,
                   help="Light-PEFT estimation steps before pruning (default: a third of --steps)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="reload a saved adapter and score it on held-out data")
    _add_job_options(p)
    p.add_argument("--adapter", required=True, help="adapter directory (peftlab train, compose, "
                                                    "am.save_adapter or peft; --task without a run.json)")
    p.add_argument("--eval-size", type=POSITIVE, default=None)
    p.add_argument("--density-threshold", type=float, default=None, metavar="TAU",
                   help="also report the FFN activation density (fraction of |z| > TAU)")
    p.set_defaults(run=cmd_eval)

    add_compose_parser(sub)

    p = sub.add_parser("export", help="write a saved adapter as a Hugging Face peft adapter directory")
    p.add_argument("--format", required=True, choices=["peft"], help="the layout to write (peft)")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (peftlab train, compose, "
                                                          "am.save_adapter)")
    p.add_argument("--out", required=True, help="directory for peft's adapter_config.json and "
                                                "adapter_model.safetensors")
    p.add_argument("--model", default=None, help="the base model, when the adapter must be loaded "
                                                 "(a directory of an earlier release) and names none here")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face peft adapter directory into a peftlab one")
    p.add_argument("adapter", metavar="PEFT_DIR", help="a peft adapter directory (adapter_config.json)")
    p.add_argument("--out", required=True, help="directory for the peftlab adapter")
    p.add_argument("--model", default=None, help="the base model (smollm2, minilm or a local "
                                                 "directory; default: the peft config's "
                                                 "base_model_name_or_path)")
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("generate", help="generate text with a saved adapter")
    _add_job_options(p)
    p.add_argument("--adapter", required=True, help="adapter directory (peftlab train, compose, "
                                                    "am.save_adapter or peft)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("compare", help="train methods and baselines side by side: JSON, table and plots")
    p.add_argument("--model", default="minilm", help="smollm2, minilm or a local model directory")
    p.add_argument("--task", default="sentiment", help="sentiment, imdb, shakespeare, sts, chat, or a .csv/.jsonl file")
    p.add_argument("--methods", default="lora,ia3,bitfit,adapter,prompt", help="comma-separated registered methods")
    p.add_argument("--baselines", default="probe,full",
                   help="probe (frozen model, head trained alone), full (every weight, when it fits in "
                        "memory), or none")
    p.add_argument("--steps", type=int, default=None, help="training steps per cell (default: as train)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="rank of the methods that have one")
    p.add_argument("--data-sizes", default="all",
                   help="training examples per cell, drawn with the seed, e.g. 100,1000,all")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean ± std")
    p.add_argument("--eval-size", type=int, default=500, help="held-out test rows scored")
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations during training (learning curve)")
    p.add_argument("--max-length", type=int, default=96, help="tokens kept per text")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-MODEL-TASK); "
                                               "rerun with the same settings to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("serve", help="serve saved adapters over HTTP, batching requests across adapters")
    p.add_argument("--model", default=None, help="smollm2, minilm or a local model directory "
                                                  "(default: the base the adapters record)")
    p.add_argument("--adapters", default=None, metavar="DIR",
                   help="folder of adapters: DIR/NAME/ (am.save_adapter) or DIR/NAME/last (peftlab train "
                        "--out); without it the server starts with the base model alone")
    p.add_argument("--allow-load-from", action="append", default=[], metavar="DIR",
                   help="another folder POST /v1/adapters may load from (repeatable); it loads only "
                        "from under --adapters and these (real paths, symlinks resolved)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="every request but /health needs 'Authorization: Bearer KEY' (default: the "
                        "PEFTLAB_API_KEY environment variable, which other users cannot read in ps)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (e.g. behind an authenticating proxy)")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters held in memory (LRU eviction)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; other than loopback it needs --api-key (or --insecure)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests run together at most")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the oldest waiting request waits for others to join its batch")
    p.add_argument("--max-new-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="longest input in tokens (default: the model's context length)")
    p.add_argument("--num-labels", type=int, default=2, help="classification models: outputs of the head")
    p.add_argument("--labels", default=None, help="classification models: comma-separated label names")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; larger ones get 413 unread (default 1 MiB)")
    p.add_argument("--max-adapter-bytes", type=int, default=None,
                   help="largest adapter tensors file loaded (default: half the base model's size, at least 64 MiB)")
    p.add_argument("--max-running", type=int, default=64,
                   help="generation: requests decoded together at most (continuous batching)")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="generation: padded prompt tokens joining the running batch per step at most")
    p.add_argument("--static-batches", action="store_true",
                   help="generation in static batches (--max-batch-size, --max-wait-ms) instead of "
                        "continuous batching")
    p.set_defaults(run=cmd_serve)
    return parser


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--weights -1,1` as `--weights=-1,1`: argparse takes a value that starts with '-' (and
    is not a single number) for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--weights" and re.fullmatch(r"-[\d.][\d.eE+,-]*", arg):
            out[-1] = f"--weights={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv); the exit status, 2 for a PeftlabError."""
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
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
