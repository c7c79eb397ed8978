"""The public pieces AdaptedModel hands its concerns to: the Adapter record's tensors and marks,
keeping the training forward across a side forward, removing one delta, commutation, the card."""

import torch

import peftlab
from peftlab.core.attach import remove_delta
from peftlab.core.layer import AdaptedLayer, Delta
from peftlab.core.merging import commutes
from peftlab.core.report import card
from peftlab.core.terms import LossTerm

from conftest import logits, tiny_llama


def lora_model() -> peftlab.AdaptedModel:
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets=["attn.q", "attn.v"], init="random"))
    return am


def test_adapter_record_lists_its_tensors_and_sets_its_gradients():
    am = lora_model()
    adapter = am.adapter("a")
    assert adapter.tensors().keys() == am.adapter_tensors("a").keys()
    assert [id(p) for p in adapter.parameters()] == [id(p) for p in am.adapter_parameters("a")]
    adapter.set_trainable(True)
    assert adapter.trainable and all(p.requires_grad for p in adapter.parameters())
    am.set_trainable(None)
    assert not adapter.trainable and not any(p.requires_grad for p in adapter.parameters())


def test_keeping_last_forward_leaves_the_training_forward_for_loss_terms(ids):
    am = lora_model()
    am.add_loss_term(LossTerm("mean_logit", 1.0, lambda ctx: ctx.outputs.logits.mean(), needs_outputs=True))
    am.train()
    out = am(ids)
    with torch.no_grad(), am.keeping_last_forward():
        am(ids[:1])                                   # a side forward: not the one the terms read
    total, _ = am.auxiliary_loss()
    torch.testing.assert_close(total, out.logits.mean())
    assert am._last_forward is None


def test_remove_delta_restores_the_base_layer_when_it_was_the_last(ids):
    am = lora_model()
    base = logits(am, ids)
    path = am.adapter("a").sites[0].path
    layer = am.model.get_submodule(path)
    remove_delta(am.model, am.adapter("a").layers.pop(path), path, "a")
    assert not isinstance(am.model.get_submodule(path), AdaptedLayer)
    assert am.model.get_submodule(path) is layer.base_layer
    assert torch.equal(logits(am, ids), base)         # inactive adapter: outputs unchanged


def test_commutes_follows_the_declared_algebra():
    def delta(algebra: str) -> Delta:
        d = Delta()
        d.algebra = algebra
        return d

    assert commutes(delta("add"), delta("add")) and commutes(delta("scale"), delta("input"))
    assert not commutes(delta("add"), delta("input")) and not commutes(delta("none"), delta("none"))


def test_card_is_the_public_card():
    am = lora_model()
    assert peftlab.card is card
    assert card(am, "a") == am.card("a")
