"""BA-LoRA: the three regularisers against direct computations on tiny models' logits, the
adapters-disabled reference forward, training, freezing and checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_llama
from method_checks import (
    assert_only_adapter_changed,
    assert_save_load_bit_exact,
    perturb,
    rand_ids,
    snapshot_adapter,
    snapshot_base,
)

import peftlab
from peftlab.core.errors import ConfigError
from peftlab.methods import get_method
from peftlab.methods.balora import BALoraConfig, nlg_terms, reference_logits

NAMES = [f"balora.a.{t}" for t in ("consistency", "diversity", "svd")]


def balora(build, **kw):
    am = peftlab.adapt(build())
    am.add_adapter("a", BALoraConfig(r=4, **kw))
    am.set_active("a")
    am.set_trainable("a")
    am.train()
    am.model.eval()          # dropout off; the AdaptedModel stays in training mode (captures)
    return am


def llama_batch():
    ids = rand_ids(2, 9, seed=3)
    labels = ids.clone()
    labels[0, :4] = -100     # a prompt
    labels[1, :2] = -100
    labels[1, -2:] = -100    # padding
    return ids, labels


def aux_values(am, step=9, **inputs):
    """The unweighted value of each term for one training forward (and that forward's output);
    step 9 of 10: every schedule is on."""
    out = am(**inputs)
    total, parts = am.auxiliary_loss(step, 10)
    factors = {t.name: t.factor(step, 10) for t in am.loss_terms.values()}
    return out, {n.rsplit(".", 1)[1]: parts[n] / factors[n] for n in parts}, total


# ---- direct references --------------------------------------------------------------------------
def direct_nlu(z, p, k=3):
    zn, pn = z / z.norm(dim=1, keepdim=True), p / p.norm(dim=1, keepdim=True)
    b, c = z.shape
    zc = z - z.mean(0)
    cov = zc.T @ zc / (b - 1)
    s = torch.linalg.svdvals(z)
    return {"consistency": ((zn - pn) ** 2).mean(),
            "diversity": sum(cov[i, j] ** 2 for i in range(c) for j in range(c) if i != j) / c,
            "svd": -s[:k].sum() / s.sum()}


def direct_nlg(z, p, *, t=1.0, top_k=0, k=3, frobenius=False):
    """z, p: the selected tokens' logits (N×V)."""
    kl = (F.softmax(p / t, -1) * (F.log_softmax(p / t, -1) - F.log_softmax(z / t, -1))).sum(-1).mean()
    zz = z.topk(top_k, -1).values if top_k else z
    lp = F.log_softmax(zz, -1)
    s = torch.linalg.svdvals(z)
    norm = torch.linalg.matrix_norm(z) if frobenius else s.sum()
    return {"consistency": t * t * kl, "diversity": (lp.exp() * lp).sum(-1).mean(),
            "svd": -s[:k].sum() / norm}


def shifted_rows(labels):
    nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    return (nxt != -100).reshape(-1)


# ---- config and registry --------------------------------------------------------------------------
def test_config_defaults_registry_and_validation():
    m = get_method("balora")
    c = BALoraConfig()
    c.validate()
    assert (c.init, c.targets, c.r, c.alpha, c.form) == ("pissa", "all-linear", 8, 8.0, "auto")
    assert c.resolved() == {"lambda_consistency": 1e-4, "lambda_diversity": 3e-4, "lambda_svd": 1e-4,
                            "svd_k": 3, "temperature": 1.0, "top_k": 0, "schedules": False}
    r = BALoraConfig(form="nlg-refined").resolved()
    assert (r["lambda_consistency"], r["lambda_diversity"], r["lambda_svd"], r["svd_k"], r["temperature"],
            r["top_k"], r["schedules"]) == (0.025, 0.005, 0.005, 10, 2.0, 20, True)
    assert m.config_cls is BALoraConfig and "form=auto" in m.describe(c)
    assert BALoraConfig.from_dict(c.to_dict()) == c
    for bad in ({"form": "nlx"}, {"lambda_svd": -1.0}, {"svd_k": 0}, {"temperature": 0}, {"top_k": -1},
                {"svd_solver": "x"}):
        with pytest.raises(ConfigError):
            BALoraConfig(**bad).validate()
    from peftlab.apps.recipes import method_config  # what `peftlab train --method balora` builds
    cli = method_config(m, None, 4, train_head=False)
    assert isinstance(cli, BALoraConfig) and cli.r == 4 and cli.init == "pissa"


def test_default_targets_are_every_projection_but_the_head():
    am = balora(tiny_llama)
    paths = {p for p, _ in am.adapter_tensors("a")}
    names = {p.rsplit(".", 1)[1] for p in paths}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(am.loss_terms) == set(NAMES)


def test_refined_schedules():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", BALoraConfig(r=4, form="nlg-refined"))
    t1, t2, t3 = (am.loss_terms[n] for n in NAMES)
    assert t1.factor(0, 101) == pytest.approx(0.025) and t1.factor(100, 101) == pytest.approx(0.0025)
    assert t1.factor(50, 101) == pytest.approx(0.0025 + 0.0225 * 0.5)
    for t in (t2, t3):
        assert t.factor(19, 101) == 0.0 and t.factor(25, 101) == pytest.approx(0.005)
        assert t.factor(22, 101) == pytest.approx(0.005 * 0.4)


# ---- the regularisers ---------------------------------------------------------------------------
def test_nlu_terms_equal_direct_computation_on_bert():
    am = balora(tiny_bert)
    perturb(am, "a", scale=0.3)
    ids = rand_ids(4, 7)
    labels = torch.tensor([0, 1, 2, 1])
    out, got, total = aux_values(am, input_ids=ids, labels=labels)
    z = out.logits.detach().double()
    p = tiny_bert()(input_ids=ids).logits.detach().double()
    want = direct_nlu(z, p)
    for name in want:
        assert got[name] == pytest.approx(float(want[name]), rel=1e-4, abs=1e-9), name
    assert want["consistency"] > 1e-4            # the adapter moved the logits
    total.backward()                             # differentiable, SVD included
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in am.adapter_parameters("a"))


