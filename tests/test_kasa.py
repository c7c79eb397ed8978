"""KaSA: SVD truncation of the base at attach (and its exact undoing), the B·diag(δ)·A update,
the singular-value / orthogonality penalties, merging, training and checkpoints — checked against
direct dense computations on tiny Llama, GPT-2 (Conv1D) and BERT models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, logits, tiny_llama
from method_checks import hidden, labels_for, rand_ids, snapshot_adapter

import peftlab
from peftlab.core.layer import AdaptedLayer
from peftlab.methods.kasa import (
    KasaConfig,
    KasaDelta,
    dropped_components,
    orthogonality,
)

TARGETS = {"llama": ["attn.q", "attn.v", "ffn.down"], "gpt2": ["attn.qkv", "ffn.down"],
           "bert": ["attn.q", "attn.v", "ffn.up"]}


def out_in(module) -> torch.Tensor:
    """A base layer's weight as (out, in) (GPT-2's Conv1D stores it transposed)."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def originals(model, paths) -> dict[str, torch.Tensor]:
    return {p: out_in(model.get_submodule(p)).detach().clone() for p in paths}


def truncation(w: torch.Tensor, keep: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (U[:, :keep] * S[:keep]) @ Vh[:keep]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def deltas(am, name="k") -> dict[str, KasaDelta]:
    return am.adapters[name].parts()


def attach(arch, **kw):
    model = BUILDERS[arch]()
    am = peftlab.adapt(model)
    am.add_adapter("k", KasaConfig(targets=TARGETS[arch], **kw))
    am.set_active("k")
    return am


def perturb_B(am, name="k", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in deltas(am, name).values():
            d.lora_B.copy_(scale * torch.randn(d.lora_B.shape, generator=g))


# ---- attach: the truncation --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_attach_truncates_base_to_rank_k_minus_r_and_keeps_dropped_triplets(arch):
    model = BUILDERS[arch]()
    am = peftlab.adapt(model)
    paths = [s.path for s in am.add_adapter("k", KasaConfig(r=4, targets=TARGETS[arch])).sites]
    # reference: the original weights, from an identical fresh model
    before = originals(BUILDERS[arch](), paths)
    for path, d in deltas(am).items():
        w0 = before[path]
        k = min(w0.shape)
        base = out_in(am.model.get_submodule(path).base_layer)
        assert rel(base, truncation(w0, k - 4)) <= 1e-5, path
        assert torch.linalg.matrix_rank(base.double(), rtol=1e-5) == k - 4
        # the dropped triplets are the r smallest: W = W_world + U_r diag(σ_r) V_rᵀ
        S = torch.linalg.svdvals(w0)
        torch.testing.assert_close(d.residual_S, S[-4:], rtol=1e-5, atol=1e-6)
        assert rel(base.float() + d.residual(), w0) <= 1e-6
        assert not any(t.requires_grad for t in d.buffers())
        assert d.lora_B.abs().max() == 0 and d.lora_A.abs().max() > 0 and d.lora_diag.abs().max() > 0
        bound = 1 / w0.shape[1] ** 0.5                        # Kaiming-uniform, a=√5
        assert d.lora_A.abs().max() <= bound


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_adapter_is_the_truncated_model_not_the_base(arch):
    """By design a fresh KaSA adapter changes the model (its base is W_world); with B = 0 the
    adapter itself adds nothing, so active, inactive and disabled all give the truncated model."""
    ids = rand_ids()
    original = hidden(BUILDERS[arch](), ids)
    reference = BUILDERS[arch]()                     # the paper's W_world, built by hand
    am = attach(arch)
    with torch.no_grad():
        for path in deltas(am):
            w = out_in(reference.get_submodule(path))
            w.copy_(truncation(w, min(w.shape) - 8).float())
    truncated = hidden(reference, ids)
    active = hidden(am, ids)
    assert (active - original).abs().max() > 1e-4          # not a no-op (BERT's logits are tiny: compare hidden states)
    torch.testing.assert_close(active, truncated, atol=1e-5, rtol=1e-4)
    with am.disabled():
        assert torch.equal(hidden(am, ids), active)
    am.set_active([])
    assert torch.equal(hidden(am, ids), active)


def test_forward_matches_dense_definition():
    am = attach("llama", dropout=0.0)
    perturb_B(am)
    layer = am.model.model.layers[0].self_attn.q_proj
    d = layer.deltas["k"]
    x = torch.randn(3, 32)
    w_world = layer.base_layer.weight
    expected = F.linear(x, w_world) + d.scaling * F.linear(d.lora_diag * F.linear(x, d.lora_A), d.lora_B)
    assert d.scaling == 16 / 8
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), F.linear(x, w_world + d.delta_weight()), atol=1e-5, rtol=1e-5)


