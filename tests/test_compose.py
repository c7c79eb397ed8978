"""Adapter arithmetic and merging (peftlab.compose) against references computed here.

LoRA compositions are checked on the per-site ΔW (exact sums, SVD truncation error, the merge
rules on dense task vectors), IA3 ones on the vectors l − 1; the TIES / DARE / magnitude rules
against plain loop-based re-implementations of the module docstring's definitions; composites
are checked through forwards (negation gives the base model, `scale` equals a weighted
activation), through save/load (bit-exact, provenance kept) and through the real `peft` package.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import logits, tiny_bert, tiny_llama

import peftlab
from peftlab.compose import MERGES, _merge_rule, compose, dare, disjoint_mean, trim
from peftlab.methods.ia3 import IA3Config

ATOL = 1e-5
W3 = (0.3, -1.2, 0.5)


# ---- helpers ------------------------------------------------------------------------------------
def add_lora(am: peftlab.AdaptedModel, name: str, seed: int, **kw) -> peftlab.Adapter:
    """A LoRA adapter with random, non-zero A and B drawn under torch seed `seed`."""
    kw = {"r": 4, "alpha": 8.0, "init": "random", "targets": "all-linear", **kw}
    torch.manual_seed(seed)
    adapter = am.add_adapter(name, peftlab.LoraConfig(**kw))
    if kw["init"] == "pissa":   # a PiSSA delta starts at 0: move B off its start
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for (_, tname), t in am.adapter_tensors(name).items():
                if tname == "lora_B":
                    t.add_(0.1 * torch.randn(t.shape, generator=g))
    return adapter


def add_ia3(am: peftlab.AdaptedModel, name: str, seed: int, **kw) -> peftlab.Adapter:
    """An IA3 adapter with every ia3_l drawn from U(0.6, 1.4): non-trivial, and l − 1 and 2 − l
    are exact in fp32."""
    adapter = am.add_adapter(name, IA3Config(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_tensors(name).values():
            t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
    return adapter


def delta_of(am: peftlab.AdaptedModel, name: str, path: str):
    return am.adapters[name].layers[path].deltas[name]


def site_paths(am: peftlab.AdaptedModel, name: str) -> list[str]:
    return [s.path for s in am.adapters[name].sites]


def delta_weights(am: peftlab.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """Site path -> the adapter's ΔW there, in fp64."""
    return {s.path: delta_of(am, name, s.path).delta_weight().double() for s in am.adapters[name].sites}


def ia3_vectors(am: peftlab.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    return {s.path: delta_of(am, name, s.path).ia3_l.detach().clone() for s in am.adapters[name].sites}


def add_method(am: peftlab.AdaptedModel, method: str, name: str, seed: int) -> peftlab.Adapter:
    if method == "ia3":
        return add_ia3(am, name, seed)
    return add_lora(am, name, seed, init="pissa" if method == "lora-pissa" else "random")


def input_rank(delta) -> int:
    """Rows of ΔW's factorisation: r, or 2r for PiSSA (B A − B0 A0)."""
    return delta.r * (2 if delta.pissa else 1)


def run(am: peftlab.AdaptedModel, ids: torch.Tensor, names, weights=None) -> torch.Tensor:
    am.set_active(names, weights=weights)
    return logits(am, ids)


def assert_changes_output(am, ids, names, base) -> None:
    """The adapter(s) really change the output, so equality checks are not vacuous."""
    diff = (run(am, ids, names) - base).abs().max().item()
    assert diff > 1e-3, f"{names} leave the output at the base model's (max diff {diff:g})"


# ---- reference merge rules (loop-based, from the module docstring's definitions) -------------------
def ref_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    values = tau.flatten().tolist()
    k = -(-round(density * 1000) * len(values) // 1000)    # ⌈density·n⌉ in integers
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    keep = set(order[:k])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(values)],
                        dtype=torch.float64).view(tau.shape)


