"""S2FT: global-budget selection, partial-backprop autograd, merge, save/load and LoRA export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.methods.s2ft import (S2FTConfig, SliceDelta, _ColumnSlice, _RowSlice, s2ft_to_lora,
                                  select_by_gradient)

from conftest import BUILDERS, logits, tiny_bert, tiny_gpt2, tiny_llama
from method_checks import (assert_save_load_bit_exact, check_training, labels_for, rand_ids,
                           snapshot_base)

FULL = dict(v_ratio=0.5, o_ratio=0.25, u_ratio=0.1, d_ratio=0.05)


def s2ft_model(build=tiny_llama, **kw):
    am = peftlab.adapt(build())
    am.add_adapter("a", S2FTConfig(**kw))
    am.set_active("a")
    return am


def fill(am, name="a", seed=0, scale=0.1):
    """Random S (the index buffers stay as selected)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, tname), t in am.adapter_tensors(name).items():
            if tname == "S":
                t.copy_(scale * torch.randn(t.shape, generator=g))


def dense_delta(kind, index, S, d_out, d_in):
    """The dense masked ΔW: S scattered into the selected rows (column type) or columns (row type)."""
    dw = torch.zeros(d_out, d_in, dtype=S.dtype)
    if kind == "column":
        return dw.index_put((index,), S)
    return dw.t().index_put((index,), S.t()).t()


def deltas(am, name="a"):
    return am.adapters[name].parts()


# ---- selection --------------------------------------------------------------------------------------
def test_default_is_down_only_and_selects_at_least_one():
    cfg = S2FTConfig()
    assert cfg.targets == ["ffn.down"] and cfg.d_ratio == 0.03
    am = s2ft_model()
    # 2 layers x 48 channels = 96 units; round(0.03 * 96) = 3
    sel = am.adapters["a"].config.selected
    assert set(sel) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert sum(len(v) for v in sel.values()) == 3
    am2 = s2ft_model(d_ratio=0.001)         # 0.096 units rounds to 0: at least one
    assert sum(len(v) for v in am2.adapters["a"].config.selected.values()) == 1


def test_global_budget_counts_gqa_units_and_coupling():
    am = s2ft_model(**FULL)
    sel = am.adapters["a"].config.selected
    L = range(2)
    v = [sel[f"model.layers.{i}.self_attn.v_proj"] for i in L]
    o = [sel[f"model.layers.{i}.self_attn.o_proj"] for i in L]
    up = [sel[f"model.layers.{i}.mlp.up_proj"] for i in L]
    gate = [sel[f"model.layers.{i}.mlp.gate_proj"] for i in L]
    down = [sel[f"model.layers.{i}.mlp.down_proj"] for i in L]
    hd = 32 // 4                                             # head_dim 8; V has 2 kv heads = 16 rows
    # pools: V 2 layers x 2 kv heads = 4 -> 2 heads; O 2 x 4 query heads = 8 -> 2 heads;
    # channels 2 x 48 = 96 -> up/gate round(9.6) = 10, down round(4.8) = 5
    assert sum(map(len, v)) == 2 * hd and sum(map(len, o)) == 2 * hd
    assert sum(map(len, up)) == 10 and sum(map(len, down)) == 5
    assert up == gate                                         # a channel trains its up and gate rows
    for idx, limit in [*((x, 16) for x in v), *((x, 32) for x in o)]:
        assert len(idx) % hd == 0 and all(i < limit for i in idx)
        for h in range(0, len(idx), hd):                       # whole, aligned head blocks
            assert idx[h:h + hd] == list(range(idx[h], idx[h] + hd)) and idx[h] % hd == 0
    # delta shapes: column type (n_sel, d_in), row type (d_out, n_sel)
    d = deltas(am)
    assert tuple(d["model.layers.0.self_attn.v_proj"].S.shape) == (len(v[0]), 32)
    assert tuple(d["model.layers.0.self_attn.o_proj"].S.shape) == (32, len(o[0]))
    assert tuple(d["model.layers.0.mlp.down_proj"].S.shape) == (32, len(down[0]))
    assert d["model.layers.0.mlp.down_proj"].index.tolist() == down[0]
    assert am.num_parameters("a") == 32 * (sum(map(len, v + o + up + gate + down)))


def test_selection_is_seeded():
    sel = lambda seed: s2ft_model(**FULL, seed=seed).adapters["a"].config.selected
    assert sel(3) == sel(3)
    assert sel(3) != sel(4)


def test_weight_selection_picks_largest_slices():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 50      # column 7 of layer 1's down
        model.model.layers[0].self_attn.v_proj.weight[8:16] *= 50   # kv head 1 of layer 0
    am = peftlab.adapt(model)
    am.add_adapter("a", S2FTConfig(v_ratio=0.25, d_ratio=0.01, selection="weight"))   # 1 head, 1 channel
    sel = am.adapters["a"].config.selected
    assert sel["model.layers.1.mlp.down_proj"] == [7] and sel["model.layers.0.mlp.down_proj"] == []
    assert sel["model.layers.0.self_attn.v_proj"] == list(range(8, 16))


