"""Activation taps: the tensors they record equal a dense recomputation, they follow adapters,
read the padding mask, and cost nothing (no hooks, nothing stored) when no one asks."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.errors import AdapterError, ConfigError
from peftlab.core.terms import LossTerm

from conftest import tiny_bert, tiny_llama


def mlp_inputs(model, layers) -> list[torch.Tensor]:
    """The input of every layer's FFN block, captured with plain hooks (the reference)."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for m in layers]
    return seen, handles


def test_ffn_act_is_the_tensor_the_down_projection_multiplies_llama(ids):
    am = peftlab.adapt(tiny_llama())
    mlps = [layer.mlp for layer in am.model.model.layers]
    seen, handles = mlp_inputs(am, mlps)
    with torch.no_grad(), am.taps.recording("ffn.act"):
        am(ids)
        acts = am.taps.get("ffn.act")
        assert len(acts) == 2
        for x, z, mlp in zip(seen, acts, mlps):
            expected = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)   # (B, T, d_ff)
    for h in handles:
        h.remove()


def test_ffn_act_bert_is_the_intermediate_activation_and_survives_adapters(ids):
    am = peftlab.adapt(tiny_bert())
    am.taps.require("ffn.act")
    # An adapter added after the tap wraps ffn.down: the tap sits on the base layer and still fires.
    am.add_adapter("a", peftlab.LoraConfig(targets=["ffn.down", "attn.q"], r=2, init="random"))
    am.set_active(["a"])
    layers = am.model.bert.encoder.layer
    seen, handles = mlp_inputs(am, [layer.intermediate for layer in layers])
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad(), am.taps.recording():
        am(input_ids=ids, attention_mask=mask)
        acts = am.taps.get("ffn.act")
        assert torch.equal(am.taps.token_mask, mask.bool())
        for x, z, layer in zip(seen, acts, layers):
            dense = layer.intermediate.dense
            expected = torch.nn.functional.gelu(x @ dense.weight.T + dense.bias)
            torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    for h in handles:
        h.remove()
    # Outside a recording nothing is stored; releasing the last user removes the hooks.
    with torch.no_grad():
        am(ids)
    assert am.taps.get("ffn.act") == []
    am.taps.release("ffn.act")
    downs = [layer.output.dense.base_layer for layer in layers]
    assert all(not d._forward_pre_hooks for d in downs)


def test_attention_probabilities_need_eager_attention(ids):
    model = tiny_llama()
    model.set_attn_implementation("eager")
    am = peftlab.adapt(model)
    with torch.no_grad(), am.taps.recording("attn.probs"):
        am(ids)
        probs = am.taps.get("attn.probs")
    assert len(probs) == 2 and probs[0].shape == (2, 4, 9, 9)                 # (B, H, T, S)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 4, 9))
    assert float(probs[0].triu(1).abs().max()) == 0.0                         # causal
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), am.taps.recording("attn.probs"), pytest.raises(ConfigError, match="eager"):
        am(ids)


def test_training_forwards_are_recorded_only_while_a_term_reads_them(ids):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=2))
    am.set_active(["a"])
    am.set_trainable("a")
    am.train()
    downs = [layer.mlp.down_proj for layer in am.model.model.layers]
    assert all(not d._forward_pre_hooks for d in downs)        # no hooks before anyone asks
    am.add_loss_term(LossTerm("act_l2", 1.0, lambda ctx: sum(z.pow(2).mean() for z in ctx.model.taps.get("ffn.act")),
                              adapter="a", activations=("ffn.act",)))
    am(ids)
    stored = am.taps.get("ffn.act")
    assert len(stored) == 2 and stored[0].requires_grad
    total, parts = am.auxiliary_loss()
    assert float(total.detach()) == pytest.approx(sum(float(z.detach().pow(2).mean()) for z in stored))
    assert am.taps.get("ffn.act") == []                          # released after the loss
    with pytest.raises(AdapterError, match="no training forward"):
        am.auxiliary_loss()
    am.set_trainable(None)                                       # term inactive: nothing recorded
    am(ids)
    assert am.taps.get("ffn.act") == []
    am.set_trainable("a")
    am.eval()                                                    # evaluation forwards are not recorded
    am(ids)
    assert am.taps.get("ffn.act") == []
    am.remove_loss_term("act_l2")
    assert all(not d._forward_pre_hooks for d in downs)


def test_unknown_point_names_the_known_ones():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(ConfigError, match="did you mean 'ffn.act'"):
        am.taps.require("ffn.actt")
    with pytest.raises(ConfigError, match="not required"):
        am.taps.release("ffn.act")
