"""Light-PEFT's trainable masks: per layer a head mask M^A on the input of the attention output
projection (the concatenated head contexts, where scaling a head's attention probabilities ends
up) and a neuron mask M^F on the input of the FFN down projection, applied by forward pre-hooks
and pushed towards sparsity by an L1 loss term."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ...core.errors import AdapterError
from ...core.model import AdaptedModel
from ...core.sites import iter_modules
from ...core.terms import LossTerm
from .blocks import Block, find_blocks

MASK_MODULE = "pruning_masks"          # attribute of the AdaptedModel holding the masks
MASK_GLOB = f"{MASK_MODULE}.*"         # their names in am.named_parameters(), for TrainConfig.lr_scale
L1_TERM = "light_peft_mask_l1"         # name of the L1 loss term


class PruningMasks(nn.Module):
    """The learnable masks: `heads[str(layer)]` (n_heads,) and `neurons[str(layer)]` (d_ff,),
    fp32, initialised to 1. Either dict may be empty (nothing of that kind is pruned)."""

    def __init__(self, blocks: Sequence[Block], *, heads: bool, neurons: bool,
                 device: torch.device | None = None) -> None:
        super().__init__()
        ones = lambda n: nn.Parameter(torch.ones(n, dtype=torch.float32, device=device))
        self.heads = nn.ParameterDict({str(b.layer): ones(b.n_heads) for b in blocks} if heads else {})
        self.neurons = nn.ParameterDict({str(b.layer): ones(b.d_ff) for b in blocks} if neurons else {})

    def l1(self) -> torch.Tensor:
        """Σ_ℓ ‖M^A_ℓ‖₁ + ‖M^F_ℓ‖₁ (a scalar)."""
        return sum((m.abs().sum() for m in self.parameters()), torch.zeros((), device=self._device()))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def values(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Detached copies: (layer -> head mask, layer -> neuron mask)."""
        return ({int(k): v.detach().float().cpu().clone() for k, v in self.heads.items()},
                {int(k): v.detach().float().cpu().clone() for k, v in self.neurons.items()})


def _scale_input(mask: nn.Parameter, repeat: int) -> Callable[[nn.Module, tuple], tuple]:
    """A forward pre-hook multiplying the last dimension of the input by `mask`, each entry
    repeated `repeat` times (a head's mask covers its head_dim channels)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]                                              # (..., len(mask) * repeat)
        scale = mask if repeat == 1 else mask.repeat_interleave(repeat)
        return (x * scale.to(x.dtype), *args[1:])
    return hook


def _has_masks(am: AdaptedModel) -> bool:
    """Whether `am` holds pruning masks (a Light-PEFT estimation is running)."""
    return MASK_MODULE in dict(am.named_children())


def attach_masks(am: AdaptedModel, *, heads: bool = True, neurons: bool = True) -> tuple[PruningMasks, list]:
    """Register `am.pruning_masks` and the pre-hooks that apply them; returns the masks and the
    hook handles. The hooks sit on the module at each layer's attn.o / ffn.down path (the
    AdaptedLayer when an adapter wraps it, so that adapter sees the masked input too)."""
    if _has_masks(am):
        raise AdapterError("this AdaptedModel already has pruning masks; finish or detach the "
                           "running Light-PEFT estimation first")
    blocks = find_blocks(am.model)
    device = next(am.model.parameters()).device
    masks = PruningMasks(blocks, heads=heads, neurons=neurons, device=device)
    modules = dict(iter_modules(am.model))
    handles = []
    for b in blocks:
        if heads:
            handles.append(modules[b.o].register_forward_pre_hook(
                _scale_input(masks.heads[str(b.layer)], b.head_dim)))
        if neurons:
            handles.append(modules[b.down].register_forward_pre_hook(
                _scale_input(masks.neurons[str(b.layer)], 1)))
    am.add_module(MASK_MODULE, masks)
    return masks, handles


def detach_masks(am: AdaptedModel, handles: Iterable) -> None:
    """Remove the mask hooks and `am.pruning_masks`."""
    for h in handles:
        h.remove()
    if _has_masks(am):
        delattr(am, MASK_MODULE)


def mask_l1_term(masks: PruningMasks, weight: float = 1e-4) -> LossTerm:
    """λ₁ · Σ(‖M^A‖₁ + ‖M^F‖₁) as an always-on loss term."""
    return LossTerm(L1_TERM, weight, lambda ctx: masks.l1())
