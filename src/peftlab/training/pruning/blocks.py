"""The transformer blocks pruning works on: each layer's attention and FFN module paths (from the
site roles of `core.sites`) and its current sizes (from the weights, which pruning shrinks, while
the model config keeps the sizes the model was built with)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.errors import CapabilityError
from ...core.geometry import attention_heads, dims
from ...core.model import AdaptedModel
from ...core.role_maps import model_family, model_layout
from ...core.sites import iter_modules, layer_index, site_roles

SUPPORTED_LAYOUTS = ("bert", "llama", "gpt2")
_NEEDED_ROLES = ("attn.out", "attn.o", "ffn.up", "ffn.down")
_SEPARATE_QKV_ROLES = ("attn.q", "attn.k", "attn.v")     # needed unless the model fuses them (attn.qkv)


@dataclass(frozen=True)
class Block:
    """Module paths of one transformer layer's attention and FFN (None where absent), and the
    current sizes: query heads, key/value heads, head width, FFN width."""

    layer: int
    attention: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None           # GPT-2's fused projection (q, k, v stacked on the output side)
    o: str
    up: str
    gate: str | None
    down: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer layers of a BERT-, Llama- or GPT-2-family model (an AdaptedModel's inner
    model works too: wrapped layers keep their paths), with their current sizes."""
    model = model.model if isinstance(model, AdaptedModel) else model
    if model_layout(model) not in SUPPORTED_LAYOUTS:
        raise CapabilityError(f"Light-PEFT pruning supports BERT-, Llama- and GPT-2-family models; "
                              f"{type(model).__name__} (architecture map {model_family(model)!r}) is "
                              "not one of them")
    by_layer: dict[int, dict[str, str]] = {}
    for path, role in site_roles(model).items():
        idx = layer_index(path)
        if idx is not None:
            by_layer.setdefault(idx, {})[role] = path
    modules = dict(iter_modules(model))
    blocks = [_block(model, idx, by_layer[idx], modules) for idx in sorted(by_layer)]
    if not blocks:
        raise CapabilityError(f"found no transformer layers in {type(model).__name__}")
    return blocks


def _block(model: nn.Module, idx: int, roles: dict[str, str], modules: dict[str, nn.Module]) -> Block:
    """Layer `idx` from its role -> path map; head counts from the projections' current widths."""
    missing = [r for r in _NEEDED_ROLES if r not in roles]
    if "attn.qkv" not in roles:
        missing += [r for r in _SEPARATE_QKV_ROLES if r not in roles]
    if missing:
        raise CapabilityError(f"layer {idx} of {type(model).__name__} lacks the modules for roles "
                              f"{missing}; Light-PEFT pruning needs attention and FFN projections")
    attention = roles["attn.out"]
    declared = attention_heads(modules[attention])
    if declared is None:
        raise CapabilityError(f"the attention module at {attention!r} ({type(modules[attention]).__name__}) "
                              "carries no config declaring its heads (num_attention_heads); head pruning "
                              "cannot size its heads")
    head_dim = declared[2]       # pruning removes whole heads: their width never changes
    n_heads = dims(modules[roles["attn.o"]])[0] // head_dim
    n_kv = dims(modules[roles["attn.k"]])[1] // head_dim if "attn.k" in roles else n_heads
    return Block(
        layer=idx, attention=attention, q=roles.get("attn.q"), k=roles.get("attn.k"),
        v=roles.get("attn.v"), qkv=roles.get("attn.qkv"), o=roles["attn.o"], up=roles["ffn.up"],
        gate=roles.get("ffn.gate"), down=roles["ffn.down"], n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, d_ff=dims(modules[roles["ffn.down"]])[0])