# ---- undoing the truncation ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("how", ["delete", "unload"])
def test_delete_and_unload_restore_the_original_weights_and_logits(arch, how):
    ids = rand_ids()
    ref = BUILDERS[arch]()
    original = logits(ref, ids)
    am = attach(arch)
    before = originals(ref, deltas(am))
    perturb_B(am)
    am.merge("k")                                   # merge and unmerge on the way
    am.unmerge("k")
    if how == "delete":
        am.delete_adapter("k")
        model = am.model
        assert not am.loss_terms
    else:
        model = am.unload()
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    for path, w0 in before.items():
        assert rel(out_in(model.get_submodule(path)), w0) <= 1e-6, path
    torch.testing.assert_close(logits(model, ids), original, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_adapted_function():
    ids = rand_ids()
    am = attach("gpt2")
    perturb_B(am)
    adapted = logits(am, ids)
    plain = am.merge_and_unload()
    torch.testing.assert_close(logits(plain, ids), adapted, atol=1e-5, rtol=1e-5)


def test_delete_restores_beside_a_lora_adapter_on_the_same_layer():
    ids = rand_ids()
    ref = tiny_llama()
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("l", peftlab.LoraConfig(r=2, targets="attn.q", init="random"))
    am.add_adapter("k", KasaConfig(targets="attn.q"))
    am.set_active(["l", "k"])
    perturb_B(am)
    am.merge("l")
    am.delete_adapter("k")
    am.unmerge("l")
    am.set_active("l")
    ref_am = peftlab.adapt(ref)
    ref_am.add_adapter("l", peftlab.LoraConfig(r=2, targets="attn.q"))
    with torch.no_grad():
        for key, t in ref_am.adapter_tensors("l").items():
            t.copy_(am.adapter_tensors("l")[key])
    ref_am.set_active("l")
    torch.testing.assert_close(logits(am, ids), logits(ref_am, ids), atol=1e-5, rtol=1e-5)


def test_second_kasa_on_a_layer_is_refused_and_a_failed_attach_leaves_the_base():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("k", KasaConfig(targets="attn.q"))
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.self_attn.v_proj"]
    state = {p: out_in(am.model.get_submodule(p)).detach().clone() for p in paths}
    # v_proj sites come first and get truncated before the q_proj site refuses: all undone
    with pytest.raises(peftlab.ConfigError, match="already holds the KaSA adapter 'k'"):
        am.add_adapter("k2", KasaConfig(targets=["attn.v", "attn.q"]))
    assert list(am.adapters) == ["k"]
    for p, w in state.items():
        assert torch.equal(out_in(am.model.get_submodule(p)), w), p


def test_rank_must_be_below_min_dimension_and_config_checks():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match="must be below min"):
        am.add_adapter("k", KasaConfig(r=16, targets="attn.v"))       # v_proj is 16×32
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"beta": -1}, {"gamma": float("nan")},
                {"code_compat": "yes"}):
        with pytest.raises(peftlab.ConfigError):
            am.add_adapter("k", KasaConfig(**bad))
    assert not am.adapters


# ---- merging ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merged_equals_unmerged(arch):
    ids = rand_ids()
    am = attach(arch)
    world = logits(am, ids)
    perturb_B(am)
    unmerged = logits(am, ids)
    assert (unmerged - world).abs().max() > 1e-4
    layer = am.model.get_submodule(next(iter(deltas(am))))
    w_world = out_in(layer.base_layer).detach().clone()
    am.merge("k")
    torch.testing.assert_close(out_in(layer.base_layer), w_world + layer.deltas["k"].delta_weight())
    torch.testing.assert_close(logits(am, ids), unmerged, atol=1e-5, rtol=1e-5)
    am.unmerge("k")
    torch.testing.assert_close(out_in(layer.base_layer), w_world, atol=1e-6, rtol=0)   # back to W_world
    torch.testing.assert_close(logits(am, ids), unmerged, atol=1e-5, rtol=1e-5)


# ---- the penalties ---------------------------------------------------------------------------------------


