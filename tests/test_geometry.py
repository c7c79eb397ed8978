"""The geometry section of core/sites.py (layer sizes and weights in (out, in) form whatever the
layer type stores, attention heads from the config) and LowRankDelta's in-place slicing, which
Light-PEFT pruning uses instead of reaching into LoRA's tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import peftlab
from peftlab.core.errors import CapabilityError
from peftlab.core.geometry import attention_heads, dims, weight_axes, weight_out_in
from peftlab.core.sites import resolve_sites


# ---- layer geometry -------------------------------------------------------------------------------
def test_dims_and_weight_out_in_read_every_layer_type_as_linear_does():
    c_attn = tiny_gpt2(0).transformer.h[0].attn.c_attn          # Conv1D: weight stored (in, out)
    cases = [(nn.Linear(5, 7), (5, 7)), (c_attn, (32, 96)), (nn.Embedding(11, 4), (11, 4)),
             (nn.LayerNorm(6), (6, 6))]
    for module, expected in cases:
        assert dims(module) == expected
        w = weight_out_in(module)
        assert w.data_ptr() == module.weight.data_ptr()              # a view, not a copy
        assert tuple(w.shape) == ((expected[1], expected[0]) if w.dim() == 2 else (expected[0],))
    assert weight_axes(nn.Linear(2, 3)) == (0, 1) and weight_axes(c_attn) == (1, 0)


def test_a_wrapper_answers_for_its_layer():
    am = peftlab.adapt(tiny_gpt2(0))
    am.add_adapter("a", peftlab.LoraConfig(targets=["attn.qkv"]))
    layer = am.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, peftlab.AdaptedLayer)
    assert dims(layer) == (layer.in_features, layer.out_features) == (32, 96)
    assert torch.equal(weight_out_in(layer), layer.weight_out_in())


def test_layers_without_an_out_in_reading_are_refused():
    assert dims(nn.Conv2d(2, 3, 3)) == (2, 3)       # torch convolutions: (in, out) channels
    with pytest.raises(CapabilityError, match="ConvTranspose2d"):
        dims(nn.ConvTranspose2d(2, 3, 3))
    with pytest.raises(CapabilityError, match="no weight"):
        dims(nn.ReLU())


# ---- attention geometry -----------------------------------------------------------------------------
@pytest.mark.parametrize("build, expected", [(tiny_llama, (4, 2, 8)), (tiny_gpt2, (4, 4, 8)),
                                             (tiny_bert, (4, 4, 8))])
def test_attention_heads_from_the_model_or_an_attention_module(build, expected):
    model = build(0)
    assert attention_heads(model) == expected
    attention = resolve_sites(model, "attn.out")[0].module      # the module attention runs in
    assert attention_heads(attention) == expected


def test_attention_heads_is_none_without_a_declared_head_count():
    assert attention_heads(nn.Linear(2, 2)) is None


# ---- LowRankDelta slicing ------------------------------------------------------------------------------
def _lora(init: str = "random") -> tuple[peftlab.AdaptedModel, "peftlab.AdaptedLayer"]:
    am = peftlab.adapt(tiny_llama(0))
    torch.manual_seed(5)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets=["attn.o"], init=init))
    am.set_active(["a"])
    am.set_trainable("a")
    return am, am.model.model.layers[0].self_attn.o_proj


@pytest.mark.parametrize("init", ["random", "pissa"])
def test_keep_ranks_slices_the_factors_and_keeps_scaling_and_trainability(init):
    am, layer = _lora(init)
    delta = layer.deltas["a"]
    B, A = delta.lora_B.detach().clone(), delta.lora_A.detach().clone()
    scaling, x = delta.scaling, torch.randn(3, 32)
    with torch.no_grad():
        layer(x)                                          # fills the cast cache of the factors
    keep = torch.tensor([0, 2])
    delta.keep_ranks(keep)
    assert delta.r == 2 and delta.scaling == scaling
    assert delta.lora_A.requires_grad and delta.lora_B.requires_grad
    assert torch.equal(delta.lora_A, A[keep]) and torch.equal(delta.lora_B, B[:, keep])
    if init == "pissa":
        assert delta.pissa_A0.shape == (2, 32) and delta.pissa_B0.shape == (32, 2)
    with torch.no_grad():                                 # the cache follows the new tensors
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.delta_weight().T)


def test_slice_features_keeps_the_matching_part_of_delta_w():
    am, layer = _lora("pissa")
    delta = layer.deltas["a"]
    dense = delta.delta_weight()
    rows, cols = torch.tensor([1, 4, 30]), torch.tensor([0, 3, 5, 31])
    delta.slice_features(in_index=cols, out_index=rows)
    torch.testing.assert_close(delta.delta_weight(), dense[rows][:, cols])
    assert delta.lora_A.shape == (4, 4) and delta.lora_B.shape == (3, 4) and delta.r == 4
    before = delta.lora_A
    delta.slice_features(out_index=torch.tensor([0, 1]))
    assert delta.lora_A is before                         # an untouched side stays the same tensor
