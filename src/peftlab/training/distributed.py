"""Training on the processes torchrun starts, through torch's own engines (no sharding of ours):

* **ddp** (the default): `DistributedDataParallel`; every process holds the whole model and the
  adapter's gradients are averaged after each step's last micro-batch.
* **fsdp**: FSDP2's `fully_shard` on each transformer block (the numbered layers the model's site
  roles live in) and then on the AdaptedModel itself, the root, which takes everything outside
  the blocks (embeddings, final norm, head, prompt/prefix parameters). Every parameter, frozen base
  included, is a DTensor sharded over the processes; a block's base weights are gathered for its
  forward and backward only. The adapters' parameters live inside the blocks (AdaptedLayer wraps
  the block's layers), so they shard with their block: FSDP2 shards each parameter on its own,
  so frozen and trainable ones mix in one unit, and gradients are reduce-scattered (averaged)
  for those that require them. FSDP2 has no way back: after `train` the model stays sharded, and
  every process must take part in a forward (evaluation included) and in `gathered_adapter`
  (the adapter's tensors whole, for `save_adapter`, which refuses shards). `train` leaves a group
  it created when it ends; to use the sharded model afterwards, hold the group yourself
  (`with process_group(): ...`, as `peftlab train` does).

Several machines are torchrun's business (`--nnodes`, `--node_rank`, `--rdzv-endpoint`): the
processes form one group whatever machine they run on, and nothing here tells them apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core.errors import CapabilityError, ConfigError, PeftlabError
from ..core.sites import iter_modules, layer_index, site_roles

if TYPE_CHECKING:
    from ..core.model import AdaptedModel

ENGINES = ("ddp", "fsdp")
# Optimisers that read whole gradient matrices (an SVD per matrix): under FSDP each process holds
# a shard of every gradient, so they would project shards.
_WHOLE_MATRIX_OPTIMIZERS = ("galore", "natural-galore")


# ---- the process group ---------------------------------------------------------------------------
def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def under_torchrun() -> bool:
    """Whether torchrun (or a launcher like it) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def is_main_process() -> bool:
    """True on rank 0 (or without distributed training): the process that saves and prints."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_int("RANK", 0) == 0


def setup() -> tuple[int, int, bool]:
    """(rank, world_size, created): joins the group torchrun describes in the environment (nccl
    with CUDA, else gloo); `created` when this call made it."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if env_int("WORLD_SIZE", 1) <= 1:
        return 0, 1, False
    if not dist.is_available():
        raise PeftlabError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(env_int("LOCAL_RANK", 0))
        backend = "nccl"
    else:
        backend = "gloo"
    # Rank 0 evaluates while the others wait in the next step's all-reduce: allow long evaluations.
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), True


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world_size) within the block; the group torchrun describes is joined for the whole
    block (a command's training, evaluation and gathered save) and left at its end if joined here."""
    rank, world_size, created = setup()
    try:
        yield rank, world_size
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()


def all_reduce(value: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """`value` reduced over the group: "mean" or "max" (a copy; the input is left alone)."""
    import torch.distributed as dist
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return value / dist.get_world_size() if op == "mean" else value


# ---- checks made before anything changes ---------------------------------------------------------
def quantised_modules(model: nn.Module) -> dict[str, str]:
    """Path -> class name of every bitsandbytes layer in `model`."""
    return {path: type(m).__name__ for path, m in model.named_modules()
            if type(m).__module__.split(".")[0] == "bitsandbytes"}


def check_engine(am: AdaptedModel, engine: str, world_size: int, *, optimizer: str) -> None:
    """ConfigError / CapabilityError, before the model is wrapped, for what `engine` cannot do
    with this model (see `check_engine_options`)."""
    check_engine_options(engine, world_size, optimizer=optimizer, loss_terms=sorted(am.loss_terms),
                         int8_layers=[p for p, cls in quantised_modules(am).items() if "8bit" in cls])


def check_engine_options(engine: str, world_size: int, *, optimizer: str, loss_terms: Sequence[str] = (),
                         int8_layers: Sequence[str] = ()) -> None:
    """ConfigError / CapabilityError for what `engine` cannot do: FSDP on one process, with an
    optimiser that reads whole gradient matrices, with loss terms (computed outside the forward,
    where the parameters are shards) or with bitsandbytes 8-bit layers (`int8_layers`: where)."""
    if engine not in ENGINES:
        raise ConfigError(f"the distributed engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "fsdp":
        return
    if world_size <= 1:
        raise ConfigError("FSDP shards the model over the processes torchrun starts, and this is one "
                          "process: start several (torchrun --nproc_per_node=N -m peftlab train ... "
                          "--distributed fsdp) or train without FSDP")
    if optimizer in _WHOLE_MATRIX_OPTIMIZERS:
        raise CapabilityError(f"optimizer {optimizer!r} projects whole gradient matrices, which FSDP "
                              "holds in shards: use adamw or loraplus with FSDP, or DDP with "
                              f"{optimizer!r}")
    if loss_terms:
        raise CapabilityError(f"loss terms ({', '.join(loss_terms)}) are computed outside the model's "
                              "forward, where FSDP holds the parameters in shards: train them with DDP "
                              "(--distributed ddp)")
    if int8_layers:
        more = f" and {len(int8_layers) - 1} more" if len(int8_layers) > 1 else ""
        raise CapabilityError(f"FSDP cannot shard bitsandbytes 8-bit layers ({int8_layers[0]}{more}): "
                              "their quantisation statistics do not survive sharding. Use a 4-bit base "
                              "(nf4 or fp4, whose packed weights FSDP2 shards) or DDP")


# ---- wrapping ------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The numbered blocks that hold the model's attention and FFN sites (model.layers.0, ...,
    encoder.layer.0, ...): the module at the first all-digit component of each site's path."""
    modules = dict(iter_modules(model))
    paths: dict[str, None] = {}
    for path in site_roles(model):
        if layer_index(path) is None:
            continue
        parts = path.split(".")
        cut = next(i for i, p in enumerate(parts) if p.isdigit())
        paths[".".join(parts[:cut + 1])] = None
    return [modules[p] for p in paths if p in modules]


def wrap(am: AdaptedModel, engine: str, device: torch.device) -> nn.Module:
    """The module the loop runs: DDP around `am`, or `am` itself sharded in place (FSDP2)."""
    if engine == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers (rotary tables, position ids) are fixed: synced once at construction, not on
        # every forward. torch 2.13 renamed the switch.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        return DDP(am, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
    from torch.distributed.fsdp import fully_shard
    blocks = transformer_blocks(am.model)
    if not blocks:
        raise CapabilityError(f"found no numbered transformer blocks in {type(am.model).__name__} to "
                              "shard; FSDP needs a model whose layers are a numbered list (train with DDP)")
    for block in blocks:
        fully_shard(block)
    fully_shard(am)     # the root: what lies outside the blocks
    return am


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def accumulating(model: nn.Module, last_micro: bool) -> AbstractContextManager:
    """The context of one micro-batch's backward: gradients synchronised on the step's last
    micro-batch only (DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last_micro)
        return nullcontext()
    if last_micro or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `t`'s whole value (gathered from every process for a sharded DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextmanager
@torch.no_grad()
def gathered_adapter(am: AdaptedModel, name: str) -> Iterator[None]:
    """Within the block, adapter `name`'s parameters are whole tensors on every process (FSDP
    keeps them in shards), so `save_adapter` and checks read the adapter as one process would;
    the shards are back in place afterwards. Only the adapter is gathered, never the base. Every
    process must enter it (the gathers are collective); without FSDP it does nothing."""
    if not is_sharded(am):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    for module in am.modules():
        # Sharded first (after an evaluation forward the root stays unsharded): FSDP reshards a
        # unit whenever one of its modules' state_dict() is read, which would put the shards back
        # in place of the whole tensors. Local, no communication.
        if isinstance(module, FSDPModule):
            module.reshard()
    adapter = am.adapter(name)
    owners = [*adapter.parts().values(), *(w.copies[name] for w in adapter.copies.values())]
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for owner in owners:
            for module in owner.modules():
                for pname, p in list(module._parameters.items()):
                    if p is not None and hasattr(p, "full_tensor"):
                        module._parameters[pname] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                        swapped.append((module, pname, p))
        yield
    finally:
        for module, pname, p in reversed(swapped):
            module._parameters[pname] = p
