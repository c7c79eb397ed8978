"""Auxiliary loss terms: registration, activation rules, captured outputs, schedules, training."""

from __future__ import annotations

import math

import pytest
import torch

import peftlab
from peftlab.core.errors import AdapterError, ConfigError
from peftlab.core.terms import LossTerm, cosine_decay, delayed_ramp
from peftlab.training.loop import TrainConfig, train

from conftest import tiny_llama
from test_train import EVAL, TRAIN, LMTask


def make_am() -> peftlab.AdaptedModel:
    am = peftlab.adapt(tiny_llama(0))
    am.add_adapter("a", peftlab.LoraConfig(r=4, alpha=8, init="random"))
    am.set_active(["a"])
    am.set_trainable("a")
    return am


def l2(name: str):
    return lambda ctx: sum((p.float() ** 2).sum() for p in ctx.model.adapter_parameters(name))


def test_term_counts_only_while_its_adapter_is_active_and_trainable():
    am = make_am()
    am.add_loss_term(LossTerm("l2", 0.5, l2("a"), adapter="a"))
    total, parts = am.auxiliary_loss()
    expected = 0.5 * sum(float((p.detach() ** 2).sum()) for p in am.adapter_parameters("a"))
    assert math.isclose(float(total.detach()), expected, rel_tol=1e-6) and parts == {"l2": pytest.approx(expected)}
    am.set_trainable(None)
    assert am.auxiliary_loss() == (None, {})
    am.set_trainable("a")
    am.set_active([])
    assert am.auxiliary_loss() == (None, {})
    am.set_active(["a"])
    with am.disabled():
        assert am.auxiliary_loss() == (None, {})
    am.delete_adapter("a")
    assert am.loss_terms == {}


def test_terms_reading_outputs_get_the_last_training_forward():
    am = make_am()
    seen = []

    def mean_logit(ctx):
        seen.append(ctx.inputs)
        return ctx.outputs.logits.mean()

    am.add_loss_term(LossTerm("mean_logit", 2.0, mean_logit, needs_outputs=True))
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    am.eval()
    am(ids)
    with pytest.raises(AdapterError, match="no training forward"):   # eval forwards are not kept
        am.auxiliary_loss()
    am.train()
    out = am(ids)
    total, _ = am.auxiliary_loss()
    assert torch.equal(seen[-1]["input_ids"], ids)
    torch.testing.assert_close(total, 2.0 * out.logits.mean())
    total.backward()                     # differentiable through the captured output
    assert any(p.grad is not None for p in am.adapter_parameters("a"))
    assert am._last_forward is None      # released after use


def test_schedules_and_bad_weight():
    assert cosine_decay(0.1)(0.0) == pytest.approx(1.0) and cosine_decay(0.1)(1.0) == pytest.approx(0.1)
    ramp = delayed_ramp(0.2, 0.05)
    assert ramp(0.1) == 0.0 and ramp(0.225) == pytest.approx(0.5) and ramp(0.9) == 1.0
    term = LossTerm("t", 3.0, lambda ctx: torch.ones(()), schedule=ramp)
    assert term.factor(0, 101) == 0.0 and term.factor(100, 101) == 3.0
    with pytest.raises(ConfigError, match="finite"):
        LossTerm("bad", float("nan"), lambda ctx: torch.ones(()))
    with pytest.raises(ConfigError, match="no loss term"):
        make_am().remove_loss_term("missing")


def test_training_loop_adds_the_terms():
    """A strong L2 term on the adapter shrinks it; without the term it grows."""
    norms = {}
    for weight in (0.0, 10.0):
        am = make_am()
        start = sum(float((p.detach() ** 2).sum()) for p in am.adapter_parameters("a"))
        if weight:
            am.add_loss_term(LossTerm("l2", weight, l2("a"), adapter="a"))
        train(am, "a", LMTask(), TRAIN, None, TrainConfig(steps=6, batch_size=8, lr=1e-2, progress=False))
        norms[weight] = sum(float((p.detach() ** 2).sum()) for p in am.adapter_parameters("a")) / start
    assert norms[10.0] < 0.9 < norms[0.0]