def direct_penalties(ds, code_compat=False):
    sing = sum(float((d.lora_diag.detach().double() ** 2).sum()) for d in ds)
    orth = 0.0
    for d in ds:
        A, B = d.lora_A.detach().double(), d.lora_B.detach().double()
        if code_compat:
            orth += float(torch.linalg.norm(A.t() @ A - torch.eye(A.shape[1], dtype=A.dtype)))
            orth += float(torch.linalg.norm(B @ B.t() - torch.eye(B.shape[0], dtype=B.dtype)))
        else:
            orth += float(torch.linalg.norm(B.t() @ B - torch.eye(A.shape[0], dtype=A.dtype)))
            orth += float(torch.linalg.norm(A @ A.t() - torch.eye(A.shape[0], dtype=A.dtype)))
    return sing, orth


@pytest.mark.parametrize("variant", [{}, {"normalise_by_layers": True}, {"code_compat": True},
                                     {"code_compat": True, "normalise_by_layers": True}])
def test_penalties_equal_direct_computation(variant):
    am = attach("llama", beta=0.01, gamma=0.1, **variant)
    perturb_B(am)
    assert set(am.loss_terms) == {"kasa.k.singular", "kasa.k.orthogonal"}
    assert am.auxiliary_loss() == (None, {})             # frozen: the terms do not count
    am.set_trainable("k")
    total, parts = am.auxiliary_loss()
    ds = list(deltas(am).values())
    sing, orth = direct_penalties(ds, variant.get("code_compat", False))
    n = len(ds) if variant.get("normalise_by_layers") else 1
    assert len(ds) == 6
    assert parts["kasa.k.singular"] == pytest.approx(0.01 * sing / n, rel=1e-5)
    assert parts["kasa.k.orthogonal"] == pytest.approx(0.1 * orth / n, rel=1e-5)
    assert float(total.detach()) == pytest.approx(0.01 * sing / n + 0.1 * orth / n, rel=1e-5)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in am.adapter_parameters("k"))
    with am.disabled():
        assert am.auxiliary_loss() == (None, {})


def test_code_compat_orthogonality_matches_large_gram_and_its_gradient():
    torch.manual_seed(0)
    A = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    cheap = orthogonality(A, B, code_compat=True)
    direct = torch.linalg.norm(A.t().float() @ A.float() - torch.eye(7)) \
        + torch.linalg.norm(B.float() @ B.t().float() - torch.eye(5))
    assert float(cheap.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    ga, gb = torch.autograd.grad(cheap, (A, B))
    Ad, Bd = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = torch.linalg.norm(Ad.t() @ Ad - torch.eye(7, dtype=Ad.dtype)) \
        + torch.linalg.norm(Bd @ Bd.t() - torch.eye(5, dtype=Bd.dtype))
    ra, rb = torch.autograd.grad(ref, (Ad, Bd))
    torch.testing.assert_close(ga.double(), ra, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-4, atol=1e-5)


# ---- training -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_training_with_penalties_lowers_loss_and_moves_only_the_adapter(arch):
    am = attach(arch)
    am.set_trainable("k")
    ids = rand_ids(4, 9)
    labels = labels_for(am, ids)
    bases = {p: out_in(am.model.get_submodule(p).base_layer).detach().clone() for p in deltas(am)}
    frozen = {k: v.detach().clone() for k, v in am.model.state_dict().items() if ".deltas." not in k}
    start = snapshot_adapter(am, "k")
    opt = torch.optim.Adam(list(am.adapter_parameters("k")), lr=1e-2)
    am.train()
    losses = []
    for step in range(6):
        task = am(input_ids=ids, labels=labels).loss
        aux, parts = am.auxiliary_loss(step, 6)
        assert set(parts) == {"kasa.k.singular", "kasa.k.orthogonal"}
        loss = task + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    am.eval()
    assert losses[-1] < losses[0], losses
    for k, v in am.model.state_dict().items():         # the base (still W_world) did not move
        if ".deltas." not in k:
            assert torch.equal(v, frozen[k]), k
    for p, w in bases.items():
        assert torch.equal(out_in(am.model.get_submodule(p).base_layer), w)
    now = am.adapter_tensors("k")
    for (path, tname), t in now.items():
        moved = not torch.equal(t, start[(path, tname)])
        assert moved == (not tname.startswith("residual_")), (path, tname)
    assert {id(p) for p in am.parameters() if p.requires_grad} == {id(p) for p in am.adapter_parameters("k")}


# ---- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_redoes_the_truncation_bit_exactly(arch, tmp_path):
    ids = rand_ids()
    am = attach(arch)
    perturb_B(am)
    with torch.no_grad():
        for d in deltas(am).values():
            d.lora_diag.mul_(1.5)
    expected = logits(am, ids)
    am.save_adapter(tmp_path / "k", "k")
    fresh = peftlab.adapt(BUILDERS[arch]())
    fresh.load_adapter(tmp_path / "k", "k")
    fresh.set_active("k")
    assert fresh.adapters["k"].config == am.adapters["k"].config
    saved, loaded = am.adapter_tensors("k"), fresh.adapter_tensors("k")
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    for path in deltas(am):                                   # the same W_world, recomputed
        assert torch.equal(out_in(fresh.model.get_submodule(path).base_layer),
                           out_in(am.model.get_submodule(path).base_layer))
    assert torch.equal(logits(fresh, ids), expected)
    original = logits(BUILDERS[arch](), ids)
    fresh.delete_adapter("k")
    torch.testing.assert_close(logits(fresh, ids), original, atol=1e-5, rtol=1e-5)


def test_loading_onto_another_base_is_refused_and_leaves_it_untouched(tmp_path):
    am = attach("llama")
    am.save_adapter(tmp_path / "k", "k")
    other = tiny_llama(seed=5)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    fresh = peftlab.adapt(other)
    with pytest.raises(peftlab.CheckpointError, match="trained on a different base"):
        fresh.load_adapter(tmp_path / "k", "k")
    assert not fresh.adapters and not fresh.loss_terms
    assert not any(isinstance(m, AdaptedLayer) for m in other.modules())
    for k, v in other.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-6, rtol=1e-6), k


