"""Quantised bases (issue 21, points 1 and 2): a tiny Llama loaded through transformers'
BitsAndBytesConfig in nf4 and int8 (bitsandbytes' CPU backend) is adapted like any other base.

References: bitsandbytes itself (its dequantisation and quantisation functions, its layers'
forwards) and peft's LoRA, DoRA and IA3 on the same quantised base, loaded from our export.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, logits
from method_checks import QUIET, check_training, snapshot_base
from torch import nn

import peftlab
from peftlab.apps.cli import main
from peftlab.core.errors import CapabilityError
from peftlab.core.geometry import dims, is_linear_like, stored_shape, weight_out_in
from peftlab.core.layer import AdaptedLayer, layer_kind
from peftlab.core.quantised import keep_layout, quantisation
from peftlab.core.sites import resolve_sites
from peftlab.methods import METHODS
from peftlab.training.pruning.slicing import check_sliceable

pytestmark = [*QUIET, pytest.mark.filterwarnings("ignore::FutureWarning")]

KINDS = ("nf4", "int8")
TARGETS = ["attn.q", "attn.v", "ffn.down"]        # ffn.down: 128 inputs, 64 outputs
CONFIGS = {
    "lora": lambda: peftlab.LoraConfig(r=4, targets=TARGETS),
    "dora": lambda: peftlab.LoraConfig(r=4, dora=True, targets=TARGETS),
    "ia3": lambda: peftlab.IA3Config(),
    "prompt": lambda: peftlab.PromptTuningConfig(num_virtual_tokens=4),
}
ROUTE = ["a", None, "b", "a"]


def ids(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, quantisation statistics included (bitsandbytes writes the
    4-bit QuantState's absmax, maps and packed header, and the int8 row scales, into it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def dequantise(module: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantisation of a Linear4bit / Linear8bitLt weight, (out, in) fp32."""
    w = module.weight
    if quantisation(module) == "int8":
        scale = w.SCB if w.SCB is not None else module.state.SCB
        return w.data.float() * scale.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def adapted(quantised_llama, kind: str, *adapters: tuple[str, peftlab.MethodConfig], seed: int = 0,
            scale: float = 0.1, dtype: torch.dtype = torch.float32) -> peftlab.AdaptedModel:
    """A quantised tiny Llama with these adapters, each moved off its start (seeded noise); the
    same arguments build the same adapters."""
    am = peftlab.adapt(quantised_llama(kind, dtype=dtype))
    torch.manual_seed(seed)                      # initialisations draw from the global generator
    for i, (name, config) in enumerate(adapters):
        am.add_adapter(name, config)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return am