def test_gradient_selection_matches_dense_gradient_norms():
    am = peftlab.adapt(tiny_llama())
    ids = rand_ids(2, 9)
    cfg = select_by_gradient(am, S2FTConfig(d_ratio=0.05, u_ratio=0.05), [{"input_ids": ids, "labels": ids}])
    assert cfg.selection == "gradient"
    assert not any(p.requires_grad or p.grad is not None for p in am.model.parameters())
    # reference: gradients of the same loss on every down / up / gate weight, by plain autograd
    ref = tiny_llama()
    mlps = [layer.mlp for layer in ref.model.layers]
    for m in mlps:
        for lin in (m.up_proj, m.gate_proj, m.down_proj):
            lin.weight.requires_grad_(True)
    ref(input_ids=ids, labels=ids).loss.backward()
    down = torch.cat([m.down_proj.weight.grad.norm(dim=0) for m in mlps])
    upgate = torch.cat([(m.up_proj.weight.grad.pow(2).sum(1) + m.gate_proj.weight.grad.pow(2).sum(1)).sqrt()
                        for m in mlps])
    for scores, role in ((down, "down_proj"), (upgate, "up_proj")):
        top = sorted(scores.topk(5).indices.tolist())                # round(0.05 * 96) = 5
        got = [48 * i + c for i in range(2) for c in cfg.selected[f"model.layers.{i}.mlp.{role}"]]
        assert got == top
    am.add_adapter("g", cfg)
    assert am.adapters["g"].config.selected == cfg.selected
    with pytest.raises(ConfigError, match="select_by_gradient"):
        am.add_adapter("h", S2FTConfig(selection="gradient"))


def test_config_validation_and_unsupported_sites():
    for bad in ({"d_ratio": 1.5}, {"d_ratio": 0.0}, {"selection": "magic"}, {"v_ratio": -0.1}):
        with pytest.raises(ConfigError):
            S2FTConfig(**bad).validate()
    am = peftlab.adapt(tiny_gpt2())                 # fused c_attn: no separate V rows
    # attn.v is now the value third of c_attn, which S2FT (no fused-slice capability) is refused on
    with pytest.raises((ConfigError, CapabilityError), match="fused"):
        am.add_adapter("a", S2FTConfig(v_ratio=0.5, d_ratio=0.0))
    assert not am.adapters


# ---- forward, autograd ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_adapter_is_a_no_op(arch, ids):
    build = BUILDERS[arch]
    kw = dict(u_ratio=0.1, d_ratio=0.1) if arch == "gpt2" else FULL
    base = logits(build(), ids)
    am = s2ft_model(build, **kw)
    assert torch.equal(logits(am, ids), base)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_partial_backprop_matches_dense_masked_delta(kind):
    torch.manual_seed(0)
    d_in, d_out, N = 12, 10, (3, 5)
    index = torch.tensor([7, 1, 4] if kind == "column" else [2, 9, 11, 5])
    n = len(index)
    S = torch.randn((n, d_in) if kind == "column" else (d_out, n), dtype=torch.float64, requires_grad=True)
    x = torch.randn(*N, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    g = torch.randn(*N, d_out, dtype=torch.float64)

    saved = []
    def pack(t):
        saved.append(tuple(t.shape))
        return t
    base = F.linear(x, W)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn = _ColumnSlice if kind == "column" else _RowSlice
        y = fn.apply(base, x, S, index)
    gx, gS = torch.autograd.grad(y, (x, S), g)
    # what the S path keeps for backward: x for the column type, only x[..., sel] for the row type
    kept = [s for s in saved if s not in {tuple(S.shape), (n,)}]
    assert kept == ([(15, d_in)] if kind == "column" else [(15, n)])

    S2 = S.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, W + dense_delta(kind, index, S2, d_out, d_in))
    gx2, gS2 = torch.autograd.grad(y2, (x2, S2), g)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=0)
    torch.testing.assert_close(gS, gS2, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gx2, atol=1e-6, rtol=0)


def test_model_gradients_match_dense_masked_delta(ids):
    """Through the whole model: the adapter's ∇S equals autograd on W + dense masked ΔW."""
    am = s2ft_model(lambda: tiny_llama().double(), **FULL)
    fill(am)
    am.set_trainable("a")
    am(input_ids=ids, labels=ids).loss.backward()
    ref = tiny_llama().double()
    dense = {path: (d.S.detach().clone().requires_grad_(True), d)
             for path, d in deltas(am).items() if d.n_sel}
    assert len(dense) >= 4
    handles = []
    for path, (S, d) in dense.items():
        lin = ref.get_submodule(path)
        def hook(mod, args, out, S=S, d=d, lin=lin):
            return out + F.linear(args[0], dense_delta(d.kind, d.index, S, *lin.weight.shape))
        handles.append(lin.register_forward_hook(hook))
    ref(input_ids=ids, labels=ids).loss.backward()
    for path, (S, d) in dense.items():
        torch.testing.assert_close(d.S.grad, S.grad, atol=1e-6, rtol=0)