@pytest.mark.parametrize("form", ["nlg", "nlg-refined"])
def test_nlg_terms_equal_direct_computation_on_llama_response_tokens(form):
    am = balora(tiny_llama, form=form)
    perturb(am, "a", scale=0.2)
    ids, labels = llama_batch()
    out, got, _ = aux_values(am, input_ids=ids, labels=labels)
    keep = shifted_rows(labels)
    v = out.logits.shape[-1]
    z = out.logits.detach().double().reshape(-1, v)[keep]
    p = tiny_llama()(input_ids=ids).logits.detach().double().reshape(-1, v)[keep]
    kw = {"t": 2.0, "top_k": 20, "k": 10, "frobenius": True} if form == "nlg-refined" else {}
    want = direct_nlg(z, p, **kw)
    for name in want:
        assert got[name] == pytest.approx(float(want[name]), rel=1e-4, abs=1e-9), name


def test_nlg_without_labels_uses_the_attention_mask():
    am = balora(tiny_llama)
    perturb(am, "a", scale=0.2)
    ids = rand_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    out, got, _ = aux_values(am, input_ids=ids, attention_mask=mask)
    keep = (mask != 0).reshape(-1)
    z = out.logits.detach().double().reshape(-1, out.logits.shape[-1])[keep]
    p = tiny_llama()(input_ids=ids, attention_mask=mask).logits.detach().double()
    want = direct_nlg(z, p.reshape(-1, p.shape[-1])[keep])
    for name in want:
        assert got[name] == pytest.approx(float(want[name]), rel=1e-4, abs=1e-9), name


@pytest.mark.parametrize("shape,kw", [
    ((7, 11), {"temperature": 1.0, "top_k": 0, "svd_k": 3}),                    # N <= V: Gram Z Zᵀ
    ((13, 5), {"temperature": 1.0, "top_k": 0, "svd_k": 2}),                    # N > V: Gram Zᵀ Z
    ((9, 12), {"temperature": 2.0, "top_k": 4, "svd_k": 3, "frobenius": True}),    # refined
])
def test_nlg_function_gradient_equals_autograd_of_direct_formulas(shape, kw):
    torch.manual_seed(0)
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    p = torch.randn(*shape, dtype=torch.float64)
    rows = torch.tensor([i for i in range(shape[0]) if i % 4 != 1])
    g = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    got = nlg_terms(z, p, rows, **kw)
    gz, = torch.autograd.grad((got * g).sum(), z)
    want = direct_nlg(z[rows], p[rows], t=kw["temperature"], top_k=kw["top_k"], k=kw["svd_k"],
                      frobenius=kw.get("frobenius", False))
    want = torch.stack([want["consistency"], want["diversity"], want["svd"]])
    wz, = torch.autograd.grad((want * g).sum(), z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gz, wz, rtol=1e-7, atol=1e-10)