def train_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits of a training-mode forward without gradients: bitsandbytes' int8 layers quantise
    the activations too in eval mode, so comparisons with dense arithmetic use this mode (the
    tiny Llama has no dropout)."""
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            return model(input_ids=x).logits
    finally:
        model.train(was)


# ---- a quantised layer is an ordinary linear site -------------------------------------------------
@pytest.mark.parametrize("kind", ("nf4", "fp4", "int8"))
def test_a_quantised_layer_is_an_ordinary_linear_site(kind, quantised_llama):
    model, dense = quantised_llama(kind), quantised_llama(None)
    down = model.model.layers[0].mlp.down_proj            # 128 inputs, 64 outputs
    assert quantisation(down) == kind and quantisation(dense.model.layers[0].mlp.down_proj) is None
    assert layer_kind(down) == "linear" and is_linear_like(down)
    assert dims(down) == (128, 64) == dims(dense.model.layers[0].mlp.down_proj)
    assert stored_shape(down) == (64, 128)
    if kind != "int8":
        assert tuple(down.weight.shape) == (64 * 128 // 2, 1)      # two 4-bit codes per byte
    w = weight_out_in(down)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, dequantise(down), rtol=1e-6, atol=0)     # int8: x/127 vs x·(1/127)
    assert w.data_ptr() != down.weight.data_ptr()           # a copy: writing into it changes nothing
    down.train()                                            # what the layer computes with
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(down(x), F.linear(x, w), rtol=0, atol=1e-5)
    # roles and all-linear find the same sites as on the unquantised model
    assert [s.path for s in resolve_sites(model, "all-linear")] == \
        [s.path for s in resolve_sites(dense, "all-linear")]
    # parameters are counted as the matrices they encode
    assert peftlab.adapt(model).base_parameters() == peftlab.adapt(dense).base_parameters()


def test_import_never_loads_bitsandbytes():
    """`import peftlab`, adapting, training and merging an unquantised model import nothing of it."""
    code = ("import sys, torch, peftlab\n"
            "am = peftlab.adapt(torch.nn.Sequential(torch.nn.Linear(8, 8)))\n"
            "am.add_adapter('a', peftlab.LoraConfig(r=2, dora=True, targets='all-linear'))\n"
            "am.set_active('a'); am.merge('a'); am.unmerge('a'); am.merge_and_unload(torch.bfloat16)\n"
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n")
    src = str(Path(peftlab.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_are_fp32_and_run_in_the_activation_dtype(kind, quantised_llama):
    """A bf16 model: adapters stored in fp32 (not in the packed uint8 / int8), outputs in bf16,
    gradients in the fp32 tensors; `dtype=` still chooses the storage."""
    am = adapted(quantised_llama, kind, ("a", peftlab.LoraConfig(r=4, dora=True, targets=TARGETS)),
                 ("b", peftlab.BottleneckConfig()), ("c", peftlab.IA3Config(dtype="bfloat16")),
                 dtype=torch.bfloat16)
    assert {t.dtype for t in am.adapter_tensors("a").values()} == {torch.float32}
    assert {t.dtype for t in am.adapter_tensors("b").values()} == {torch.float32}
    assert {t.dtype for t in am.adapter_tensors("c").values()} == {torch.bfloat16}
    am.set_active(["a", "b", "c"])
    am.set_trainable(["a", "b", "c"])
    am.train()
    out = am(input_ids=ids(2), labels=ids(2))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for name in "abc":
        for p in am.adapter_parameters(name):
            assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.abs().max() > 0


# ---- acceptance 1: training, checkpoints, mixed batches -------------------------------------------
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_methods_train_on_a_quantised_base(kind, method, quantised_llama):
    """5 steps: the loss falls, every adapter tensor moves, every gradient reaches it, and the
    base (packed weights and quantisation statistics included) is bit for bit as it was."""
    model = quantised_llama(kind)
    before = state(model)
    am = peftlab.adapt(model)
    am.add_adapter("a", CONFIGS[method]())
    am.set_active("a")
    am.set_trainable("a")
    am.train()
    reached = set()
    for p in am.adapter_parameters("a"):     # LoRA's A gets its first gradient once B moved
        p.register_hook(lambda g, p=p: reached.add(id(p)) if g.abs().max() > 0 else None)
    check_training(am, "a", ids(), ids(), lr=5e-2 if method == "prompt" else 1e-2)
    assert reached == {id(p) for p in am.adapter_parameters("a")}
    am.unload()
    assert_same_state(model, before)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_gradients_equal_peft_on_the_same_quantised_base(kind, method, quantised_llama, tmp_path):
    peft = pytest.importorskip("peft")
    am = adapted(quantised_llama, kind, ("a", CONFIGS[method]()))
    am.set_active("a")
    am.set_trainable("a")
    peftlab.export_peft(am, "a", tmp_path)
    base = quantised_llama(kind)
    keep_layout(base)     # bitsandbytes' CPU repacking would change peft's numbers (core/quantised.py)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=True)
    x = ids(2)
    out = []
    for model in (am, theirs):   # one forward each: peft's int8 DoRA fails on a second one on CPU
        model.train()
        step = model(input_ids=x, labels=x)
        step.loss.backward()
        out.append(step.logits.detach())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
    names = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
             "magnitude": "lora_magnitude_vector.default.weight", "ia3_l": "ia3_l.default"}
    params = dict(theirs.named_parameters())
    for path, part in am.adapter("a").parts().items():
        for tname, p in part.named_parameters():
            ref = params[f"base_model.model.{path}.{names[tname]}"].grad.reshape(p.shape)
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_onto_a_fresh_quantised_base(kind, method, quantised_llama, tmp_path):
    am = adapted(quantised_llama, kind, ("a", CONFIGS[method]()))
    am.set_active("a")
    x = ids()
    out = logits(am, x)
    with am.disabled():
        assert (logits(am, x) - out).abs().max() > 1e-3
    am.save_adapter(tmp_path / "a", "a")
    fresh = peftlab.adapt(quantised_llama(kind))
    fresh.load_adapter(tmp_path / "a", "a", strict=True)    # the same base: no identity warning
    fresh.set_active("a")
    torch.testing.assert_close(logits(fresh, x), out, rtol=0, atol=1e-5)
    dense = peftlab.adapt(quantised_llama(None))            # and it fits the unquantised original
    dense.load_adapter(tmp_path / "a", "a", strict=True)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_mixed_batch_equals_single_runs(kind, method, quantised_llama):
    configs = {"lora": lambda r: peftlab.LoraConfig(r=r, targets=TARGETS),
               "dora": lambda r: peftlab.LoraConfig(r=r, dora=True, targets=TARGETS),
               "ia3": lambda r: peftlab.IA3Config()}
    am = adapted(quantised_llama, kind, ("a", configs[method](2)), ("b", configs[method](4)))
    x = ids(len(ROUTE))
    with torch.no_grad():
        mixed = am(input_ids=x, adapter_ids=ROUTE).logits
        alone = []
        for i, name in enumerate(ROUTE):
            am.set_active([name] if name else [])
            alone.append(am(input_ids=x[i:i + 1]).logits)
        same = am(input_ids=x[:1].expand(3, -1), adapter_ids=["a", "b", None]).logits
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=1e-5)
    # the same input through a, b and the base: three different outputs
    assert (same[0] - same[1]).abs().max() > 1e-3 and (same[0] - same[2]).abs().max() > 1e-3
    # training a routed batch: each adapter gets the gradients of its own rows
    am.set_trainable(["a", "b"])
    am.train()
    am(input_ids=x, adapter_ids=ROUTE).logits.square().mean(dim=(1, 2)).sum().backward()
    routed = {id(p): p.grad.clone() for n in "ab" for p in am.adapter_parameters(n)}
    am.zero_grad(set_to_none=True)
    for name in "ab":
        am.set_active(name)
        rows = [i for i, n in enumerate(ROUTE) if n == name]
        am(input_ids=x[rows]).logits.square().mean(dim=(1, 2)).sum().backward()
    for p in (p for n in "ab" for p in am.adapter_parameters(n)):
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(routed[id(p)], p.grad, rtol=1e-4, atol=1e-6)


# ---- methods that rewrite the base weight ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kasa_is_refused_and_the_model_is_unchanged(kind, quantised_llama):
    model = quantised_llama(kind)
    am = peftlab.adapt(model)    # first: an eval forward of the raw model lets bitsandbytes repack it
                                 # (test_layers_bitsandbytes_repacked_are_restored_and_train)
    before, out = state(model), logits(am, ids())
    with pytest.raises(CapabilityError, match="KaSA does not declare the 'quantised-base'"):
        am.add_adapter("k", peftlab.KasaConfig())
    assert not am.adapters and not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert_same_state(model, before)
    assert torch.equal(logits(am, ids()), out)
    am.add_adapter("k", peftlab.KasaConfig(targets=["lm_head"], r=2))   # an unquantised layer: fine


@pytest.mark.parametrize("kind", KINDS)
def test_pissa_starts_from_the_dequantised_weight_and_leaves_the_base_alone(kind, quantised_llama):
    model = quantised_llama(kind)
    am = peftlab.adapt(model)
    before, out = state(model), logits(am, ids())
    am.add_adapter("p", peftlab.LoraConfig(r=4, init="pissa", targets=TARGETS))
    am.set_active("p")
    torch.testing.assert_close(logits(am, ids()), out, rtol=0, atol=1e-6)   # a no-op at the start
    for path, delta in am.adapter("p").parts().items():
        w = dequantise(model.get_submodule(path).base_layer)
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        top = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(delta.scaling * delta.pissa_B0 @ delta.pissa_A0, top, rtol=0, atol=1e-5)
    am.set_trainable("p")
    am.train()
    check_training(am, "p", ids(), ids(), changed="any")
    am.unload()
    assert_same_state(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_s2ft_trains_and_merges_but_gradient_selection_is_refused(kind, quantised_llama):
    model = quantised_llama(kind)
    before = state(model)
    am = peftlab.adapt(model)
    config = peftlab.S2FTConfig(targets=["attn.v", "attn.o", "ffn.down"], v_ratio=0.5, o_ratio=0.5,
                                d_ratio=0.1)
    with pytest.raises(CapabilityError, match="quantised"):
        peftlab.select_by_gradient(am, config, [{"input_ids": ids(), "labels": ids()}])
    assert config.selected is None and not am.adapters
    assert_same_state(model, before)
    am.add_adapter("s", config)
    am.set_active("s")
    am.set_trainable("s")
    am.train()
    start = {path: part.S.detach().clone() for path, part in am.adapter("s").parts().items()}
    check_training(am, "s", ids(), ids(), lr=5e-2, changed="any")    # "any": the index buffers stay
    assert all(not torch.equal(part.S, start[n]) for n, part in am.adapter("s").parts().items() if part.n_sel)
    check_merge_within_the_reported_error(am, "s")


# ---- acceptance 2: merging ---------------------------------------------------------------------------
def check_merge_within_the_reported_error(am: peftlab.AdaptedModel, name: str) -> None:
    """Merge `name`: every merged quantised layer holds exactly bitsandbytes' quantisation of
    W + ΔW (computed here from the dequantised original and the adapter's unmerged outputs),
    its error is the one reported, its outputs are within max|error|·‖x‖₁ of the unmerged ones,
    the model's logits are not the base's (never a no-op), and unmerge restores every bit."""
    am.set_active(name)
    x = ids()
    layers = {path: layer for path, layer in am.adapter(name).layers.items() if layer.quantised}
    probes = {path: torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(3))
              for path, layer in layers.items()}
    eye = {path: torch.eye(layer.in_features) for path, layer in layers.items()}
    before = snapshot_base(am)
    with torch.no_grad():
        unmerged = {p: train_out(layer, probes[p]) for p, layer in layers.items()}
        # W + ΔW as the adapter computes it: the unmerged layer applied to the identity (no bias here)
        exact = {p: train_out(layer, eye[p]).t() for p, layer in layers.items()}
        originals = {p: dequantise(layer.base_layer) for p, layer in layers.items()}
    moved = {p for p in layers if not torch.allclose(exact[p], originals[p], rtol=0, atol=1e-6)}
    assert moved                                 # S2FT: layers without selected units do not move
    out = train_logits(am, x)
    with am.disabled():
        base = train_logits(am, x)
    am.merge(name)
    for path, layer in layers.items():
        error = layer.requantised
        got = dequantise(layer.base_layer)
        assert error is not None and error.quantisation == layer.quantised
        # W + ΔW computed here and in the merge differ in the last bits (DoRA's norm): the same
        # codes, scales within float rounding
        torch.testing.assert_close(got, reference_quantisation(layer.base_layer, exact[path]),
                                   rtol=0, atol=1e-6)
        diff = got - exact[path]
        assert error.max_abs == pytest.approx(float(diff.abs().max()), rel=1e-3, abs=1e-5)
        assert error.relative == pytest.approx(float(diff.norm() / exact[path].norm()), rel=1e-3, abs=1e-5)
        assert torch.equal(got, originals[path]) == (path not in moved)
        with torch.no_grad():
            merged = train_out(layer, probes[path])
        bound = error.max_abs * probes[path].abs().sum(-1, keepdim=True) + 1e-4
        assert ((merged - unmerged[path]).abs() <= bound).all(), path
    merged = train_logits(am, x)
    assert (merged - base).abs().max() > 0.25 * (out - base).abs().max()      # not a no-op
    assert (merged - out).abs().max() < (base - out).abs().max()
    table, card = am.status_table(), am.card(name)
    assert "requantisation error" in table and "requantisation error" in card
    assert all(r.requantised is not None for r in am.status() if r.path in layers)
    am.unmerge(name)
    for k, v in snapshot_base(am).items():
        assert torch.equal(v, before[k]), k
    assert all(layer.requantised is None for layer in layers.values())
    torch.testing.assert_close(train_logits(am, x), out, rtol=0, atol=0)


def train_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = layer.training
    layer.train()
    try:
        return layer(x)
    finally:
        layer.train(was)


def reference_quantisation(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' quantisation of `dense` with the layer's settings, dequantised again."""
    if quantisation(module) == "int8":
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(dense.half())
        return cb.float() * scb.float()[:, None] / 127
    state = module.weight.quant_state
    data, qs = bnb.functional.quantize_4bit(dense.to(state.dtype), blocksize=state.blocksize,
                                            compress_statistics=module.weight.compress_statistics,
                                            quant_type=state.quant_type)
    return bnb.functional.dequantize_4bit(data, qs).float()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantises_within_the_reported_error(kind, method, quantised_llama):
    am = adapted(quantised_llama, kind, ("a", CONFIGS[method]()), scale=0.3)
    check_merge_within_the_reported_error(am, "a")


@pytest.mark.parametrize("kind", KINDS)
def test_a_merge_the_rounding_would_undo_is_refused(kind, quantised_llama):
    """An adapter whose ΔW is far below the quantisation step: requantising gives the same
    weights back. merge says so and changes nothing, instead of a silent no-op."""
    am = adapted(quantised_llama, kind, ("a", CONFIGS["lora"]()))
    with torch.no_grad():
        for delta in am.adapter("a").parts().values():
            delta.lora_B.mul_(1e-6)
    am.set_active("a")
    x = ids()
    out = train_logits(am, x)
    with am.disabled():
        assert not torch.equal(train_logits(am, x), out)
    before = snapshot_base(am)
    with pytest.raises(CapabilityError, match=r"merge_and_unload\(dtype=torch.bfloat16\)"):
        am.merge("a")
    assert not am.adapter("a").merged
    assert all(not layer.merged and layer.unmerged is None and layer.requantised is None
               for layer in am.adapter("a").layers.values())
    for k, v in snapshot_base(am).items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(train_logits(am, x), out)
    with pytest.raises(CapabilityError, match="rounds the adapters away"):
        am.merge_and_unload()                        # requantising: the same refusal
    dense = am.merge_and_unload(dtype=torch.float32)  # the dense merge keeps it
    torch.testing.assert_close(train_logits(dense, x), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merges_fold_from_the_original_and_round_once(kind, quantised_llama):
    """merge(a) then merge(b) gives the same packed weights as merge([a, b]); unmerging a
    leaves exactly the weights of merging b alone; BitFit's bias needs no requantisation."""
    def build():
        return adapted(quantised_llama, kind, ("a", CONFIGS["lora"]()), ("b", CONFIGS["lora"]()),
                       ("c", peftlab.BitFitConfig(targets="all-linear")), scale=0.3)

    def packed(am):
        return {k: v for k, v in snapshot_base(am).items() if "bias" not in k}

    one, two = build(), build()
    for am in (one, two):
        am.set_active(["a", "b", "c"])
    one.merge("a")
    one.merge(["b", "c"])
    two.merge(["a", "b", "c"])
    assert packed(one).keys() == packed(two).keys()
    assert all(torch.equal(v, packed(two)[k]) for k, v in packed(one).items())
    k_proj = one.model.model.layers[0].self_attn.k_proj        # BitFit only
    assert k_proj.requantised.max_abs == 0 and k_proj.base_layer.bias.dtype == torch.float32
    alone = build()
    alone.set_active(["b", "c"])
    alone.merge(["b", "c"])
    one.unmerge("a")
    assert all(torch.equal(v, packed(alone)[k]) for k, v in packed(one).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_with_a_dtype_gives_a_dense_model(kind, dtype, quantised_llama, tmp_path):
    am = adapted(quantised_llama, kind, ("a", CONFIGS["dora"]()),
                 ("b", peftlab.LoraConfig(r=4, targets=["attn.k", "ffn.up"])), scale=0.3)
    am.set_active(["a", "b"])
    x = ids()
    out = train_logits(am, x)
    am.merge("b")                                    # merged before: folded again from the original
    model = am.merge_and_unload(dtype=dtype)
    assert not any(quantisation(m) for m in model.modules())
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == dtype and model.model.norm.weight.dtype == dtype
    assert getattr(model.config, "quantization_config", None) is None
    tol = 1e-5 if dtype == torch.float32 else 0.1
    got = train_logits(model, x)
    torch.testing.assert_close(got.float(), out, rtol=0, atol=tol)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert type(again.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(train_logits(again, x), got, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_without_a_dtype_keeps_the_base_quantised(kind, quantised_llama):
    one = adapted(quantised_llama, kind, ("a", CONFIGS["lora"]()), scale=0.3)
    two = adapted(quantised_llama, kind, ("a", CONFIGS["lora"]()), scale=0.3)
    for am in (one, two):
        am.set_active("a")
    one.merge("a")
    model = two.merge_and_unload()
    assert quantisation(model.model.layers[0].self_attn.q_proj) == kind
    torch.testing.assert_close(train_logits(model, ids()), train_logits(one, ids()), rtol=0, atol=0)


# ---- bitsandbytes' CPU repacking, refusals, the methods table ----------------------------------------
def test_layers_bitsandbytes_repacked_are_restored_and_train(quantised_llama):
    """On AVX512-BF16 CPUs bitsandbytes converts 4-bit weights in place on an eval forward, and
    a training forward through a converted layer returns no input gradient: adapting converts
    them back and keeps them so (elsewhere the conversion never happens and this still holds)."""
    model = quantised_llama("nf4")
    with torch.no_grad():
        model(input_ids=ids())                       # may repack every Linear4bit
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets="model.layers.0.self_attn.q_proj"))
    am.set_active("a")
    with torch.no_grad():
        am(input_ids=ids())
    layers = [m for m in model.modules() if quantisation(m)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    am.set_trainable("a")
    am.train()
    am(input_ids=ids(), labels=ids()).loss.backward()    # through every later (quantised) layer
    A = am.adapter("a").parts()["model.layers.0.self_attn.q_proj"].lora_A
    B = am.adapter("a").parts()["model.layers.0.self_attn.q_proj"].lora_B
    assert B.grad is not None and B.grad.abs().max() > 0 and A.grad is not None


def test_other_refusals_on_quantised_layers(quantised_llama):
    am = peftlab.adapt(quantised_llama("nf4"))
    with pytest.raises(CapabilityError, match="modules_to_save.*quantised"):
        am.add_adapter("a", peftlab.LoraConfig(modules_to_save=["model.layers.0.mlp.up_proj"]))
    assert not am.adapters
    with pytest.raises(CapabilityError, match="cannot be sliced"):
        check_sliceable(am.model.model.layers[0].mlp.up_proj, "model.layers.0.mlp.up_proj")

    class Tiny(nn.Module):           # bitsandbytes' fp16-weight int8 training layer
        def __init__(self):
            super().__init__()
            self.q_proj = bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=True)

        def forward(self, x):
            return self.q_proj(x)

    tiny = peftlab.adapt(Tiny())
    with pytest.raises(CapabilityError, match="has_fp16_weights"):
        tiny.add_adapter("a", peftlab.LoraConfig(targets=["q_proj"]))


def test_the_methods_table_shows_the_capabilities(capsys):
    assert main(["methods"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(METHODS)
    for name, method in METHODS.items():
        assert ("quantised-base" in rows[name]) == method.supports("quantised-base"), name
    assert "quantised-base" not in rows["kasa"] and "quantised-base" in rows["lora"]
