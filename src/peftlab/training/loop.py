"""A plain-PyTorch training loop for one adapter, on one process or many (torchrun + DDP).

    from peftlab.training.loop import TrainConfig, train
    am.set_active(["a"]); am.set_trainable("a")
    result = train(am, "a", task, train_rows, eval_rows, TrainConfig(steps=200, out="runs/a"))

The loop knows nothing about the data: a *task* (any object with the `TaskLike` methods) turns
rows into model inputs, computes the loss and evaluates. The rest is fixed:

* **Optimiser**: `config.optimizer` (AdamW by default; GaLore, Natural GaLore or LoRA+ from
  `peftlab.training.optim`) over the parameters that require gradients (normally the trainable adapter's,
  plus anything a training-side method adds, e.g. Light-PEFT's masks, whose own learning rate
  comes from `config.lr_scale`), learning rate warmed up linearly then decayed by a cosine to 0
  (`lr_factor`, applied to every parameter group's own lr), gradient accumulation and
  gradient-norm clipping. Registered auxiliary loss terms (`AdaptedModel.add_loss_term`) are
  added to the task loss.
* **Data order**: one endless stream of row indices, a fresh `torch.randperm` per epoch drawn from
  a `torch.Generator` seeded with `seed` (`index_stream`). Each optimisation step takes the next
  `batch_size * grad_accum * world_size` indices of the stream (the *global batch*), so a batch
  can straddle two epochs ("wrap around"): nothing is dropped, every row is seen equally often
  (±1), and a data set smaller than one batch still trains. Rank r takes the r-th contiguous slice
  of the global batch and splits it into `grad_accum` micro-batches of `batch_size`, so the union
  over ranks and micro-batches is exactly the single-process batch.
* **Reproducible**: same seed, rows and model → bit-identical adapter on CPU. Dropout draws from
  torch's global generator, which is seeded with `seed + rank` inside `torch.random.fork_rng`, so
  the caller's random state is left as it was.
* **Distributed**: under `torchrun --nproc_per_node=N` (env WORLD_SIZE > 1) the process group is
  created if needed (nccl with CUDA, else gloo) and the model runs under `config.distributed`
  (training/distributed.py): "ddp", DistributedDataParallel (the task's `loss` is called with the
  wrapped module), or "fsdp", FSDP2 `fully_shard` per transformer block and at the root, the base
  sharded too. Either way gradients are averaged across ranks, and each rank's loss is the mean
  over its equal share of the global batch, so the averaged gradient equals the single-process
  one. Rank 0 alone saves and prints; it alone evaluates under DDP, every rank does under FSDP
  (a sharded forward needs them all), and an FSDP save gathers the adapter's parameters only
  (`gathered_adapter`). The group is destroyed at the end only if `train` created it.
* **Gradient checkpointing** (`gradient_checkpointing=True`): the model's own (transformers')
  activation checkpointing for the run, with `gradient_checkpointing_kwargs` (default: torch's
  non-reentrant checkpointing; `{"use_reentrant": True}` works too: input gradients are switched
  on for it), switched off again afterwards unless it was on before.
* **Peak memory**: `TrainResult.peak_memory_bytes` is the process's peak at the end of training
  (training/memory.py: the RSS high-water mark on CPU, max_memory_allocated on GPU), the largest
  over the ranks; `peak_memory_measure` says which.
* **Checkpoints** (rank 0, when `out` is set): `out/last` at every evaluation point and at the end,
  `out/best` whenever the task's metric improves. Saves are atomic (peftlab.core.io.commit_files).
* **Non-finite numbers**: a step whose loss or gradient norm is not finite (inf or NaN) is skipped:
  no optimiser update, its gradients dropped, the lr schedule moves on, the step is listed in
  `TrainResult.skipped` (its loss in `losses` as it was). One more than `max_nonfinite_steps`
  such steps in a run (default 3) stop training with a TrainingError naming the step. An adapter
  whose tensors are not all finite is never saved: at a checkpoint it stops training the same
  way, and out/last and out/best keep the last finite adapter.
* **Ctrl-C**: a KeyboardInterrupt stops training and `train` returns with `interrupted=True`.
  Nothing is saved on interrupt: `out/last` keeps the adapter of the last evaluation point, a
  known, consistent state, rather than one from the middle of a step or of an accumulation.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..core.errors import AdapterError, ConfigError, PeftlabError, TrainingError
from ..core.io import non_finite_tensors
from ..core.method import check_number, check_positive_int
from . import distributed
from .distributed import is_main_process  # noqa: F401 (its home before distributed.py)
from .memory import peak_memory
from .tasks import format_metrics

if TYPE_CHECKING:
    from ..core.model import AdaptedModel


@runtime_checkable
class TaskLike(Protocol):
    """What `train` needs from a task (duck-typed; peftlab.training.tasks implements it)."""

    metric: str               # key of evaluate()'s dict that decides "best"
    higher_is_better: bool

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Model inputs for one batch."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss, the mean over the batch's examples."""
        ...

    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        ...

    # optional: check(rows) raises (DataError) for rows collate would refuse; `train` calls it on
    # the training rows before the first step, so a bad row stops the run before any update