# ---- code compatibility ----------------------------------------------------------------------------------


def test_code_compat_truncates_d_in_minus_r_components():
    """The authors' code keeps d_in − r components: where d_in > d_out (Llama's down_proj,
    48 → 32) it drops max(0, r − (d_in − d_out)); with r=8 that is none."""
    assert dropped_components(48, 32, 8) == 8
    assert dropped_components(48, 32, 8, code_compat=True) == 0
    assert dropped_components(36, 32, 8, code_compat=True) == 4
    assert dropped_components(32, 48, 8, code_compat=True) == 8      # up_proj: the same as the paper
    paths = {"down": "model.layers.0.mlp.down_proj", "up": "model.layers.0.mlp.up_proj",
             "q": "model.layers.0.self_attn.q_proj"}
    before = originals(tiny_llama(), paths.values())
    got = {}
    for compat in (False, True):
        am = peftlab.adapt(tiny_llama())
        am.add_adapter("k", KasaConfig(targets=["ffn.down", "ffn.up", "attn.q"], code_compat=compat))
        got[compat] = {n: out_in(am.model.get_submodule(p).base_layer).detach().clone()
                       for n, p in paths.items()}
        shapes = {p: tuple(d.residual_S.shape) for p, d in deltas(am).items()}
        assert shapes[paths["down"]] == ((0,) if compat else (8,))
    assert torch.equal(got[True]["down"], before[paths["down"]])            # nothing truncated
    assert rel(got[False]["down"], truncation(before[paths["down"]], 32 - 8)) <= 1e-5
    for n in ("up", "q"):
        assert torch.equal(got[True][n], got[False][n])


def test_code_compat_checkpoint_with_empty_residual_round_trips(tmp_path):
    ids = rand_ids()
    model = tiny_llama()
    am = peftlab.adapt(model)
    am.add_adapter("k", KasaConfig(targets="ffn.down", code_compat=True))
    am.set_active("k")
    perturb_B(am)
    expected = logits(am, ids)
    am.save_adapter(tmp_path / "k", "k")
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "k", "k")
    fresh.set_active("k")
    assert torch.equal(logits(fresh, ids), expected)


# ---- reporting ------------------------------------------------------------------------------------------


def test_card_describes_kasa_and_counts_only_trainable_tensors():
    am = attach("llama")
    card = am.card("k")
    assert "kasa (r=8, alpha=16, beta=0.0001, gamma=0.001)" in card and "singular" in card
    # per site r·(d_in + d_out + 1): q 32→32, v 32→16, down 48→32, two layers
    assert am.num_parameters("k") == 2 * 8 * ((32 + 32 + 1) + (32 + 16 + 1) + (48 + 32 + 1))
    assert peftlab.get_method("kasa").typology.form == "singular"
