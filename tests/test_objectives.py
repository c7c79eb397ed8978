"""Auxiliary loss terms: registration, activation rules, captured outputs, schedules, training."""

from __future__ import annotations

import math

import pytest
import torch

import peftlab
from peftlab.errors import AdapterError, ConfigError
from peftlab.objectives import LossTerm, cosine_decay, delayed_ramp
from peftlab.train import TrainConfig, train

from conftest import tiny_llama
from test_train import TRAIN, LMTask


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
