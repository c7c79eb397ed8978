"""LoRA, rsLoRA, DoRA and PiSSA against dense reference computations."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftlab
from peftlab.core.layer import AdaptedLayer

from conftest import BUILDERS, logits, tiny_gpt2, tiny_llama


def delta_of(am, path, name):
    return am.model.get_submodule(path).deltas[name]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_adapter_is_bit_identical_to_base(arch, ids):
    model = BUILDERS[arch]()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets=["all-linear", "embed"]))
    am.set_active("a")
    assert torch.equal(logits(am, ids), base)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", [{}, {"rslora": True}, {"dora": True}])
def test_merged_equals_unmerged_and_unload_is_plain(arch, variant, ids):
    model = BUILDERS[arch]()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear", init="random", **variant))
    am.set_active("a")
    unmerged = logits(am, ids)
    assert (unmerged - base).abs().max() > 1e-3     # the delta is real
    am.merge("a")
    assert torch.allclose(logits(am, ids), unmerged, atol=1e-5)
    am.unmerge("a")
    assert torch.allclose(logits(am, ids), unmerged, atol=1e-5)
    plain = am.merge_and_unload()
    assert not any(isinstance(m, (peftlab.AdaptedLayer, peftlab.ModuleCopies)) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), unmerged, atol=1e-5)


def dense_linear_reference(layer: nn.Linear, A, B, s, x):
    return F.linear(x, layer.weight + s * B @ A, layer.bias)


def test_lora_linear_matches_dense_weight_delta():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    net = nn.Sequential(lin)
    am = peftlab.adapt(net)
    am.add_adapter("a", peftlab.LoraConfig(r=3, alpha=6, targets="0", init="random"))
    am.set_active("a")
    d = delta_of(am, "0", "a")
    x = torch.randn(4, 6)
    assert d.scaling == 2.0
    torch.testing.assert_close(am(x), dense_linear_reference(lin, d.lora_A, d.lora_B, 2.0, x))


def test_rslora_scaling_and_patterns():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=4, alpha=8, rslora=True, targets=["attn.q", "attn.v"],
                                           rank_pattern={"attn.v": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}))
    q0 = delta_of(am, "model.layers.0.self_attn.q_proj", "a")
    q1 = delta_of(am, "model.layers.1.self_attn.q_proj", "a")
    v0 = delta_of(am, "model.layers.0.self_attn.v_proj", "a")
    assert q0.r == 4 and q0.scaling == 8 / math.sqrt(4)
    assert q1.scaling == 3 / math.sqrt(4)
    assert v0.r == 2 and tuple(v0.lora_A.shape) == (2, 32) and v0.scaling == 8 / math.sqrt(2)


def test_dora_matches_dense_definition():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    am = peftlab.adapt(nn.Sequential(lin))
    am.add_adapter("a", peftlab.LoraConfig(r=2, alpha=2, targets="0", init="random", dora=True))
    am.set_active("a")
    d = delta_of(am, "0", "a")
    with torch.no_grad():
        d.magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    V = lin.weight + d.scaling * d.lora_B @ d.lora_A
    W = d.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(am(x), F.linear(x, W, lin.bias))


def test_dora_magnitude_starts_at_row_norms():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    am = peftlab.adapt(nn.Sequential(lin))
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets="0", dora=True))
    torch.testing.assert_close(delta_of(am, "0", "a").magnitude, lin.weight.norm(dim=1))


def test_pissa_starts_at_principal_components_and_keeps_base():
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    am = peftlab.adapt(model)
    am.add_adapter("p", peftlab.LoraConfig(r=4, alpha=4, targets="attn.q", init="pissa"))
    d = delta_of(am, "model.layers.0.self_attn.q_proj", "p")
    U, S, Vh = torch.linalg.svd(w)
    top = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(d.scaling * d.lora_B @ d.lora_A, top, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)   # base untouched
    assert d.delta_weight().abs().max() < 1e-6                              # a no-op at start


def test_conv1d_merge_writes_transposed_delta(ids):
    model = tiny_gpt2()
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets="attn.qkv", init="random"))
    am.set_active("a")
    layer = am.model.transformer.h[0].attn.c_attn
    before = layer.base_layer.weight.detach().clone()         # (in, out)
    dw = layer.deltas["a"].delta_weight()                    # (out, in)
    am.merge("a")
    torch.testing.assert_close(layer.base_layer.weight, before + dw.t())


def test_embedding_lora_matches_dense_lookup(ids):
    model = tiny_llama()
    emb = model.model.embed_tokens
    am = peftlab.adapt(model)
    am.add_adapter("e", peftlab.LoraConfig(r=3, alpha=3, targets="embed", init="random"))
    am.set_active("e")
    d = delta_of(am, "model.embed_tokens", "e")
    expected = F.embedding(ids, emb.weight + (d.lora_B @ d.lora_A).t())
    torch.testing.assert_close(am.model.model.embed_tokens(ids), expected)


def test_dora_on_embedding_is_refused():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match="DoRA is not supported on the Embedding"):
        am.add_adapter("a", peftlab.LoraConfig(targets=["embed"], dora=True))
    assert not am.adapters


def test_dropout_only_in_training():
    torch.manual_seed(0)
    am = peftlab.adapt(nn.Sequential(nn.Linear(8, 8)))
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets="0", init="random", dropout=0.5))
    am.set_active("a")
    x = torch.randn(4, 8)
    am.eval()
    assert torch.equal(am(x), am(x))
    am.train()
    assert not torch.equal(am(x), am(x))


def test_bf16_base_gets_fp32_factors_unless_dtype_says_otherwise():
    model = tiny_llama().to(torch.bfloat16)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(targets="attn.q"))
    assert delta_of(am, "model.layers.0.self_attn.q_proj", "a").lora_A.dtype == torch.float32
    am.add_adapter("b", peftlab.LoraConfig(targets="attn.q", dtype="bfloat16"))
    assert delta_of(am, "model.layers.0.self_attn.q_proj", "b").lora_A.dtype == torch.bfloat16
    assert isinstance(am.model.model.layers[0].self_attn.q_proj, AdaptedLayer)


@pytest.mark.parametrize("dora", [False, True])
def test_pissa_with_dropout_drops_only_the_adapter_input(dora):
    """PiSSA's model in training is W_res x + s·B A·drop(x), W_res = W − s·B0 A0 (the frozen start
    is part of the base weight, so it sees x undropped); with DoRA the base is W_res too."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    am = peftlab.adapt(nn.Sequential(lin))
    am.add_adapter("p", peftlab.LoraConfig(r=2, alpha=4, targets="0", init="pissa", dropout=0.5, dora=dora))
    am.set_active("p")
    am.set_trainable("p")
    d = delta_of(am, "0", "p")
    with torch.no_grad():                      # move away from the start: B A ≠ B0 A0
        d.lora_A.add_(0.3 * torch.randn_like(d.lora_A))
        d.lora_B.add_(0.3 * torch.randn_like(d.lora_B))
    s, A, B = d.scaling, d.lora_A.detach(), d.lora_B.detach()
    w_res = lin.weight.detach() - s * d.pissa_B0 @ d.pissa_A0
    leaf = torch.randn(5, 8, requires_grad=True)
    x = leaf * 1.0                              # a non-leaf input, as inside a model
    am.train()
    torch.manual_seed(1)
    y = am(x)
    torch.manual_seed(1)
    dropped = F.dropout(x.detach(), 0.5, training=True)    # the same mask, by hand
    assert not torch.equal(dropped, x.detach())
    b = lin.bias.detach()
    if dora:     # peft's DoRA training form on the base W_res: W_res x + (m − 1)·W_res drop(x) + m·s B A drop(x)
        m = d.magnitude.detach() / (w_res + s * B @ A).norm(dim=1)
        expected = F.linear(x.detach(), w_res, b) + (m - 1) * F.linear(dropped, w_res) + m * s * (dropped @ A.t() @ B.t())
    else:
        expected = F.linear(x.detach(), w_res, b) + s * dropped @ A.t() @ B.t()
    torch.testing.assert_close(y.detach(), expected, atol=1e-5, rtol=1e-5)
    # the old form W x + s·(B A − B0 A0)·drop(x) differs by s·B0 A0·(x − drop(x)): not a tolerance issue
    old = F.linear(x.detach(), lin.weight.detach(), b) + s * dropped @ (B @ A - d.pissa_B0 @ d.pissa_A0).t()
    if not dora:
        assert (y.detach() - old).abs().max() > 1e-2
    y.sum().backward()                          # the rebuilt-input path runs backward too
    assert d.lora_A.grad is not None and leaf.grad is not None
    am.eval()                                   # eval: no dropout, the model is W_res x + s·B A x = W x + s(BA − B0A0) x
    if not dora:
        torch.testing.assert_close(am(x).detach(), F.linear(x.detach(), w_res, b) + s * x.detach() @ A.t() @ B.t(),
                                   atol=1e-5, rtol=1e-5)