@dataclass
class TrainConfig:
    steps: int = 100                    # optimisation steps
    batch_size: int = 8                 # rows per micro-batch, per process
    grad_accum: int = 1                 # micro-batches per step
    lr: float = 2e-4                    # peak learning rate
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1           # warm-up steps = ceil(warmup_ratio * steps)
    max_grad_norm: float | None = 1.0   # None (or <= 0): no clipping
    seed: int = 0
    eval_every: int = 0                 # evaluate (and save out/last) every N steps; 0: only at the end
    bf16: bool = False                  # torch.autocast to bfloat16 for forward passes (CPU or GPU)
    out: str | Path | None = None       # save directory: out/last and out/best (rank 0 only)
    log_every: int = 10                 # steps between progress-bar updates of loss / lr / throughput
    optimizer: str = "adamw"            # peftlab.training.optim.OPTIMIZERS: adamw | galore | natural-galore | loraplus
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # build_optimizer keywords (rank, ...)
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name glob -> lr multiplier
    progress: bool = True               # False: no progress bar and no printed lines
    max_nonfinite_steps: int = 3        # steps with a non-finite loss / gradient skipped; one more fails
    gradient_checkpointing: bool = False  # the model's activation checkpointing for the run
    gradient_checkpointing_kwargs: dict[str, Any] | None = None  # e.g. {"use_reentrant": True}
    distributed: str = "ddp"            # under torchrun: "ddp" or "fsdp" (training/distributed.py)

    def validate(self) -> None:
        """ConfigError naming the first bad field; every number must be finite."""
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            check_positive_int(f"TrainConfig.{name}", getattr(self, name))
        for name in ("eval_every", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        check_number("TrainConfig.lr", self.lr, low=0, low_open=True)
        check_number("TrainConfig.weight_decay", self.weight_decay, low=0)
        check_number("TrainConfig.warmup_ratio", self.warmup_ratio, low=0, high=1)
        if self.max_grad_norm is not None:
            check_number("TrainConfig.max_grad_norm", self.max_grad_norm, hint=" (None or <= 0: no clipping)")
        if not isinstance(self.lr_scale, dict):
            raise ConfigError(f"TrainConfig.lr_scale must be a dict from parameter-name globs to lr "
                              f"multipliers, got {self.lr_scale!r}")
        for pattern, factor in self.lr_scale.items():
            check_number(f"TrainConfig.lr_scale[{pattern!r}]", factor, low=0, low_open=True)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"TrainConfig.gradient_checkpointing must be True or False, got "
                              f"{self.gradient_checkpointing!r}")
        kwargs = self.gradient_checkpointing_kwargs
        if kwargs is not None and (not isinstance(kwargs, dict) or not self.gradient_checkpointing):
            raise ConfigError(f"TrainConfig.gradient_checkpointing_kwargs ({kwargs!r}) must be a dict, "
                              "and goes with gradient_checkpointing=True")
        if self.distributed not in distributed.ENGINES:
            raise ConfigError(f"TrainConfig.distributed must be one of {', '.join(distributed.ENGINES)}, "
                              f"got {self.distributed!r}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)


@dataclass
class TrainResult:
    losses: list[float]                      # training loss of every completed step (global mean)
    evals: list[tuple[int, dict[str, float]]]  # (step, metrics); rank 0 only
    best: dict | None                        # {"step", "metric", "value", "metrics"} of the best eval
    steps_done: int                          # completed optimisation steps
    seconds: float                           # wall time of the whole call
    examples_per_second: float               # training rows per second, evaluation and saving excluded
    interrupted: bool                        # stopped by KeyboardInterrupt
    saved: dict[str, Path]                   # "last" / "best" -> directory written by this call (rank 0)
    lrs: list[float] = field(default_factory=list)  # learning rate used at each completed step
    skipped: list[int] = field(default_factory=list)  # steps (1-based) not applied: non-finite loss / grad
    world_size: int = 1
    rank: int = 0
    peak_memory_bytes: int | None = None     # the process's peak memory (max over ranks); None: unknown
    peak_memory_measure: str = ""            # what was measured (training/memory.py)


# ---- schedule and data order ---------------------------------------------------------------------
def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr for optimisation step `step` (0-based).

    Warm-up: (step + 1) / warmup_steps, so the first step already moves and step warmup_steps-1
    runs at the peak. Then a cosine from the peak at step warmup_steps to 0 at step `steps`
    (the value after the last step).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup_steps))