def test_randomized_svd_is_exact_on_a_low_rank_matrix():
    torch.manual_seed(0)
    z = (torch.randn(20, 6, dtype=torch.float64) @ torch.randn(6, 50, dtype=torch.float64)).requires_grad_()
    rows = torch.arange(20)
    kw = {"which": (False, False, True), "svd_k": 3, "frobenius": True}
    exact = nlg_terms(z, None, rows, randomized=False, **kw)[2]
    rand = nlg_terms(z, None, rows, randomized=True, **kw)[2]
    ge, = torch.autograd.grad(exact, z)
    gr, = torch.autograd.grad(rand, z)
    torch.testing.assert_close(rand, exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gr, ge, rtol=1e-6, atol=1e-9)


# ---- the reference forward and the start ---------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_reference_forward_is_the_base_model_in_eval_mode(build):
    am = balora(build)
    perturb(am, "a", scale=0.3)
    am.model.train()                      # even with dropout on in training, the reference is eval
    ids = rand_ids(2, 7)
    got = reference_logits(am, {"input_ids": ids, "labels": ids if build is tiny_llama else ids[:, 0] % 3})
    assert torch.equal(got, build()(input_ids=ids).logits)
    assert all(m.training for m in am.model.modules())       # training mode restored


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_fresh_adapter_is_a_no_op_and_consistency_starts_at_zero(build):
    am = balora(build)
    ids = rand_ids(2, 7)
    base = build()(input_ids=ids).logits
    torch.testing.assert_close(am(input_ids=ids).logits, base, rtol=0, atol=1e-5)
    am.auxiliary_loss()                   # drop that forward
    _, got, _ = aux_values(am, input_ids=ids)
    assert abs(got["consistency"]) < 1e-7


# ---- training, freezing, checkpoints ------------------------------------------------------------
def test_training_lowers_the_task_loss_and_moves_only_the_adapter():
    am = balora(tiny_llama, lambda_consistency=0.1, lambda_diversity=0.1, lambda_svd=0.1)
    ids, labels = llama_batch()
    base, start = snapshot_base(am), snapshot_adapter(am, "a")
    opt = torch.optim.Adam(list(am.adapter_parameters("a")), lr=1e-2)
    losses = []
    for step in range(6):
        out = am(input_ids=ids, labels=labels)
        aux, parts = am.auxiliary_loss(step, 6)
        assert set(parts) == set(NAMES)
        opt.zero_grad()
        (out.loss + aux).backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    assert_only_adapter_changed(am, "a", base, start, changed="any")
    now = am.adapter_tensors("a")
    for key, t in now.items():            # trained factors moved, PiSSA's frozen start did not
        assert torch.equal(t, start[key]) == key[1].startswith("pissa_"), key


def test_terms_vanish_when_the_adapter_is_frozen_or_inactive():
    am = balora(tiny_llama)
    ids = rand_ids()
    am.set_trainable(None)
    am(input_ids=ids)
    assert am.auxiliary_loss() == (None, {})
    am.set_trainable("a")
    am.set_active([])
    am(input_ids=ids)
    assert am.auxiliary_loss() == (None, {})
    am.set_active("a")
    with am.disabled():
        am(input_ids=ids)
        assert am.auxiliary_loss() == (None, {})
    am(input_ids=ids)
    assert set(am.auxiliary_loss()[1]) == set(NAMES)
    am.delete_adapter("a")
    assert am.loss_terms == {}


def test_save_load_round_trip_is_bit_exact(tmp_path):
    am = balora(tiny_llama, form="nlg-refined", lambda_svd=0.01)
    perturb(am, "a", scale=0.1)
    am.eval()
    assert_save_load_bit_exact(am, "a", tiny_llama, tmp_path, rand_ids())
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "a", "b")
    assert set(fresh.loss_terms) == {n.replace(".a.", ".b.") for n in NAMES}
    assert fresh.loss_terms["balora.b.svd"].weight == 0.01
