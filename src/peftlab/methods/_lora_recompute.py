"""LoRA's down-projection h = x Aᵀ without keeping x: one autograd node that keeps only A and
rebuilds x in backward from what the frozen model keeps anyway (core/recompute.py); the rank-r
h that the up-projection keeps is small. Gradients are those of F.linear(x, A), op for op
(tests/test_lora_recompute.py)."""

from __future__ import annotations

import torch

from ..core.recompute import Recovery, recovery


class _RebuiltDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, found: Recovery) -> torch.Tensor:
        # x (..., d_in) in the compute dtype; A (r, d_in)
        ctx.save_for_backward(A)
        ctx.found = found
        return torch.nn.functional.linear(x, A)                                   # (..., r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (A,) = ctx.saved_tensors
        gh = grad.reshape(-1, grad.shape[-1])                                    # (M, r)
        grad_x = gh.mm(A).view(*grad.shape[:-1], A.shape[1]) if ctx.needs_input_grad[0] else None
        x = ctx.found.take()            # taken even when A needs no gradient: the count stays right
        grad_A = None
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = gh.t().mm(x2 if x2.dtype == A.dtype else x2.to(A.dtype))   # (r, d_in)
        return grad_x, grad_A, None


def rebuilt_down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor | None:
    """x Aᵀ (..., r) with x rebuilt in backward, or None when that does not apply (no gradient to
    A, torch.compile tracing, or x not rebuildable: the caller then keeps x with F.linear)."""
    if not (A.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return None
    found = recovery(x)
    if found is None:
        return None
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _RebuiltDown.apply(x.to(A.dtype), A, found)
    # under autocast: the casts F.linear would make, recorded outside the node so that the
    # gradients go back through them to fp32 as they would from F.linear
    dtype = torch.get_autocast_dtype(device)
    x, A = x.to(dtype), A.to(dtype)
    with torch.autocast(device, enabled=False):
        return _RebuiltDown.apply(x, A, found)