# ---- training, merge ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_touches_only_selected_slices(arch):
    build = BUILDERS[arch]
    am = s2ft_model(build, **FULL)
    am.set_trainable("a")
    ids = rand_ids(4, 9)
    check_training(am, "a", ids, labels_for(am, ids), steps=6, lr=1e-2, changed="any")
    sel = am.adapters["a"].config.selected
    kinds = {p: d.kind for p, d in deltas(am).items()}
    trained = logits(am, ids)
    base = build().state_dict()
    plain = am.merge_and_unload()
    torch.testing.assert_close(logits(plain, ids), trained, atol=1e-5, rtol=0)
    for key, w in plain.state_dict().items():
        path = key.rpartition(".")[0]
        diff = w != base[key]
        if path not in sel or not key.endswith("weight"):
            assert not diff.any(), key
            continue
        idx = sel[path]
        changed = diff.any(1) if kinds[path] == "column" else diff.any(0)
        assert set(changed.nonzero().flatten().tolist()) == set(idx), key     # exactly the slices


def test_merge_unmerge_and_disable():
    am = s2ft_model(**FULL)
    fill(am)
    ids = rand_ids()
    base = snapshot_base(am)
    with am.disabled():
        plain = logits(am, ids)
    adapted = logits(am, ids)
    assert (adapted - plain).abs().max() > 1e-3
    am.merge("a")
    torch.testing.assert_close(logits(am, ids), adapted, atol=1e-5, rtol=0)
    am.unmerge("a")
    torch.testing.assert_close(logits(am, ids), adapted, atol=1e-5, rtol=0)
    for k, v in snapshot_base(am).items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)


def test_save_load_bit_exact(tmp_path):
    am = s2ft_model(**FULL, seed=5)
    fill(am)
    saved, loaded = assert_save_load_bit_exact(am, "a", tiny_llama, tmp_path, rand_ids())
    assert any(k[1] == "index" and len(t) for k, t in loaded.items())


def test_load_keeps_saved_selection_even_with_other_seed_on_disk(tmp_path):
    """The index buffers come from the checkpoint: a load does not redraw the selection."""
    am = s2ft_model(d_ratio=0.2, seed=1)
    fill(am)
    am.save_adapter(tmp_path / "a", "a")
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "a", "b")
    for path, d in deltas(fresh, "b").items():
        assert torch.equal(d.index, deltas(am)[path].index)


# ---- LoRA export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lora_export_reproduces_logits(arch, tmp_path):
    build = BUILDERS[arch]
    am = s2ft_model(build, **FULL)
    fill(am, scale=0.5)
    ids = rand_ids(2, 9)
    out = am(input_ids=ids, output_hidden_states=True)
    lora = s2ft_to_lora(am, "a", "l")
    assert lora.method.name == "lora" and set(lora.layers) <= set(am.adapters["a"].layers)
    for path, ld in ((p, layer.deltas["l"]) for p, layer in lora.layers.items()):
        d = deltas(am)[path]
        assert ld.r == d.n_sel and ld.scaling == 1.0
        torch.testing.assert_close(ld.delta_weight(), d.delta_weight(*ld.delta_weight().shape), atol=0, rtol=0)
    am.set_active("l")
    got = am(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.hidden_states[-1], out.hidden_states[-1], atol=1e-5, rtol=0)
    # a regular LoRA adapter: saves, loads, merges
    am.save_adapter(tmp_path / "l", "l")
    fresh = peftlab.adapt(build())
    fresh.load_adapter(tmp_path / "l", "l")
    fresh.set_active("l")
    fresh.merge("l")
    torch.testing.assert_close(fresh(input_ids=ids).logits, out.logits, atol=1e-5, rtol=0)


def test_lora_export_to_peft(tmp_path):
    peft = pytest.importorskip("peft")
    am = s2ft_model(d_ratio=0.1, v_ratio=0.5)
    fill(am, scale=0.5)
    ids = rand_ids()
    expected = logits(am, ids)
    s2ft_to_lora(am, "a", "l")
    peftlab.export_peft(am, "l", tmp_path / "peft")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm, ids), expected, atol=1e-5, rtol=0)


def test_slice_delta_rejects_bad_kind():
    with pytest.raises(ValueError):
        SliceDelta("diagonal", 3, 3, 1, dtype=torch.float32, device=torch.device("cpu"))