def ref_disjoint_mean(taus, weights) -> torch.Tensor:
    """Per entry: elect sign(Σ w_i τ_i), then Σ w_i τ_i / Σ w_i over the non-zero entries of that sign."""
    flats = [t.flatten().tolist() for t in taus]
    out = []
    for e in range(len(flats[0])):
        vals = [f[e] for f in flats]
        total = sum(w * v for w, v in zip(weights, vals, strict=True))
        sign = (total > 0) - (total < 0)
        num = den = 0.0
        for w, v in zip(weights, vals, strict=True):
            if v != 0 and (v > 0) - (v < 0) == sign:
                num += w * v
                den += w
        out.append(num / den if den > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(taus[0].shape)


def ref_dare(taus, density: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Each input in order: keep entry e when U_e < density (U = torch.rand(shape, generator)),
    kept entries divided by density."""
    out = []
    for tau in taus:
        u = torch.rand(tau.shape, generator=generator).flatten().tolist()
        vals = tau.flatten().tolist()
        out.append(torch.tensor([v / density if ue < density else 0.0 for v, ue in zip(vals, u, strict=True)],
                                dtype=torch.float64).view(tau.shape))
    return out


def ref_weighted_sum(taus, weights) -> torch.Tensor:
    return sum(w * t.double() for w, t in zip(weights, taus, strict=True))


def ref_merge(how: str, taus, weights, density: float, generator: torch.Generator) -> torch.Tensor:
    if how == "linear":
        return ref_weighted_sum(taus, weights)
    if how == "magnitude":
        return ref_weighted_sum([ref_trim(t, density) for t in taus], weights)
    if how == "ties":
        return ref_disjoint_mean([ref_trim(t, density) for t in taus], weights)
    dropped = ref_dare(taus, density, generator)
    return ref_weighted_sum(dropped, weights) if how == "dare" else ref_disjoint_mean(dropped, weights)


def small_taus(seed: int = 3, n: int = 3, shape=(5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


# ---- 1. delta space: exact sums ----------------------------------------------------------------------
RANK_PATTERNS = {"a": {"attn.v": 2}, "b": {"ffn.down": 6}, "c": {}}


@pytest.mark.parametrize("case", ["plain", "rank_pattern", "pissa"])
def test_delta_space_add_subtract_analogy_are_exact(case, ids):
    am = peftlab.adapt(tiny_llama(0))
    base = logits(am, ids)
    for i, n in enumerate("abc"):
        kw = {}
        if case == "rank_pattern":
            kw["rank_pattern"] = RANK_PATTERNS[n]
        if case == "pissa" and n == "c":
            kw["init"] = "pissa"
        add_lora(am, n, 10 + i, **kw)
    dw = {n: delta_weights(am, n) for n in "abc"}
    paths = list(dw["a"])
    assert len(paths) == 14   # q k v o gate up down, 2 layers

    out = peftlab.add(am, list("abc"), W3, name="sum")
    assert out.provenance["form"] == "concatenated" and out.provenance["op"] == "add"
    assert [i["weight"] for i in out.provenance["inputs"]] == list(W3)
    assert "sum" not in am.active and not any(p.requires_grad for p in am.adapter_parameters("sum"))
    got = delta_weights(am, "sum")
    ranks = set()
    for path in paths:
        expected = sum(w * dw[n][path] for w, n in zip(W3, "abc", strict=True))
        assert expected.norm() > 0.1
        assert (got[path] - expected).abs().max() < 1e-6, path
        # stored as one LoRA of the concatenated rank
        r = sum(input_rank(delta_of(am, n, path)) for n in "abc")
        assert delta_of(am, "sum", path).r == r
        ranks.add(r)
    if case == "rank_pattern":
        assert len(ranks) > 1, "the case should have different ranks per site"
    if case == "pissa":
        assert delta_of(am, "c", paths[0]).pissa and ranks == {4 + 4 + 8}
    # As a forward: the composite alone equals the three inputs active at those weights.
    ours = run(am, ids, ["sum"])
    torch.testing.assert_close(ours, run(am, ids, list("abc"), W3), atol=ATOL, rtol=0)
    assert (ours - base).abs().max() > 1e-3

    peftlab.subtract(am, "a", "b", name="a_minus_b")
    got = delta_weights(am, "a_minus_b")
    for path in paths:
        assert (got[path] - (dw["a"][path] - dw["b"][path])).abs().max() < 1e-6, path

    peftlab.analogy(am, "a", "b", "c", weights=(0.7, 1.3), name="abc_analogy")
    got = delta_weights(am, "abc_analogy")
    for path in paths:
        expected = 0.7 * dw["a"][path] + 1.3 * (dw["b"][path] - dw["c"][path])
        assert (got[path] - expected).abs().max() < 1e-6, path


# ---- 2. delta space: SVD re-factoring -----------------------------------------------------------------
def test_svd_form_error_is_the_discarded_singular_value_energy():
    am = peftlab.adapt(tiny_llama(0))
    for i, n in enumerate("abc"):
        add_lora(am, n, 20 + i, rank_pattern=RANK_PATTERNS[n])
    dw = {n: delta_weights(am, n) for n in "abc"}
    k = 3
    out = peftlab.add(am, list("abc"), W3, name="svd", rank=k)
    prov = out.provenance
    assert prov["form"] == "svd" and prov["rank"] == k
    per_site = prov["svd_relative_error"]["per_site"]
    assert sorted(per_site) == sorted(dw["a"])
    got = delta_weights(am, "svd")
    relative = []
    for path, composed in got.items():
        exact = sum(w * dw[n][path] for w, n in zip(W3, "abc", strict=True))
        sigma = torch.linalg.svd(exact).S
        tail = sigma[k:].square().sum().sqrt().item()
        assert tail > 0.05 * exact.norm().item(), "the truncation should discard something"
        err = (composed - exact).norm().item()
        assert err == pytest.approx(tail, rel=1e-5), path
        assert per_site[path] == pytest.approx(tail / exact.norm().item(), rel=1e-5), path
        assert delta_of(am, "svd", path).r == k
        relative.append(per_site[path])
    assert prov["svd_relative_error"]["max"] == max(relative)
    assert prov["svd_relative_error"]["mean"] == pytest.approx(sum(relative) / len(relative), rel=1e-12)


# ---- 3. negation and scaling through forwards ---------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "lora-pissa", "ia3"])
def test_adapter_plus_its_negation_is_the_base_model(method, ids):
    am = peftlab.adapt(tiny_llama(0))
    base = logits(am, ids)
    add_method(am, method, "a", 1)
    assert_changes_output(am, ids, ["a"], base)
    peftlab.negate(am, "a", name="neg")
    if method == "ia3":
        for path, l in ia3_vectors(am, "a").items():
            assert torch.equal(delta_of(am, "neg", path).ia3_l, 2 - l), path
    else:
        for path in site_paths(am, "a"):
            a, n = delta_of(am, "a", path), delta_of(am, "neg", path)
            assert torch.equal(n.lora_B, -a.lora_B) and torch.equal(n.lora_A, a.lora_A)
            assert n.scaling == a.scaling and n.pissa == a.pissa == (method == "lora-pissa")
            if a.pissa:
                assert torch.equal(n.pissa_B0, -a.pissa_B0) and torch.equal(n.pissa_A0, a.pissa_A0)
    assert_changes_output(am, ids, ["neg"], base)

    peftlab.add(am, ["a", "neg"], [1, 1], name="zero")
    torch.testing.assert_close(run(am, ids, ["zero"]), base, atol=ATOL, rtol=0)
    if method != "ia3":   # additive deltas also cancel when both are active
        torch.testing.assert_close(run(am, ids, ["a", "neg"]), base, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["lora", "lora-pissa", "ia3"])
@pytest.mark.parametrize("factor", [0.5, -0.7])
def test_scale_equals_weighted_activation(method, factor, ids):
    am = peftlab.adapt(tiny_llama(0))
    base = logits(am, ids)
    add_method(am, method, "a", 2)
    peftlab.scale(am, "a", factor, name="scaled")
    assert_changes_output(am, ids, ["scaled"], base)
    torch.testing.assert_close(run(am, ids, ["scaled"]), run(am, ids, ["a"], [factor]), atol=ATOL, rtol=0)
    if method == "ia3":
        for path, l in ia3_vectors(am, "a").items():
            torch.testing.assert_close(delta_of(am, "scaled", path).ia3_l, 1 + factor * (l - 1),
                                       atol=1e-7, rtol=0)
    else:
        dw = delta_weights(am, "a")
        for path, got in delta_weights(am, "scaled").items():
            assert (got - factor * dw[path]).abs().max() < 1e-6, path


# ---- 4. merge rules -------------------------------------------------------------------------------------
def test_disjoint_mean_on_a_hand_computed_example():
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    t2 = torch.tensor([-2.0, -4.0, 1.0, 0.0])
    t3 = torch.tensor([1.0, 2.0, -3.0, -1.0])
    # signs of the sums (2, -3, -1.5, 1); means of the agreeing entries
    assert torch.equal(disjoint_mean([t1, t2, t3], [1, 1, 1]), torch.tensor([2.0, -2.5, -3.0, 2.0]))
    # weights (1, 2, 1): entry 0 sums to 0 (no sign: 0); entry 1: (−1 − 8) / 3
    assert torch.equal(disjoint_mean([t1, t2, t3], [1, 2, 1]), torch.tensor([0.0, -3.0, -3.0, 2.0]))
    assert torch.equal(ref_disjoint_mean([t1, t2, t3], [1, 2, 1]).float(), torch.tensor([0.0, -3.0, -3.0, 2.0]))


@pytest.mark.parametrize("density", [0.2, 0.3, 0.5, 0.9, 1.0])
def test_trim_keeps_the_largest_entries(density):
    for tau in small_taus(4):
        got = trim(tau, density)
        assert int((got != 0).sum()) == round(density * tau.numel() + 0.4999)   # ⌈ ⌉ without float noise
        torch.testing.assert_close(got.double(), ref_trim(tau, density), atol=0, rtol=0)
    # 0.3 · 10 is 3.0000000000000004 in floats: still 3 entries kept, not 4
    assert int((trim(torch.arange(1.0, 11.0), 0.3) != 0).sum()) == 3


def test_dare_helper_matches_reference_draws():
    taus = small_taus(5)
    g = torch.Generator().manual_seed(11)
    got = [dare(t, 0.4, g) for t in taus]
    expected = ref_dare(taus, 0.4, torch.Generator().manual_seed(11))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=0)
        assert 0 < int((a != 0).sum()) < a.numel()


@pytest.mark.parametrize("how", MERGES)
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
def test_merge_rules_match_reference(how, density):
    taus = small_taus(6)
    weights = (0.5, 1.0, 0.8)
    rule = _merge_rule(how, density, 7)
    g = torch.Generator().manual_seed(7)
    # two calls: DARE's masks continue one generator stream in call order
    for key in ("first", "second"):
        got = rule(taus, weights, key)
        expected = ref_merge(how, taus, weights, density, g)
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
        assert got.abs().max() > 0.1


def test_dare_is_unbiased_over_seeds():
    tau = small_taus(8, n=1)[0]
    n = 2000
    mean = sum(dare(tau, 0.5, torch.Generator().manual_seed(s)) for s in range(n)) / n
    assert (mean - tau).abs().max() < 0.15 * tau.abs().max()
    assert not torch.equal(dare(tau, 0.5, torch.Generator().manual_seed(0)), tau)


def three_ia3_adapters(seed: int):
    """Tiny Llama with IA3 adapters i, j, k (seeds seed, seed+1, seed+2) and their vectors."""
    am = peftlab.adapt(tiny_llama(0))
    names = ["i", "j", "k"]
    for s, n in enumerate(names):
        add_ia3(am, n, seed + s)
    return am, names, {n: ia3_vectors(am, n) for n in names}


def test_ia3_ties_merge_matches_reference():
    am, names, vectors = three_ia3_adapters(30)
    out = peftlab.merge_adapters(am, names, how="ties", density=0.5, name="m")
    assert out.provenance["merge"] == "ties" and out.provenance["density"] == 0.5
    assert out.provenance["seed"] is None
    for path, got in ia3_vectors(am, "m").items():
        taus = [vectors[n][path] - 1 for n in names]
        expected = ref_disjoint_mean([ref_trim(t, 0.5) for t in taus], [1 / 3] * 3)
        torch.testing.assert_close((got - 1).double(), expected, atol=1e-6, rtol=0)
        assert (expected == 0).any() and (expected != 0).any()


def test_ia3_dare_merge_draws_masks_site_by_site_input_by_input():
    am, names, vectors = three_ia3_adapters(40)
    weights = (0.2, 0.5, 0.3)
    peftlab.merge_adapters(am, names, how="dare", density=0.6, seed=5, weights=weights, name="d")
    g = torch.Generator().manual_seed(5)
    for path, got in ia3_vectors(am, "d").items():    # sites in model order
        taus = [vectors[n][path] - 1 for n in names]
        expected = ref_weighted_sum(ref_dare(taus, 0.6, g), weights)
        torch.testing.assert_close((got - 1).double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("how", ["dare", "dare_ties"])
def test_dare_merge_is_reproducible_by_seed(method, how):
    am = peftlab.adapt(tiny_llama(0))
    names = ["x", "y"]
    for s, n in enumerate(names):
        if method == "lora":
            add_lora(am, n, 50 + s, targets=["attn.q", "attn.v"])
        else:
            add_ia3(am, n, 50 + s)
    for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        peftlab.merge_adapters(am, names, how=how, density=0.5, seed=seed, name=name)
    t1, t1b, t2 = (am.adapter_tensors(n) for n in ("s1", "s1_again", "s2"))
    assert all(torch.equal(t1[key], t1b[key]) for key in t1)
    assert any(not torch.equal(t1[key], t2[key]) for key in t1)
    assert am.adapters["s1"].provenance["seed"] == 1


def test_lora_ties_merge_matches_reference_at_full_rank():
    am = peftlab.adapt(tiny_llama(0))
    names = ["a", "b", "c"]
    for s, n in enumerate(names):
        add_lora(am, n, 60 + s, targets=["attn.q", "ffn.down"], layers=[0])
    dw = {n: {p: delta_of(am, n, p).delta_weight() for p in am.adapters[n].layers} for n in names}
    weights = (0.5, 1.0, 0.8)
    out = peftlab.merge_adapters(am, names, how="ties", density=0.3, weights=weights, rank=64, name="t")
    assert out.provenance["svd_relative_error"]["max"] < 1e-5
    for path, got in delta_weights(am, "t").items():
        expected = ref_disjoint_mean([ref_trim(dw[n][path], 0.3) for n in names], weights)
        assert (got - expected).abs().max() < 1e-5, path
        assert delta_of(am, "t", path).r == min(expected.shape)


# ---- 5. save / reload and peft export ---------------------------------------------------------------------
def composites() -> peftlab.AdaptedModel:
    """tiny_llama(0) with three composites: a mixed-rank concatenated LoRA, a TIES-merged SVD
    LoRA (mixed ranks too: the default rank is the inputs' sum at each site) and a nested IA3
    composite (the negation of a TIES merge)."""
    am = peftlab.adapt(tiny_llama(0))
    for i, n in enumerate("abc"):
        add_lora(am, n, 70 + i, rank_pattern=RANK_PATTERNS[n])
    add_ia3(am, "i", 80)
    add_ia3(am, "j", 81)
    peftlab.add(am, list("abc"), W3, name="cat")
    peftlab.merge_adapters(am, list("abc"), how="ties", density=0.5, weights=(0.5, 1.0, 0.8), name="tie")
    peftlab.merge_adapters(am, ["i", "j"], how="ties", density=0.5, weights=(0.6, 0.4), name="ij")
    peftlab.negate(am, "ij", name="ia")
    return am


COMPOSITES = ["cat", "tie", "ia"]


def test_composites_save_and_reload_bit_exact_with_provenance(tmp_path, ids):
    am = composites()
    base = logits(am, ids)
    assert len({delta_of(am, "tie", s.path).r for s in am.adapters["tie"].sites}) > 1
    assert am.adapters["ia"].provenance["inputs"][0]["provenance"]["merge"] == "ties"
    for name in COMPOSITES:
        ours = run(am, ids, [name])
        assert (ours - base).abs().max() > 1e-3, name
        am.save_adapter(tmp_path / name, name)
        fresh = peftlab.adapt(tiny_llama(0))
        loaded = fresh.load_adapter(tmp_path / name, name)
        mine, theirs = am.adapter_tensors(name), fresh.adapter_tensors(name)
        assert sorted(mine) == sorted(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
        assert torch.equal(run(fresh, ids, [name]), ours), name
        assert loaded.provenance == am.adapters[name].provenance, name
        assert "provenance" in fresh.card(name) and "provenance" in am.card(name)


def test_composites_export_to_peft_with_equal_logits(tmp_path, ids):
    peft = pytest.importorskip("peft")
    am = composites()
    for name in COMPOSITES:
        ours = run(am, ids, [name])
        d = peftlab.export_peft(am, name, tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(d)).eval()
        torch.testing.assert_close(logits(pm, ids), ours, atol=ATOL, rtol=0)


# ---- 6. modules_to_save copies --------------------------------------------------------------------------
def bert_with_heads() -> peftlab.AdaptedModel:
    am = peftlab.adapt(tiny_bert(0))
    for s, n in enumerate(["a", "b"]):
        torch.manual_seed(90 + s)
        am.add_adapter(n, peftlab.LoraConfig(r=4, targets=["attn.q", "attn.v"], init="random",
                                             modules_to_save=["classifier"]))
        g = torch.Generator().manual_seed(90 + s)
        with torch.no_grad():
            for p in am.model.classifier.copies[n].parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return am


def test_modules_to_save_copies_combine_as_deltas_from_the_base(ids):
    am = bert_with_heads()
    heads = am.model.classifier
    base = {k: t.clone() for k, t in heads.original_module.state_dict().items()}
    wa, wb = heads.copies["a"].state_dict(), heads.copies["b"].state_dict()
    out = peftlab.add(am, ["a", "b"], (0.5, 0.5), name="ab")
    assert list(out.copies) == ["classifier"]
    got = heads.copies["ab"].state_dict()
    for k, b in base.items():
        expected = b + 0.5 * (wa[k] - b) + 0.5 * (wb[k] - b)
        torch.testing.assert_close(got[k], expected, atol=1e-6, rtol=0)
        assert not torch.allclose(got[k], b)
        assert torch.equal(heads.original_module.state_dict()[k], b)
    peftlab.negate(am, "a", name="neg_a")
    for k, b in base.items():
        torch.testing.assert_close(heads.copies["neg_a"].state_dict()[k], b - (wa[k] - b), atol=1e-6, rtol=0)
    # the composed head answers when the composite is active
    am.set_active(["ab"])
    assert am.model.classifier.chosen() is heads.copies["ab"]


# ---- 7. parameter space -------------------------------------------------------------------------------------
def test_parameter_space_combines_factors_of_a_shared_init():
    am = peftlab.adapt(tiny_llama(0))
    add_lora(am, "a", 1, targets=["attn.q", "attn.v"])
    add_lora(am, "b", 2, targets=["attn.q", "attn.v"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ta, tb = am.adapter_tensors("a"), am.adapter_tensors("b")
        for key, t in tb.items():
            t.copy_(ta[key])
            if key[1] == "lora_B":
                t.add_(0.01 * torch.randn(t.shape, generator=g))
    w = (0.7, -0.4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = peftlab.add(am, ["a", "b"], w, mode="parameter", name="p")
    assert not [c for c in caught if issubclass(c.category, peftlab.CompositionWarning)]
    assert out.provenance["mode"] == "parameter"
    assert out.provenance["shared_init_cosine"] == pytest.approx(1.0, abs=1e-6)
    tp = am.adapter_tensors("p")
    for path in am.adapters["a"].layers:
        A, B = (path, "lora_A"), (path, "lora_B")
        assert torch.equal(tp[A], abs(w[0]) * ta[A] + abs(w[1]) * tb[A]), path
        assert torch.equal(tp[B], w[0] * ta[B] + w[1] * tb[B]), path
        assert delta_of(am, "p", path).scaling == delta_of(am, "a", path).scaling


def test_parameter_space_warns_for_unrelated_inits_and_negation_is_mode_free():
    am = peftlab.adapt(tiny_llama(0))
    add_lora(am, "a", 1, targets=["attn.q", "attn.v"])
    add_lora(am, "b", 2, targets=["attn.q", "attn.v"])
    with pytest.warns(peftlab.CompositionWarning, match="unrelated"):
        peftlab.add(am, ["a", "b"], name="p", mode="parameter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlab.negate(am, "a", name="neg_p", mode="parameter")
    assert not caught
    peftlab.negate(am, "a", name="neg_d")
    tp, td = am.adapter_tensors("neg_p"), am.adapter_tensors("neg_d")
    assert sorted(tp) == sorted(td)
    assert all(torch.equal(tp[k], td[k]) for k in tp)


# ---- 8. errors --------------------------------------------------------------------------------------------
def error_model() -> peftlab.AdaptedModel:
    am = peftlab.adapt(tiny_llama(0))
    add_lora(am, "a", 1, targets=["attn.q", "attn.v"])
    add_lora(am, "b", 2, targets=["attn.q", "attn.v"])
    add_lora(am, "b2", 3, targets=["attn.q", "attn.v"], rank_pattern={"attn.v": 2})
    add_lora(am, "q", 4, targets=["attn.q"])
    add_lora(am, "d", 5, targets=["attn.q", "attn.v"], dora=True)
    add_ia3(am, "i", 6)
    add_ia3(am, "i_out", 7, feedforward=[])    # ffn.down scaled at its output, not its input
    am.add_adapter("p", peftlab.PromptTuningConfig(num_virtual_tokens=2))
    return am


ERRORS = {
    "methods": (lambda am: peftlab.add(am, ["a", "i"], name="x"), peftlab.AdapterError, "different methods"),
    "sites": (lambda am: peftlab.add(am, ["a", "q"], name="x"), peftlab.AdapterError, "different sites"),
    "dora": (lambda am: peftlab.add(am, ["d", "a"], name="x"), peftlab.CapabilityError, "is DoRA"),
    "dora-second": (lambda am: peftlab.negate(am, "d", name="x"), peftlab.CapabilityError, "is DoRA"),
    "mode": (lambda am: peftlab.add(am, ["a", "b"], name="x", mode="factor"), peftlab.ConfigError,
             "mode 'factor' is unknown"),
    "merge": (lambda am: peftlab.merge_adapters(am, ["a", "b"], how="mean", name="x"), peftlab.ConfigError,
              "merge 'mean' is unknown"),
    "ties-negative": (lambda am: peftlab.merge_adapters(am, ["a", "b"], how="ties", weights=[1, -1], name="x"),
                      peftlab.ConfigError, "positive weights"),
    "density-0": (lambda am: peftlab.merge_adapters(am, ["a", "b"], how="dare", density=0.0, name="x"),
                  peftlab.ConfigError, r"density .* must be in \(0, 1\]"),
    "weights-length": (lambda am: peftlab.add(am, ["a", "b"], [1, 2, 3], name="x"), peftlab.ConfigError,
                       "2 adapters but 3 weights"),
    "parameter-rank": (lambda am: peftlab.add(am, ["a", "b"], name="x", mode="parameter", rank=2),
                       peftlab.ConfigError, "rank re-factoring is a delta-space operation"),
    "parameter-ranks-differ": (lambda am: peftlab.add(am, ["a", "b2"], name="x", mode="parameter"),
                               peftlab.CapabilityError, "equal ranks"),
    "parameter-ties": (lambda am: compose(am, ["a", "b"], None, name="x", op="ties", how="ties",
                                                  mode="parameter", density=0.5),
                       peftlab.ConfigError, "ties merges task vectors in delta space"),
    "ia3-stages": (lambda am: peftlab.add(am, ["i", "i_out"], name="x"), peftlab.AdapterError,
                   r"acts at the layer's input and 'i_out' at its output"),
    "prompt": (lambda am: peftlab.negate(am, "p", name="x"), peftlab.CapabilityError,
               "cannot be composed"),
    "name-half": (lambda am: peftlab.add(am, ["a", "b"], name="half"), peftlab.AdapterError,
                  "attribute of torch modules"),
    "name-taken": (lambda am: peftlab.add(am, ["a", "b"], name="b"), peftlab.AdapterError, "already exists"),
    "name-instance-attribute": (lambda am: peftlab.add(am, ["a", "b"], name="training"), peftlab.AdapterError,
                                "attribute of torch modules"),
    "ia3-rank": (lambda am: peftlab.add(am, ["i", "i"], name="x", rank=2), peftlab.ConfigError,
                 "drop rank"),
    "weight-nan": (lambda am: am.set_active(["a"], weights=[float("nan")]), peftlab.AdapterError,
                   "finite numbers"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_composition_errors_leave_the_model_alone(case, ids):
    fn, exc, match = ERRORS[case]
    am = error_model()
    before = list(am.adapters)
    base = logits(am, ids)
    with pytest.raises(exc, match=match):
        fn(am)
    assert list(am.adapters) == before
    assert torch.equal(logits(am, ids), base)


def test_set_active_weight_on_an_adapter_with_head_copies_is_refused(ids):
    am = bert_with_heads()
    with pytest.raises(peftlab.CapabilityError, match=r"whole-module copies \['classifier'\]"):
        am.set_active(["a"], weights=[0.5])
    assert am.active == []
    peftlab.scale(am, "a", 0.5, name="half_a")    # the suggested remedy works
    am.set_active(["half_a"])
    assert (logits(am, ids) - logits(tiny_bert(0), ids)).abs().max() > 1e-3


def test_merge_of_an_adapter_active_at_a_weight_is_refused_and_scale_merges(ids):
    am = peftlab.adapt(tiny_llama(0))
    add_lora(am, "a", 1, targets=["attn.q", "attn.v"])
    weighted = run(am, ids, ["a"], [0.5])
    with pytest.raises(peftlab.AdapterError, match="active at weight 0.5"):
        am.merge("a")
    assert not am.adapters["a"].merged
    torch.testing.assert_close(logits(am, ids), weighted, atol=0, rtol=0)
    peftlab.scale(am, "a", 0.5, name="half_a")
    am.set_active(["half_a"])
    am.merge("half_a")
    assert am.adapters["half_a"].merged
    torch.testing.assert_close(logits(am, ids), weighted, atol=ATOL, rtol=0)


# ---- 7. named LoRA merges: _svd (dense, re-factored or exact), _factors (peft's), lam ------------------
def test_ties_with_lam_at_full_rank_equals_the_dense_reference():
    """rank="full" stores the merged ΔW exactly (one factor is the identity); lam scales it."""
    am = peftlab.adapt(tiny_llama(0))
    names = ["a", "b", "c"]
    for s, n in enumerate(names):
        add_lora(am, n, 90 + s, targets=["attn.q", "ffn.down"])
    dw = {n: {p: delta_of(am, n, p).delta_weight() for p in am.adapters[n].layers} for n in names}
    weights = (0.5, 1.0, 0.8)
    out = peftlab.merge_adapters(am, names, how="ties_svd", density=0.3, weights=weights, rank="full",
                                 lam=1.7, name="t")
    p = out.provenance
    assert p["form"] == "dense" and p["merge"] == "ties_svd" and p["lam"] == 1.7
    assert "svd_relative_error" not in p
    for path, got in delta_weights(am, "t").items():
        expected = 1.7 * ref_disjoint_mean([ref_trim(dw[n][path].double(), 0.3) for n in names], weights)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=path)
        assert delta_of(am, "t", path).r == min(expected.shape)
    # the plain name on LoRA is the same merge, recorded by its full name
    plain = peftlab.merge_adapters(am, names, how="ties", density=0.3, weights=weights, rank="full",
                                   lam=1.7, name="plain")
    assert plain.provenance["merge"] == "ties_svd"
    assert all(torch.equal(t, am.adapter_tensors("plain")[(k[0], k[1])])
               for k, t in am.adapter_tensors("t").items())


@pytest.mark.parametrize("how", ["dare_svd", "magnitude_svd"])
def test_lam_scales_every_merge(how):
    am = peftlab.adapt(tiny_llama(0))
    for s, n in enumerate("ab"):
        add_lora(am, n, 95 + s, targets=["attn.v"])
    peftlab.merge_adapters(am, ["a", "b"], how=how, rank="full", seed=3, name="one")
    peftlab.merge_adapters(am, ["a", "b"], how=how, rank="full", seed=3, lam=-0.5, name="neg_half")
    one, half = delta_weights(am, "one"), delta_weights(am, "neg_half")
    for path in one:
        assert one[path].abs().max() > 0
        torch.testing.assert_close(half[path], -0.5 * one[path], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("how,peft_how", [("ties_factors", "ties"), ("magnitude_factors", "magnitude_prune")])
def test_factor_wise_merges_equal_peft_add_weighted_adapter(tmp_path, how, peft_how):
    """peft's own add_weighted_adapter on the same adapters gives the same factors."""
    from peft import PeftModel
    am = peftlab.adapt(tiny_llama(0))
    for s, n in enumerate("ab"):
        add_lora(am, n, 97 + s, targets=["attn.q", "attn.v", "ffn.up"], alpha=6.0)
    weights = [0.7, 1.3]
    out = peftlab.merge_adapters(am, ["a", "b"], how=how, density=0.4, weights=weights, name="m")
    assert out.provenance["form"] == "factor-wise"
    for n in "ab":
        am.save_adapter(tmp_path / n, n)
    pm = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=peft_how, density=0.4)
    ours = am.adapter_tensors("m")
    checked = 0
    for module_path, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            for tname, theirs in (("lora_A", module.lora_A["m"].weight), ("lora_B", module.lora_B["m"].weight)):
                torch.testing.assert_close(ours[(module_path, tname)], theirs.detach(), rtol=1e-6, atol=1e-7)
                checked += 1
            assert module.scaling["m"] == delta_of(am, "m", module_path).scaling == 1.0
    assert checked == 2 * len(out.sites) > 0


def test_merge_names_and_arguments_are_checked():
    am = peftlab.adapt(tiny_llama(0))
    for s, n in enumerate("ab"):
        add_lora(am, n, 99 + s, targets=["attn.q"], r=2 + s)
    add_ia3(am, "i", 1)
    add_ia3(am, "j", 2)
    with pytest.raises(peftlab.CapabilityError, match="one rank per site"):
        peftlab.merge_adapters(am, ["a", "b"], how="ties_factors", name="x")
    with pytest.raises(peftlab.ConfigError, match="drop rank"):
        peftlab.merge_adapters(am, ["a", "b"], how="ties_factors", rank=4, name="x")
    with pytest.raises(peftlab.ConfigError, match="elementwise"):
        peftlab.merge_adapters(am, ["i", "j"], how="ties_svd", name="x")
    with pytest.raises(peftlab.ConfigError, match="lam"):
        peftlab.merge_adapters(am, ["a", "b"], how="ties", lam=float("inf"), name="x")
    with pytest.raises(peftlab.ConfigError, match="'full'"):
        peftlab.merge_adapters(am, ["a", "b"], how="ties", rank="all", name="x")
    assert set(am.adapters) == {"a", "b", "i", "j"}
