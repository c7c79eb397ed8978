"""Adding adapters fast (issue 24, item 3) keeps what an add means: fresh adapters are no-ops in
every init mode, DoRA's magnitude is the base's row norms exactly, the same seed gives the same
factors, and the garbage collector paused during an install is restored however it ends."""

import gc
import math

import pytest
import torch

import peftlab
from peftlab.core.errors import TargetNotFoundError
from peftlab.core.layer import AdaptedLayer

from conftest import logits, tiny_llama


def deltas(am, name):
    return {path: m.deltas[name] for path, m in am.model.named_modules()
            if isinstance(m, AdaptedLayer) and name in m.deltas}


@pytest.mark.parametrize("init", ["zero", "gaussian"])
@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_is_a_no_op_in_every_zero_b_init(init, dora, ids):
    model = tiny_llama()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear", init=init, dora=dora))
    am.set_active("a")
    got = logits(am, ids)
    if dora:    # m / ‖W‖ · W x: equal up to the rounding of the row rescale
        assert torch.allclose(got, base, atol=1e-5)
    else:
        assert torch.equal(got, base)
    for delta in deltas(am, "a").values():
        assert torch.count_nonzero(delta.lora_B) == 0
        assert torch.count_nonzero(delta.lora_A) > 0     # A is drawn: B's gradient is not zero


@pytest.mark.parametrize("init", ["zero", "gaussian", "random"])
def test_dora_magnitude_is_the_row_norm_of_the_adapted_weight(init):
    """With B = 0 the magnitude is read from W alone (no B A product); with init='random' from
    W + s·B A: both exactly as torch.linalg.norm computes them."""
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear", init=init, dora=True))
    for path, delta in deltas(am, "a").items():
        weight = am.model.get_submodule(path).base_layer.weight.float()
        adapted = weight + delta.scaling * delta.lora_B.float() @ delta.lora_A.float()
        assert torch.equal(delta.magnitude, torch.linalg.norm(adapted if init == "random" else weight, dim=1))
        if init == "random":
            assert not torch.equal(delta.magnitude, torch.linalg.norm(weight, dim=1))


def test_same_seed_same_factors_and_kaiming_bounds():
    def factors(seed):
        am = peftlab.adapt(tiny_llama())
        torch.manual_seed(seed)
        am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear"))
        return {p: d.lora_A.clone() for p, d in deltas(am, "a").items()}

    first, again, other = factors(3), factors(3), factors(4)
    assert first.keys() == again.keys() and len(first) == 14
    assert all(torch.equal(first[p], again[p]) for p in first)
    assert not any(torch.equal(first[p], other[p]) for p in first)
    for a in first.values():        # U(±1/√fan_in), as nn.Linear's default
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1])


def test_collector_resumed_after_an_add_a_refused_add_and_left_off_when_it_was_off():
    am = peftlab.adapt(tiny_llama())
    assert gc.isenabled()
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear"))
    assert gc.isenabled()
    with pytest.raises(TargetNotFoundError):       # refused inside the install
        am.add_adapter("b", peftlab.LoraConfig(r=4, targets=["no_such_layer"]))
    assert gc.isenabled() and "b" not in am.adapters
    gc.disable()
    try:
        am.add_adapter("c", peftlab.LoraConfig(r=4, targets="all-linear"))
        assert not gc.isenabled()
    finally:
        gc.enable()
