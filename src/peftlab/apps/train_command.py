"""`peftlab train`: the options checked before anything loads (the quantised base, the
distributed engine, DEFT's density term), then the job: the base loaded (quantised by bitsandbytes
with --quantize), the adapter added, held-out scores before and after, training in this process
or in each of the processes torchrun starts (DDP or FSDP, training/distributed.py; rank 0 alone
reports and writes), Light-PEFT pruning, and the run directory: the adapter in last/ and run.json
(what later commands rebuild the base from, peak memory included)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import CapabilityError, CheckpointError, ConfigError, PeftlabError
from ..core.quantised import Quantization, require_bitsandbytes
from .recipes import (
    DEFAULT_DENSITY_THRESHOLD,
    HeldOutReport,
    RunOutput,
    adapter_bytes,
    build_job,
    is_causal,
    method_config,
    model_defaults,
    write_prune_plan,
    write_run_record,
)

if TYPE_CHECKING:
    from ..core.model import AdaptedModel


def train_quantization(args: argparse.Namespace) -> Quantization | None:
    """`peftlab train`'s --quantize, --double-quant and --compute-dtype as the Quantization to load
    the base with (None without --quantize; 4-bit layers compute in bfloat16 with --bf16, else
    float32), refused before anything loads where the options do not go together."""
    four_bit = [o for o, v in (("--double-quant", args.double_quant), ("--compute-dtype", args.compute_dtype)) if v]
    if args.quantize is None:
        if four_bit:
            raise ConfigError(f"{' and '.join(four_bit)} set how --quantize nf4|fp4 quantises the base, and "
                              "no --quantize was given: add --quantize nf4 (or fp4), or drop them")
        return None
    if args.quantize == "int8" and four_bit:
        raise ConfigError(f"{' and '.join(four_bit)} are options of the 4-bit methods (nf4, fp4); "
                          "--quantize int8 takes neither")
    compute = args.compute_dtype or ("bfloat16" if args.bf16 else "float32")
    if args.bf16 and compute == "float16":
        raise ConfigError("--bf16 runs the forward in bfloat16, --compute-dtype float16 the 4-bit layers in "
                          "float16 (a cast each way per layer): use --compute-dtype bfloat16 with --bf16")
    if args.prune:
        raise CapabilityError("--prune slices the base model's projections in place, and --quantize "
                              "stores them packed by bitsandbytes: prune an unquantised base")
    require_bitsandbytes()
    return Quantization(args.quantize, args.double_quant, compute)


def check_distributed_options(args: argparse.Namespace) -> None:
    """Refuse (before anything loads) --distributed outside torchrun, and what its engine cannot
    do with the other options of `peftlab train`."""
    from ..training.distributed import check_engine_options, env_int, under_torchrun
    if args.distributed is None:
        return
    if not under_torchrun():
        raise ConfigError(f"--distributed {args.distributed} takes effect in processes torchrun starts, and "
                          f"this one was not: torchrun --nproc_per_node=N -m peftlab train ... --distributed ...")
    if args.distributed == "fsdp" and args.prune:
        raise CapabilityError("--prune slices the model between its two training phases, which FSDP "
                              "holds in shards: prune with --distributed ddp")
    check_engine_options(args.distributed, env_int("WORLD_SIZE", 1), optimizer=args.optimizer,
                         loss_terms=["--density-loss"] if args.density_loss is not None else [],
                         int8_layers=["--quantize int8"] if args.quantize == "int8" else [])


def run_train(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from ..methods import get_method
    from ..training.distributed import is_main_process, process_group

    method = get_method(args.method)
    density = density_loss(args) if args.density_loss is not None else None   # bad flags fail here
    quantization = train_quantization(args)   # and the other combinations, before the model loads
    check_distributed_options(args)
    with process_group():   # under torchrun: one group for training, evaluation and the gathered save
        # only rank 0 reports; the others' output would repeat it
        quiet = contextlib.nullcontext() if is_main_process() else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            return _train_run(args, method, density, quantization)


def _train_run(args: argparse.Namespace, method, density, quantization) -> int:
    import time

    import torch

    from .. import adapt, card
    from ..training.distributed import gathered_adapter, is_main_process, is_sharded
    from ..training.loop import TrainConfig, train

    main = is_main_process()
    defaults = dict(model_defaults(args.model))
    if method.train_lr is not None:
        defaults["lr"] = method.train_lr
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out or f"runs/{Path(args.model).name}-{Path(args.task).stem}-{args.method}")
    # a bad --out is refused now, before the model loads, not after training; rank 0 alone writes
    output = RunOutput(out) if main else None
    started = time.perf_counter()
    model, _, task, data = build_job(args.model, args.task, seed=args.seed, max_length=args.max_length,
                                     quantization=quantization)
    eval_rows = data.test[: args.eval_size]
    print(f"model {args.model} ({type(model).__name__}{', ' + quantization.describe() if quantization else ''}), "
          f"task {args.task} ({data.kind}): {len(data.train):,} train rows, scoring on "
          f"{len(eval_rows):,} held-out test rows")
    config = method_config(method, args.targets, args.rank,
                           train_head=not is_causal(args.model) and data.kind != "lm")
    torch.manual_seed(args.seed)
    am = adapt(model, base_name=args.model)   # saved adapters record "smollm2" or the directory
    am.add_adapter(args.method, config)
    am.set_active([args.method])
    am.set_trainable(args.method)
    if output is not None:
        output.check(adapter_bytes(am, args.method))   # and room for the adapter
    if density is not None:
        am.add_loss_term(density)
    report = held_out_report(am, task, eval_rows, args)
    before = report.measure("before training", base=True) if main else None
    optimizer = {"optimizer": args.optimizer, "optimizer_options": optimizer_options(args)}
    plan = early_prune(am, args, task, data.train, optimizer) if args.prune else None
    if args.prune and plan is None:
        return 130
    checkpointing = args.gradient_checkpointing is not None
    result = train(am, args.method, task, data.train, None, TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        seed=args.seed, bf16=args.bf16, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": args.gradient_checkpointing == "reentrant"}
        if checkpointing else None, distributed=args.distributed or "ddp", **optimizer))
    if result.interrupted:
        print(f"interrupted after {result.steps_done} steps; nothing was saved")
        return 130
    # FSDP holds the model in shards: every rank scores it (rank 0 alone under DDP) and gathers
    # the adapter, never the base, for rank 0 to save.
    after = report.measure(f"after {result.steps_done} steps") if main or is_sharded(am) else None
    with gathered_adapter(am, args.method):
        if output is None:
            return 0
        # Saved here, not by the loop: a failing save moves the run to a fallback directory.
        output.write(lambda d: am.save_adapter(d / "last", args.method), lambda d: write_prune_plan(d, plan))
        print(card(am, args.method))
    run = {"model": args.model, "task": args.task, "labels": data.labels, "method": args.method,
           "seed": args.seed, "max_length": args.max_length, "eval_size": len(eval_rows),
           "steps": result.steps_done, "metric": task.metric, "before": before, "after": after,
           "optimizer": args.optimizer, "seconds": round(time.perf_counter() - started, 1),
           "quantization": quantization.to_record() if quantization else None,
           "gradient_checkpointing": args.gradient_checkpointing,
           "distributed": {"engine": args.distributed or "ddp", "processes": result.world_size}
           if result.world_size > 1 else None,
           "peak_memory_bytes": result.peak_memory_bytes, "peak_memory_measure": result.peak_memory_measure}
    if args.density_loss is not None:
        run["density_loss"] = {"lambda": args.density_loss, "eps": args.density_eps,
                               "start": args.density_start, "ramp": args.density_ramp}
    if args.prune:
        run["prune"] = {"spec": args.prune, "estimate_steps": args.estimate_steps}
    output.write(lambda d: write_run_record(d, run))
    peak = result.peak_memory_bytes
    print(f"peak memory {'unknown' if peak is None else f'{peak / 2 ** 20:,.1f} MiB'} "
          f"({result.peak_memory_measure})")
    print(f"adapter saved: {output.directory / 'last'}  (run record: {output.directory / 'run.json'}; "
          f"total {run['seconds']:.0f} s)")
    if output.problem is not None:
        raise CheckpointError(output.report())
    return 0


def held_out_report(am: AdaptedModel, task: Any, rows: list[dict], args: argparse.Namespace) -> HeldOutReport:
    """The held-out report of train and eval: the density too with --density-threshold, or at
    the default threshold with --density-loss."""
    threshold = args.density_threshold
    if threshold is None and getattr(args, "density_loss", None) is not None:
        threshold = DEFAULT_DENSITY_THRESHOLD
    return HeldOutReport(am, task, rows, batch_size=args.eval_batch_size, threshold=threshold)


def early_prune(am, args: argparse.Namespace, task, rows, optimizer: dict):
    """Light-PEFT: train the adapter with head / neuron masks for --estimate-steps, prune the
    model and the adapter structurally, and return the plan (None if interrupted). Training then
    continues from the estimation weights."""
    from ..training.loop import TrainConfig, train
    from ..training.pruning import EarlyPruning, parse_prune_spec
    ratios = parse_prune_spec(args.prune)
    steps = args.estimate_steps or max(1, args.steps // 3)
    pruning = EarlyPruning(am, args.method, ratios, estimate_steps=steps, grad_accum=args.grad_accum)
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


def density_loss(args: argparse.Namespace):
    """DEFT's density term from --density-loss/-eps/-start/-ramp (a LossTerm)."""
    from ..core.terms import delayed_ramp
    from ..training.objectives import density_term
    if not 0.0 <= args.density_start < 1.0:
        raise PeftlabError(f"--density-start must be a fraction of the run in [0, 1), got {args.density_start}")
    if not 0.0 <= args.density_ramp <= 1.0:
        raise PeftlabError(f"--density-ramp must be a fraction of the run in [0, 1], got {args.density_ramp}")
    schedule = delayed_ramp(args.density_start, args.density_ramp) if args.density_start > 0 else None
    return density_term(args.density_loss, eps=args.density_eps, schedule=schedule)


def optimizer_options(args: argparse.Namespace) -> dict:
    if args.optimizer in ("galore", "natural-galore"):
        return {"rank": args.galore_rank, "update_gap": args.galore_gap, "scale": args.galore_scale}
    if args.optimizer == "loraplus":
        return {"loraplus_ratio": args.loraplus_ratio}
    return {}