def index_stream(num_rows: int, seed: int) -> Iterator[int]:
    """Row indices forever: a new permutation per epoch from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(num_rows, generator=g).tolist()


# ---- the loop ----------------------------------------------------------------------------------
_NONFINITE_FIX = ("To fix: lower the learning rate, keep gradient clipping on (max_grad_norm), check the "
                  "data for invalid values, or train in float32 (bf16=False).")


def _check_trainable(am: AdaptedModel, adapter: str) -> list[nn.Parameter]:
    ad = am.adapter(adapter)   # AdapterError with "did you mean" for a wrong name
    params = [p for p in am.parameters() if p.requires_grad]
    if not params:
        raise PeftlabError(f"nothing to train: no parameter requires gradients. Call "
                           f"am.set_trainable({adapter!r}) (and am.set_active([{adapter!r}])) first")
    if not any(p.requires_grad for p in am.adapter_parameters(adapter)):
        raise AdapterError(f"adapter {adapter!r} is frozen, so training would not change it; call "
                           f"am.set_trainable({adapter!r}) first")
    if ad.merged:
        raise AdapterError(f"adapter {adapter!r} is merged into the base weights; unmerge({adapter!r}) "
                           "before training it")
    if adapter not in am.active:
        raise AdapterError(f"adapter {adapter!r} is not active, so it takes no part in the forward "
                           f"pass; call am.set_active([{adapter!r}]) first (active: {am.active})")
    return params


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}



def train(am: AdaptedModel, adapter: str, task: TaskLike, train_rows: list[dict],
          eval_rows: list[dict] | None, config: TrainConfig) -> TrainResult:
    """Train adapter `adapter` of `am` on `train_rows` with `task`; see the module docstring.

    `am` must have `adapter` active and trainable. Single-process training runs on the device the
    model is on; under DDP with CUDA each rank moves the model to cuda:LOCAL_RANK.
    """
    config.validate()
    start = time.perf_counter()
    if not train_rows:
        raise PeftlabError("no training rows: the training set is empty")
    params = _check_trainable(am, adapter)
    for name in ("collate", "loss", "evaluate"):
        if not callable(getattr(task, name, None)):
            raise PeftlabError(f"task {type(task).__name__} has no {name}() method")
    if eval_rows and not hasattr(task, "metric"):
        raise PeftlabError(f"task {type(task).__name__} has no `metric` attribute")
    if callable(getattr(task, "check", None)):
        task.check(train_rows)

    rank, world_size, created_group = distributed.setup()
    main = rank == 0
    checkpointing = config.gradient_checkpointing and not getattr(am.model, "is_activation_checkpointing", False)
    try:
        distributed.check_engine(am, config.distributed, world_size, optimizer=config.optimizer)
        if checkpointing:   # refused here (a prefix adapter on an older transformers) before any change
            am.gradient_checkpointing_enable(config.gradient_checkpointing_kwargs)
        if world_size > 1 and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            am.to(device)
        else:
            device = params[0].device
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed + rank)
            result = _train(am, adapter, task, train_rows, eval_rows or None, config,
                            rank, world_size, main, device, start)
        peak = peak_memory(device)
        result.peak_memory_bytes, result.peak_memory_measure = peak.bytes, peak.measure
        if world_size > 1 and peak.bytes is not None and not result.interrupted:
            result.peak_memory_bytes = int(distributed.all_reduce(torch.tensor(peak.bytes, device=device), "max"))
            result.peak_memory_measure += f"; the largest of {world_size} processes"
        return result
    finally:
        if checkpointing:
            am.gradient_checkpointing_disable()
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(am, adapter, task, train_rows, eval_rows, config: TrainConfig, rank: int,
           world_size: int, main: bool, device: torch.device, start: float) -> TrainResult:
    model: nn.Module = am
    if world_size > 1:
        model = distributed.wrap(am, config.distributed, device)
    sharded = distributed.is_sharded(model)
    # after wrapping: FSDP replaces every parameter by its sharded DTensor
    params = [p for p in am.parameters() if p.requires_grad]

    from .optim import build_optimizer
    optimizer = build_optimizer([(n, p) for n, p in am.named_parameters() if p.requires_grad],
                                config.optimizer, config.lr, config.weight_decay,
                                lr_scale=config.lr_scale, **config.optimizer_options)
    scheduler = make_scheduler(optimizer, config.steps, config.warmup_steps)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) \
        if config.bf16 else nullcontext
    per_rank = config.batch_size * config.grad_accum
    global_batch = per_rank * world_size
    stream = index_stream(len(train_rows), config.seed)
    out = Path(config.out) if config.out is not None else None
    eval_every = config.eval_every or config.steps

    result = TrainResult(losses=[], evals=[], best=None, steps_done=0, seconds=0.0,
                         examples_per_second=0.0, interrupted=False, saved={},
                         world_size=world_size, rank=rank)
    bar = None
    if main and config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, desc=f"train {adapter}", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    say: Callable[[str], None] = (bar.write if bar is not None else print) if main and config.progress \
        else (lambda _msg: None)

    saved_at: dict[str, int] = {}
    seen_best: dict[str, float] = {}

    def kept() -> str:
        """What the save directory holds now, for errors that stop training."""
        if out is None:
            return "Nothing was saved (no out directory)."
        if "last" not in saved_at:
            return f"This run saved nothing to {out} (what was there before is untouched)."
        return f"{out / 'last'} keeps the adapter of step {saved_at['last']}."

    def checkpoint(step: int) -> None:
        """Evaluate (rank 0, when there are eval rows) and save out/last and, if improved, out/best;
        TrainingError, on every rank, rather than save an adapter that is not finite."""
        improved = False
        if eval_rows and (main or sharded):   # a sharded forward needs every rank
            am.eval()
            try:
                with torch.no_grad(), autocast():
                    raw = task.evaluate(am, eval_rows, config.batch_size)
            finally:
                am.train()
            metrics = {k: float(v) for k, v in raw.items()}
            if task.metric not in metrics:
                raise PeftlabError(f"{type(task).__name__}.evaluate returned {sorted(metrics)} but "
                                   f"not its metric {task.metric!r}")
            value = metrics[task.metric]
            best = seen_best.get("value")
            improved = not math.isnan(value) and (
                best is None or (value > best if task.higher_is_better else value < best))
            if improved:   # every evaluating rank keeps it: under FSDP they all save together
                seen_best["value"] = value
            if main:
                result.evals.append((step, metrics))
                if improved:
                    result.best = {"step": step, "metric": task.metric, "value": value, "metrics": metrics}
            say(f"step {step}/{config.steps}  {format_metrics(metrics)}" + ("  (best)" if improved else ""))
        # Checked whether or not this loop saves (a caller such as the CLI saves the result
        # itself): a non-finite adapter ends training here. Ranks hold the same adapter (whole
        # under DDP, gathered under FSDP), so every rank stops together.
        with distributed.gathered_adapter(am, adapter):
            bad = non_finite_tensors({f"{name} at {path!r}": t
                                      for (path, name), t in am.adapter_tensors(adapter).items()})
            if bad:
                raise TrainingError(f"training stopped at step {step}: adapter {adapter!r} is not finite "
                                    f"(its tensor {bad[0]} holds inf or NaN), so it was not saved. "
                                    f"{kept()} {_NONFINITE_FIX}")
            if out is None:
                return
            if main:
                result.saved["last"] = am.save_adapter(out / "last", adapter)
                saved_at["last"] = step
                if improved:
                    result.saved["best"] = am.save_adapter(out / "best", adapter)

    train_seconds = 0.0
    recent: list[float] = []
    modes = [(m, m.training) for m in am.modules()]   # restored exactly afterwards
    am.train()
    try:
        for step in range(config.steps):
            t0 = time.perf_counter()
            ids = list(itertools.islice(stream, global_batch))[rank * per_rank:(rank + 1) * per_rank]
            lr = optimizer.param_groups[0]["lr"]
            total = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                rows = [train_rows[i] for i in ids[micro * config.batch_size:(micro + 1) * config.batch_size]]
                batch = _to_device(task.collate(rows), device)
                last_micro = micro == config.grad_accum - 1
                with distributed.accumulating(model, last_micro):
                    with autocast():
                        loss = task.loss(model, batch)
                        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                            raise PeftlabError(f"{type(task).__name__}.loss must return a scalar tensor "
                                               f"(the batch mean), got {getattr(loss, 'shape', type(loss))}")
                        aux, _ = am.auxiliary_loss(step, config.steps)   # registered loss terms
                        if aux is not None:
                            loss = loss + aux
                    (loss.float() / config.grad_accum).backward()
                total += loss.detach().float()
            mean_loss = total / config.grad_accum
            if world_size > 1:   # before the update: every rank then skips the same steps
                mean_loss = distributed.all_reduce(mean_loss)
            if config.max_grad_norm is not None and config.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            norm = distributed.full_value(norm)   # FSDP: the norm of the sharded gradients, whole
            # one host sync for both; the gradients are averaged across ranks, so is the norm
            loss_value, norm_value = torch.stack([mean_loss.float(), norm.float().to(device)]).tolist()
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                optimizer.step()
            else:    # no update from inf / NaN; the step still counts and the schedule moves on
                result.skipped.append(step + 1)
                if len(result.skipped) > config.max_nonfinite_steps:
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    value = loss_value if what == "loss" else norm_value
                    earlier = ", ".join(map(str, result.skipped[:-1])) or "none"
                    raise TrainingError(
                        f"training stopped at step {step + 1}: its {what} is not finite ({value}), and "
                        f"steps {earlier} were skipped before it for a non-finite loss or gradient "
                        f"(max_nonfinite_steps={config.max_nonfinite_steps}). {kept()} {_NONFINITE_FIX}")
                say(f"step {step + 1}: non-finite loss or gradient ({loss_value}, norm {norm_value}); "
                    f"skipped without an update ({len(result.skipped)} of at most "
                    f"{config.max_nonfinite_steps})")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t0
            result.losses.append(loss_value)
            result.lrs.append(lr)
            result.steps_done = step + 1
            recent.append(loss_value)
            if bar is not None:
                bar.update(1)
                if result.steps_done % config.log_every == 0 or result.steps_done == 1:
                    bar.set_postfix({"loss": f"{sum(recent) / len(recent):.4f}", "lr": f"{lr:.2e}",
                                     "ex/s": f"{result.steps_done * global_batch / train_seconds:.1f}"})
                    recent.clear()
            if result.steps_done % eval_every == 0 or result.steps_done == config.steps:
                checkpoint(result.steps_done)
    except KeyboardInterrupt:
        result.interrupted = True
        optimizer.zero_grad(set_to_none=True)
        say(f"interrupted after {result.steps_done} steps; nothing saved since the last checkpoint")
    finally:
        for module, mode in modes:
            module.training = mode
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - start
    result.examples_per_second = result.steps_done * global_batch / train_seconds if train_seconds else 0.0
    return result
