"""LoRA's inference fast path (methods/_lora_decode.py) against the reference path it replaces
(`PEFTLAB_LORA_DECODE=0`, here `_lora_decode.ENABLED = False`) and against dense merged weights."""

import copy
from contextlib import contextmanager

import pytest
import torch

import peftlab
from peftlab.core.precision import compute_dtype
from peftlab.methods import _lora_decode as decode

from conftest import BUILDERS, VOCAB

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}, "pissa": {"init": "pissa"}}
SHAPES = [(1, 1), (2, 9), (1, 1)]      # decode, a batch, decode again (groups learnt by then)


@contextmanager
def reference_path():
    decode.ENABLED = False
    try:
        yield
    finally:
        decode.ENABLED = True


@pytest.fixture(autouse=True)
def serve_every_dtype(monkeypatch):
    """The fast path serves only half activations by default; here fp32 too, to check its sums."""
    monkeypatch.setattr(decode, "SERVE_ALL", True)


def run(model, ids, mode=torch.inference_mode, **kwargs):
    with mode():
        out = model(input_ids=ids, **kwargs)
    return out.logits


def adapted(arch, variant, targets="all-linear", seed=0):
    am = peftlab.adapt(BUILDERS[arch](seed))
    config = dict(init="random") | VARIANTS[variant]
    if variant == "pissa":    # PiSSA's start has B·A = its top singular part: perturb B so ΔW ≠ 0
        config["init"] = "pissa"
    am.add_adapter("a", peftlab.LoraConfig(r=4, alpha=8, targets=targets, **config))
    if variant == "pissa":
        with torch.no_grad():
            for m in am.model.modules():
                if isinstance(m, peftlab.AdaptedLayer) and "a" in m.deltas:
                    m.deltas["a"].lora_B.add_(0.05 * torch.randn_like(m.deltas["a"].lora_B))
    am.set_active("a")
    return am


def ids_of(shape, seed=1):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_fast_path_equals_reference_and_dense(arch, variant, mode):
    am = adapted(arch, variant)
    merged = copy.deepcopy(am)
    merged.merge("a")
    for shape in SHAPES:
        ids = ids_of(shape)
        fast = run(am, ids, mode)
        with reference_path():
            ref = run(am, ids, mode)
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fast, run(merged, ids, mode), atol=1e-5, rtol=1e-5)
    q = am.model.get_submodule({"llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn",
                                "bert": "bert.encoder.layer.0.attention.self.query"}[arch]).deltas["a"]
    served = "_decode" in q.__dict__
    assert served == (variant != "dora")           # DoRA stays on the reference path
    if arch != "gpt2" and variant != "dora":        # q, k, v read one input: one shared GEMM
        assert len(q.__dict__["_lead"].members) == 3


def test_routed_batches_and_two_adapters_match_reference():
    am = peftlab.adapt(BUILDERS["llama"](0))
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        am.add_adapter(name, peftlab.LoraConfig(r=4, targets="all-linear", init="random"))
    ids = ids_of((2, 5))
    for _ in range(2):
        fast = run(am, ids, adapter_ids=["a", "b"])
        with reference_path():
            ref = run(am, ids, adapter_ids=["a", "b"])
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    am.set_active(["a", "b"])                   # both on every site: groups of six deltas
    for shape in SHAPES:
        fast = run(am, ids_of(shape))
        with reference_path():
            ref = run(am, ids_of(shape))
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    q = am.model.get_submodule("model.layers.0.self_attn.q_proj").deltas["a"]
    assert len(q.__dict__["_lead"].members) == 6


def test_updated_factors_are_never_served_stale():
    am = adapted("llama", "lora")
    ids = ids_of((1, 1))
    run(am, ids), run(am, ids)
    with torch.no_grad():           # an in-place update, as a load or hotswap makes
        for m in am.model.modules():
            if isinstance(m, peftlab.AdaptedLayer):
                m.deltas["a"].lora_B.mul_(-2.0)
    fast = run(am, ids)
    with reference_path():
        ref = run(am, ids)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    for m in am.model.modules():     # pruned ranks: new, smaller factors (a group's columns move)
        if isinstance(m, peftlab.AdaptedLayer):
            m.deltas["a"].keep_ranks(torch.tensor([0, 2]))
    fast = run(am, ids)
    with reference_path():
        ref = run(am, ids)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_input_written_between_siblings_is_seen():
    """A hook rewrites k_proj's input in place after q_proj read it: k must not take q's shared
    x·Aᵀ (outside inference_mode the tensor's version says it changed)."""
    am = adapted("llama", "lora")
    k = am.model.get_submodule("model.layers.0.self_attn.k_proj")
    ids = ids_of((1, 3))
    run(am, ids, torch.no_grad), run(am, ids, torch.no_grad)     # groups learnt
    k.register_forward_pre_hook(lambda module, args: (args[0].mul_(0.5), None)[1])
    fast = run(am, ids, torch.no_grad)
    with reference_path():
        ref = run(am, ids, torch.no_grad)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_a_member_that_stops_being_called_drops_its_group():
    am = adapted("llama", "lora")
    ids = ids_of((1, 1))
    run(am, ids), run(am, ids)
    layer = am.model.get_submodule("model.layers.0.self_attn.k_proj")
    am.delete_adapter("a")
    am.add_adapter("b", peftlab.LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random"))
    am.set_active("b")
    for _ in range(3):
        fast = run(am, ids)
        with reference_path():
            ref = run(am, ids)
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    assert "a" not in layer.deltas if isinstance(layer, peftlab.AdaptedLayer) else True
    assert decode._TRACK.pending is None             # nothing held past the forward


def test_training_and_compiled_forwards_keep_the_reference_path(monkeypatch):
    am = adapted("llama", "lora")
    am.set_trainable("a")
    am.train()

    def refuse(*args):
        raise AssertionError("fast path used")
    monkeypatch.setattr(decode, "contribute", refuse)
    am(input_ids=ids_of((2, 5))).logits.sum().backward()      # grad enabled: the reference
    am.eval()
    am.set_trainable(None)
    compiled = torch.compile(am.model, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids_of((1, 4)))


def test_half_activations_few_rows_run_in_fp32():
    am = adapted("llama", "lora")
    am.model.to(torch.bfloat16)
    d = am.model.get_submodule("model.layers.0.self_attn.q_proj").deltas["a"]
    assert decode.decode_dtype(d, torch.bfloat16, torch.device("cpu"), 1) == torch.float32
    many = decode.decode_dtype(d, torch.bfloat16, torch.device("cpu"), decode.SMALL_ROWS + 1)
    assert many == compute_dtype(d.lora_A.dtype, torch.bfloat16, torch.device("cpu"))   # the reference rule
    for shape in ((1, 1), (1, 1), (2, 9)):
        ids = ids_of(shape)
        fast = run(am, ids).float()
        with reference_path():
            ref = run(am, ids).float()
        torch.testing.assert_close(fast, ref, atol=0.1, rtol=0.05)    # bf16 rounding apart


def test_fp32_activations_take_the_reference_path_by_default(monkeypatch):
    monkeypatch.setattr(decode, "SERVE_ALL", False)
    am = adapted("llama", "lora")
    run(am, ids_of((1, 1)))
    assert "_decode" not in am.model.get_submodule("model.layers.0.self_attn.q_proj").deltas["a"].__dict__
