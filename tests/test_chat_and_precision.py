"""What is trained is what is served (chat formatting shared by training, `peftlab generate` and
`peftlab serve`), and adapter precision on half-precision bases (fp32 trained tensors unless the
config's `dtype` says otherwise, cast at use, merged in fp32).

The precision tests compare a bf16 base carrying an adapter with the fp32 base carrying the very
same adapter tensors; "bf16 rounding" is what bf16 costs the plain base model on the same input.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, logits, tiny_llama
from safetensors import safe_open

import peftlab
from peftlab.core import precision
from peftlab.core.method import Capability
from peftlab.methods import METHODS

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

CONFIG = {"bitfit": {"targets": "all-linear"}}      # as tests/test_capabilities.py
ALL = list(METHODS)
ROUTE = ["a", None, "b", "a"]


# ---- adapter precision -------------------------------------------------------------------------------
def batch(rows: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def rounding() -> float:
    """What bf16 costs the plain tiny Llama's logits (max abs difference to fp32): ~2.5e-3."""
    ids = batch()
    return float((logits(tiny_llama().to(torch.bfloat16), ids).float() - logits(tiny_llama(), ids)).abs().max())


def with_adapter(name: str, base: torch.dtype, adapter: str = "a", am: peftlab.AdaptedModel | None = None,
                 seed: int = 0, **fields) -> peftlab.AdaptedModel:
    """Tiny Llama in dtype `base` (or `am`) with an adapter of method `name` moved off its start by
    seeded noise."""
    am = am or peftlab.adapt(tiny_llama().to(base))
    am.add_adapter(adapter, METHODS[name].config_cls(**{**CONFIG.get(name, {}), **fields}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(adapter):
            p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return am


def copy_adapter(src: peftlab.AdaptedModel, dst: peftlab.AdaptedModel, name: str = "a") -> None:
    """Every tensor of adapter `name` (parameters and buffers such as PiSSA's start) from src."""
    theirs = src.adapter_tensors(name)
    with torch.no_grad():
        for key, t in dst.adapter_tensors(name).items():
            t.copy_(theirs[key])


def stored_dtypes(am: peftlab.AdaptedModel, name: str = "a") -> set[torch.dtype]:
    return {p.dtype for p in am.adapter_parameters(name)}


def test_lora_on_a_bf16_base_acceptance(rounding):
    """Default LoraConfig on a bf16 tiny Llama: fp32 factors; outputs in bf16 and as close to the
    fp32 model with the same factors as bf16 allows; merge writes (W + ΔW in fp32) rounded once
    into the bf16 weight and agrees with the unmerged forward; dtype=torch.bfloat16 gives bf16."""
    ids = batch()
    am = peftlab.adapt(tiny_llama().to(torch.bfloat16))
    am.add_adapter("a", peftlab.LoraConfig())
    assert stored_dtypes(am) == {torch.float32}
    with torch.no_grad():
        for p in am.adapter_parameters("a"):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    am.set_active("a")
    ref = peftlab.adapt(tiny_llama())
    ref.add_adapter("a", peftlab.LoraConfig())
    copy_adapter(am, ref)
    ref.set_active("a")
    want = logits(ref, ids)
    out = logits(am, ids)
    assert out.dtype == torch.bfloat16
    assert (want - logits(tiny_llama(), ids)).abs().max() > 50 * rounding        # the adapter matters
    assert (out.float() - want).abs().max() <= 2 * rounding

    q = am.model.model.layers[0].self_attn.q_proj
    delta = q.deltas["a"]
    expected = (q.base_layer.weight.float() + delta.delta_weight()).to(torch.bfloat16)
    am.merge("a")
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(q.base_layer.weight, expected)                          # one rounding
    assert (logits(am, ids).float() - out.float()).abs().max() <= 2 * rounding
    am.unmerge("a")
    assert torch.equal(logits(am, ids), out)

    am.add_adapter("b", peftlab.LoraConfig(dtype=torch.bfloat16))
    assert stored_dtypes(am, "b") == {torch.bfloat16}
    assert am.adapter("b").config.dtype == "bfloat16"        # kept as its name: saved as JSON


def test_fp32_factors_keep_the_small_updates_bf16_factors_lose():
    """One AdamW step of lr 1e-5 moves every fp32 factor entry by ~1e-5 and lands its gradient in
    fp32; the same step on bf16 factors (spacing ~5e-4 at 0.1) leaves nearly all of A unchanged."""
    ids = batch()
    moved = {}
    for dtype in (None, "bfloat16"):
        am = peftlab.adapt(tiny_llama().to(torch.bfloat16))
        am.add_adapter("a", peftlab.LoraConfig(dtype=dtype, init="random"))
        am.set_active("a")
        am.set_trainable("a")
        delta = am.model.model.layers[0].self_attn.q_proj.deltas["a"]
        before = delta.lora_A.detach().clone()
        opt = torch.optim.AdamW(am.adapter_parameters("a"), lr=1e-5, weight_decay=0.0)
        am(input_ids=ids, labels=ids).loss.backward()
        assert {p.grad.dtype for p in am.adapter_parameters("a")} == stored_dtypes(am)
        opt.step()
        moved[dtype] = (delta.lora_A.detach().float() - before.float()).abs()
    assert moved[None].median() == pytest.approx(1e-5, rel=0.05)
    assert (moved["bfloat16"] == 0).float().mean() > 0.9


def test_an_inference_cast_is_made_once_per_weight_update():
    """With no gradients the cast of the fp32 factors into the compute dtype is cached: a second
    forward reuses it; an in-place update (an optimiser step) makes the next forward recast."""
    ids = batch()
    am = with_adapter("lora", torch.bfloat16)
    am.set_active("a")
    delta = am.model.model.layers[0].self_attn.q_proj.deltas["a"]
    logits(am, ids)
    cached = delta.__dict__["_cast"]
    logits(am, ids)
    assert delta.__dict__["_cast"] is cached
    with torch.no_grad():
        delta.lora_A.add_(1.0)
    logits(am, ids)
    again = delta.__dict__["_cast"]
    assert again is not cached
    A = again[1][0]
    assert torch.equal(A, delta.lora_A.to(A.dtype))


@pytest.mark.parametrize("upcast", [False, True], ids=["bf16-gemm", "fp32-gemm"])
@pytest.mark.parametrize("name", ALL)
def test_every_method_on_a_bf16_base(name, upcast, rounding, monkeypatch):
    """Each method's default config on a bf16 tiny Llama: trained tensors fp32; outputs bf16 and
    within bf16 rounding of the fp32 base with the same adapter tensors; merged == unmerged (where
    the method merges); gradients land in the fp32 tensors; dtype='bfloat16' stores bf16. Both
    compute paths: products in bf16, and in fp32 as on CPUs without fast bf16 GEMMs."""
    monkeypatch.setattr(precision, "UPCAST_ON_CPU", upcast)
    ids = batch()
    am = with_adapter(name, torch.bfloat16)
    assert stored_dtypes(am) == {torch.float32}
    ref = with_adapter(name, torch.float32)
    copy_adapter(am, ref)
    for m in (am, ref):
        m.set_active("a")
    want = logits(ref, ids)
    with ref.disabled():
        assert (want - logits(ref, ids)).abs().max() > 10 * rounding              # the adapter matters
    out = logits(am, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() <= 4 * rounding
    if Capability.MERGE in METHODS[name].capabilities:
        am.merge("a")
        assert (logits(am, ids).float() - out.float()).abs().max() <= 4 * rounding
        am.unmerge("a")
    am.set_trainable("a")
    am(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in am.adapter_parameters("a")]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0

    half = with_adapter(name, torch.bfloat16, dtype="bfloat16")
    assert stored_dtypes(half) == {torch.bfloat16}
    half.set_active("a")
    assert logits(half, ids).dtype == torch.bfloat16


@pytest.mark.parametrize("name", [n for n in ALL if Capability.MIXED_BATCH in METHODS[n].capabilities])
def test_a_mixed_batch_of_fp32_and_bf16_adapters_on_a_bf16_base(name, rounding):
    """Adapter a stored in fp32 (the default), b in bf16 (dtype=), and the base, routed in one
    batch on a bf16 base: bf16 outputs within bf16 rounding of the fp32 base routing the same
    adapter tensors (which tests/test_capabilities.py checks against each adapter alone)."""
    ids = batch(len(ROUTE))
    models = {}
    for base in (torch.bfloat16, torch.float32):
        am = with_adapter(name, base)
        with_adapter(name, base, "b", am=am, seed=1, dtype="bfloat16")
        models[base] = am
    for adapter in "ab":
        copy_adapter(models[torch.bfloat16], models[torch.float32], adapter)
    with torch.no_grad():
        mixed, want = (models[base](ids, adapter_ids=ROUTE).logits for base in (torch.bfloat16, torch.float32))
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - want).abs().max() <= 4 * rounding


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_checkpoints_keep_fp32_tensors_and_reload_bit_exact(name, tmp_path):
    """A bf16 base's fp32 adapter is saved as fp32 and reloads bit for bit, on a bf16 base and on an
    fp32 one; a bf16-stored adapter (dtype=) stays bf16 through its checkpoint."""
    ids = batch()
    am = with_adapter(name, torch.bfloat16)
    with_adapter(name, torch.bfloat16, "b", am=am, seed=1, dtype="bfloat16")
    for adapter in "ab":
        am.save_adapter(tmp_path / adapter, adapter)
    files = sorted((tmp_path / "a").rglob("*.safetensors"))
    assert files
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}, path.name
    am.set_active("a")
    out = logits(am, ids)
    for dtype in (torch.bfloat16, torch.float32):
        fresh = peftlab.adapt(tiny_llama().to(dtype))
        for adapter in "ab":
            fresh.load_adapter(tmp_path / adapter, adapter)
            mine, theirs = am.adapter_tensors(adapter), fresh.adapter_tensors(adapter)
            assert all(torch.equal(theirs[k], t) and theirs[k].dtype == t.dtype for k, t in mine.items())
        if dtype == torch.bfloat16:
            fresh.set_active("a")
            assert torch.equal(logits(fresh, ids), out)