# ---- DEFT density loss and the exact density metric -----------------------------------------------
def relu_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3, hidden_act="relu")
    return BertForSequenceClassification(cfg)


def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return ids, mask


def intermediate_outputs(model):
    seen = []
    handles = [layer.intermediate.register_forward_hook(lambda _m, _a, out: seen.append(out))
               for layer in model.bert.encoder.layer]
    return seen, handles


def test_density_term_is_the_smooth_l0_surrogate_over_real_tokens():
    from peftlab.training.objectives import density_term
    am = peftlab.adapt(relu_bert())
    am.add_adapter("a", peftlab.LoraConfig(targets=["ffn.up"], r=2, init="random"))
    am.set_active(["a"])
    am.set_trainable("a")
    eps = 1e-2
    am.add_loss_term(density_term(0.5, eps=eps))
    ids, mask = padded_batch()
    seen, handles = intermediate_outputs(am.model)
    am.train()
    am(input_ids=ids, attention_mask=mask)
    total, parts = am.auxiliary_loss()
    # Reference: explicit loops in float64 over layers, examples and real tokens.
    per_layer = []
    for z in seen:
        z = z.detach().double()
        rhos = []
        for b in range(z.shape[0]):
            real = [t for t in range(z.shape[1]) if mask[b, t]]
            rhos.append(sum(float((z[b, t] ** 2 / (z[b, t] ** 2 + eps)).mean()) for t in real) / len(real))
        per_layer.append(sum(rhos) / len(rhos))
    expected = 0.5 * sum(per_layer) / len(per_layer)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert parts == {"density": pytest.approx(expected, rel=1e-5)}
    total.backward()
    grads = [p.grad for p in am.adapter_parameters("a")]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    for h in handles:
        h.remove()


def test_activation_density_counts_nonzeros_of_real_tokens():
    from peftlab.training.objectives import activation_density
    am = peftlab.adapt(relu_bert())
    ids, mask = padded_batch()
    seen, handles = intermediate_outputs(am.model)
    am.train()   # the metric evaluates in eval mode and restores the modes
    for threshold in (0.0, 0.05):
        seen.clear()
        got = activation_density(am, [{"input_ids": ids, "attention_mask": mask}], threshold=threshold)
        expected = []
        for z in seen:
            dens = [float((z[b, mask[b].bool()].abs() > threshold).float().mean()) for b in range(3)]
            expected.append(sum(dens) / 3)
        assert got["examples"] == 3
        assert got["per_layer"] == pytest.approx(expected, rel=1e-6)
        assert got["density"] == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert 0.2 < got["density"] < 0.8 and am.training
    for h in handles:
        h.remove()


def test_density_loss_makes_ffn_activations_sparser():
    """Same seed, same data: the run with DEFT's loss ends with fewer active FFN units (|z| > 1e-2;
    the tiny model's SiLU-gated activations are small, so ε = 1e-4 instead of DEFT's 1e-7;
    measured 0.101 -> 0.031)."""
    from peftlab.training.objectives import activation_density, density_term
    rows = [{"input_ids": r["input_ids"]} for r in EVAL]
    density, losses = {}, {}
    for weight in (0.0, 1.0):
        am = make_am()
        if weight:
            am.add_loss_term(density_term(weight, eps=1e-4))
        result = train(am, "a", LMTask(), TRAIN, None,
                       TrainConfig(steps=20, batch_size=8, lr=5e-2, progress=False))
        density[weight] = activation_density(am, [{"input_ids": torch.stack([r["input_ids"] for r in rows])}],
                                             threshold=1e-2)["density"]
        losses[weight] = result.losses
    assert density[1.0] < 0.5 * density[0.0]
    assert losses[1.0][-1] < losses[1.0][0]
