"""Context-PEFT: per-token adaptor groups routed by context masks (LoRA, IA3 and bias forms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, tiny_bert, tiny_llama
from method_checks import (
    assert_fresh_adapter_is_base,
    assert_save_load_bit_exact,
    check_merge_unmerge_and_disable,
    check_training,
    forward_logits,
    greedy,
    labels_for,
    no_eos,
    perturb,
)

import peftlab
from peftlab.methods import METHODS
from peftlab.methods.context_peft import ContextConfig, ContextHook, _span_mask

IMG, START, END = 5, 7, 8


def make_ids() -> torch.Tensor:
    """Two rows with image tokens (IMG) from position 4 on, and a START ... END span."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 90, (2, 12), generator=g)
    ids[0, [4, 5, 7, 9]] = IMG
    ids[1, [6, 10]] = IMG
    ids[0, 6], ids[0, 8] = START, END
    ids[1, 5] = START                                   # an open span: runs to the end
    return ids


def adapted(build, config, name="c"):
    am = peftlab.adapt(build())
    am.add_adapter(name, config)
    am.set_active(name)
    return am


def deltas(am, name="c"):
    return {path: layer.deltas[name] for path, layer in am.adapters[name].layers.items()}


def randomise(am, name="c", groups=None, seed=0, scale=0.3):
    """Random values for the given group rows (all groups by default); the other rows zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in deltas(am, name).values():
            for pname, t in d.named_parameters():
                new = scale * torch.randn(t.shape, generator=g)
                if groups is not None:
                    keep = torch.zeros(len(am.adapters[name].config.groups), dtype=torch.bool)
                    keep[groups] = True
                    if pname == "lora_A":
                        continue                      # A stays random: B decides the delta
                    if pname == "lora_B":
                        keep = keep.repeat_interleave(d.r)[None, :]
                    else:
                        keep = keep[:, None]
                    new = new * keep
                t.copy_(new)


def capture(am, ids, name="c", **kw):
    """path -> (layer input, layer output) for every layer holding adapter `name`."""
    seen = {}
    handles = [layer.register_forward_hook(lambda mod, args, out, p=path: seen.__setitem__(p, (args[0], out)))
               for path, layer in am.adapters[name].layers.items()]
    try:
        with torch.no_grad():
            am(input_ids=ids, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen


def ref_masks(ids, groups, token_type_ids=None, user=None):
    """(B, T, G) masks computed token by token, independently of the hook."""
    B, T = ids.shape
    out = torch.zeros(B, T, len(groups))
    for c, spec in enumerate(groups.values()):
        for b in range(B):
            inside = False
            for t in range(T):
                tok = int(ids[b, t])
                ok = True
                if "token_ids" in spec:
                    ok &= tok in spec["token_ids"]
                if "token_type" in spec:
                    tt = 0 if token_type_ids is None else int(token_type_ids[b, t])
                    ok &= tt == spec["token_type"]
                if "mask" in spec:
                    ok &= bool(user[list(groups)[c]][b, t])
                if "span" in spec:
                    s, e = spec["span"]
                    inc = spec.get("inclusive", True)
                    if tok == s:
                        inside, here = True, inc
                    elif tok == e and inside:
                        inside, here = False, inc
                    else:
                        here = inside
                    ok &= here
                out[b, t, c] = float(ok)
    return out


GROUPS = {"image": {"token_ids": [IMG]}, "quote": {"span": [START, END]}, "text": {"all": True}}


# ---- identity at start, per-token routing -----------------------------------------------------------
@pytest.mark.parametrize("form", ["lora", "ia3", "bias"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_fresh_adapter_is_bit_identical_to_base(form, build):
    assert_fresh_adapter_is_base(build, ContextConfig(groups=GROUPS, form=form), make_ids())


def test_span_masks_inclusive_and_exclusive():
    ids = torch.tensor([[1, START, 2, 3, END, 4, START, 5]])
    assert _span_mask(ids, START, END, True).long().tolist() == [[0, 1, 1, 1, 1, 0, 1, 1]]
    assert _span_mask(ids, START, END, False).long().tolist() == [[0, 0, 1, 1, 0, 0, 0, 1]]
    for inc in (True, False):
        groups = {"q": {"span": [START, END], "inclusive": inc}}
        assert torch.equal(_span_mask(make_ids(), START, END, inc).float(),
                           ref_masks(make_ids(), groups)[..., 0])


@pytest.mark.parametrize("form", ["lora", "ia3", "bias"])
def test_tokens_outside_the_group_are_bit_identical_to_base(form):
    """Only group "image" non-zero: at every wrapped layer, tokens that are not image tokens get
    exactly the base layer's output; in the causal LM, logits before the first image token are
    the base's bit for bit, and image tokens do change."""
    ids = make_ids()
    model = tiny_llama()
    base = logits(model, ids)
    am = adapted(lambda: model, ContextConfig(groups=GROUPS, form=form, targets="all-linear"))
    randomise(am, groups=[0])
    m = ids == IMG
    moved = False
    for path, (x, out) in capture(am, ids).items():
        layer = am.model.get_submodule(path)
        plain = layer.base_layer(x)
        assert torch.equal(out[~m], plain[~m]), path
        moved |= bool((out[m] - plain[m]).abs().max() > 1e-4)
    assert moved
    ours = logits(am, ids)
    assert torch.equal(ours[:, :4], base[:, :4])           # the first image token is at position 4
    assert (ours[0, 4:] - base[0, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_lora_equals_a_loop_over_groups(rslora):
    ids = make_ids()
    config = ContextConfig(groups=GROUPS, r=3, alpha=5, rslora=rslora, targets="all-linear",
                           multiplier={"image": 2.0, "text": 0.5})
    am = adapted(tiny_llama, config)
    randomise(am, scale=0.1)
    masks = ref_masks(ids, GROUPS)
    scalings = config.group_scalings()
    assert scalings[0] == 2.0 * (5 / 3 ** 0.5 if rslora else 5 / 3)
    for path, (x, out) in capture(am, ids).items():
        layer = am.model.get_submodule(path)
        d = layer.deltas["c"]
        plain = layer.base_layer(x)
        expected = torch.zeros(out.shape, dtype=torch.float64)
        for c in range(len(GROUPS)):         # each group's LoRA on its own, in float64
            A, B = (t.double() for t in d.factors(c))
            expected += masks[..., c:c + 1].double() * scalings[c] * F.linear(F.linear(x.double(), A), B)
        torch.testing.assert_close((out - plain).double(), expected, rtol=0, atol=1e-6)
        assert expected.abs().max() > 1e-2


def test_ia3_and_bias_forms_match_their_definitions():
    ids = make_ids()
    masks = ref_masks(ids, GROUPS)
    mult = torch.tensor([1.5, 1.0, 0.5])
    for form in ("ia3", "bias"):
        config = ContextConfig(groups=GROUPS, form=form, multiplier={"image": 1.5, "text": 0.5},
                               targets=["attn.k", "ffn.down", "norm"] if form == "bias" else None)
        am = adapted(tiny_llama, config)
        randomise(am)
        for path, (x, out) in capture(am, ids).items():
            layer = am.model.get_submodule(path)
            d = layer.deltas["c"]
            if form == "bias":
                expected = layer.base_layer(x) + (masks * mult) @ d.bias
            else:
                gate = torch.ones(x.shape[:-1] + d.ia3_l.shape[1:])
                for c in range(3):
                    gate = gate * (1 + mult[c] * masks[..., c:c + 1] * d.ia3_l[c])
                expected = layer.base_layer(x * gate) if d.scale_input else layer.base_layer(x) * gate
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        if form == "ia3":
            assert {d.scale_input for d in deltas(am).values()} == {True, False}   # ffn.down: input


def test_token_type_groups_on_bert():
    ids = make_ids()
    tt = torch.zeros_like(ids)
    tt[:, 6:] = 1
    groups = {"first": {"token_type": 0}, "second": {"token_type": 1}}
    am = adapted(tiny_bert, ContextConfig(groups=groups, targets=["attn", "ffn"]))
    randomise(am, groups=[1])
    m = tt == 1
    for path, (x, out) in capture(am, ids, token_type_ids=tt).items():
        plain = am.model.get_submodule(path).base_layer(x)
        assert torch.equal(out[~m], plain[~m]), path
    # without token_type_ids every token is type 0, as BERT reads it: the adapter is silent
    assert torch.equal(logits(am, ids), logits(tiny_bert(), ids))


def test_user_masks_route_like_the_equivalent_token_group():
    ids = make_ids()
    user = {"picked": ids == IMG}
    am = adapted(tiny_llama, ContextConfig(groups={"picked": {"mask": True}, "text": {"all": True}}))
    same = adapted(tiny_llama, ContextConfig(groups={"picked": {"token_ids": [IMG]}, "text": {"all": True}}))
    randomise(am)
    randomise(same)
    ours = forward_logits(am, ids, context_masks=user)
    assert torch.equal(ours, forward_logits(same, ids))
    assert (ours - logits(tiny_llama(), ids)).abs().max() > 1e-4
    with pytest.raises(peftlab.PeftlabError, match="context_masks"):
        am(input_ids=ids)
    with pytest.raises(peftlab.PeftlabError, match="missing"):
        am(input_ids=ids, context_masks={"other": user["picked"]})
    with pytest.raises(peftlab.PeftlabError, match=r"is \(2, 3\)"):
        am(input_ids=ids, context_masks={"picked": user["picked"][:, :3]})
    with pytest.raises(peftlab.PeftlabError, match="no group"):
        same(input_ids=ids, context_masks=user)


def test_combined_criteria_are_anded():
    ids = make_ids()
    groups = {"img_in_quote": {"token_ids": [IMG], "span": [START, END]}}
    hook = ContextHook(tiny_llama(), ContextConfig(groups=groups), {})
    masks = hook.masks_for({"input_ids": ids})
    assert torch.equal(masks, ref_masks(ids, groups))
    assert masks.sum() == 3          # row 0: 7 (4, 5 before START, 9 after END); row 1: 6, 10 (open)


def test_inner_model_without_the_hook_is_refused():
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS))
    with pytest.raises(peftlab.AdapterError, match="without context masks"):
        am.model(input_ids=make_ids())
    with am.disabled():
        assert torch.equal(logits(am, make_ids()), logits(tiny_llama(), make_ids()))


# ---- training, dropout -----------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["lora", "ia3", "bias"])
def test_training_lowers_loss_and_moves_only_the_adapter(form):
    ids = make_ids()
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS, form=form))
    am.set_trainable("c")
    check_training(am, "c", ids, labels_for(am, ids), changed="all")


def test_training_on_bert_with_token_types():
    ids = make_ids()
    tt = torch.zeros_like(ids)
    tt[:, 6:] = 1
    am = adapted(tiny_bert, ContextConfig(groups={"a": {"token_type": 0}, "b": {"token_type": 1}}))
    am.set_trainable("c")
    check_training(am, "c", ids, torch.tensor([0, 2]), changed="all", token_type_ids=tt)


def test_adaptor_dropout_only_in_training():
    ids = make_ids()
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS, dropout={"text": 0.5}))
    randomise(am)
    hook = am.hooks["c"]
    torch.manual_seed(0)
    train_masks = hook.masks_for({"input_ids": ids}, training=True)
    full = ref_masks(ids, GROUPS)
    assert torch.equal(train_masks[..., :2], full[..., :2])            # p = 0 for these
    assert 0 < train_masks[..., 2].sum() < full[..., 2].sum()
    am.eval()
    assert torch.equal(logits(am, ids), logits(am, ids))
    am.train()
    assert not torch.equal(am(input_ids=ids).logits, am(input_ids=ids).logits)


# ---- checkpoints, merging --------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["lora", "ia3", "bias"])
def test_save_load_bit_exact(form, tmp_path):
    groups = {**GROUPS, "picked": {"mask": True}}
    am = adapted(tiny_llama, ContextConfig(groups=groups, form=form, multiplier={"quote": 3.0}))
    randomise(am)
    ids = make_ids()
    assert_save_load_bit_exact(am, "c", tiny_llama, tmp_path, ids,
                               context_masks={"picked": torch.rand(ids.shape) > 0.5})


def test_merge_refused_with_several_groups():
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS))
    randomise(am)
    before = logits(am, make_ids())
    with pytest.raises(peftlab.CapabilityError, match="exactly one group"):
        am.merge("c")
    assert not am.adapters["c"].merged
    assert torch.equal(logits(am, make_ids()), before)
    single_but_routed = adapted(tiny_llama, ContextConfig(groups={"image": {"token_ids": [IMG]}}))
    with pytest.raises(peftlab.CapabilityError, match="routes each token"):
        single_but_routed.merge("c")


@pytest.mark.parametrize("form", ["lora", "ia3", "bias"])
def test_single_all_group_merges(form):
    config = ContextConfig(groups={"everything": {"all": True}}, form=form, multiplier={"everything": 0.7},
                           targets=["attn.q", "attn.v", "ffn.down"] if form != "ia3" else None)
    check_merge_unmerge_and_disable(
        tiny_llama, config, make_ids(),
        lambda am, name: perturb(am, name, scale=0.2, offset=0.1 if form == "ia3" else 0.0))


def test_single_all_group_equals_plain_lora():
    am = adapted(tiny_llama, ContextConfig(r=4, alpha=8))
    randomise(am)
    lora = adapted(tiny_llama, peftlab.LoraConfig(r=4, alpha=8), name="l")
    with torch.no_grad():
        for path, d in deltas(am).items():
            lora.model.get_submodule(path).deltas["l"].lora_A.copy_(d.lora_A)
            lora.model.get_submodule(path).deltas["l"].lora_B.copy_(d.lora_B)
    torch.testing.assert_close(logits(am, make_ids()), logits(lora, make_ids()), rtol=0, atol=1e-6)


# ---- generate -------------------------------------------------------------------------------------
def test_generate_recomputes_masks_each_step():
    """Span and token-id groups follow the generated tokens: cached generate equals a greedy loop of
    full forwards (which recompute the masks from the whole sequence)."""
    am = no_eos(adapted(tiny_llama, ContextConfig(groups=GROUPS)))
    randomise(am, scale=1.0)
    ids = make_ids()[:, :7]            # row 1 opens a span that stays open while generating
    seen = []
    holder = am.hooks["c"].holder
    layer = am.model.model.layers[0].self_attn.q_proj
    layer.register_forward_pre_hook(lambda mod, args: seen.append(holder.masks.clone()))
    got = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    full = ref_masks(got, GROUPS)
    assert [m.shape[1] for m in seen] == [7, 1, 1, 1, 1]
    assert torch.equal(torch.cat(seen, dim=1), full[:, :11])
    assert torch.equal(got, greedy(am, ids, 5))
    assert holder.masks is None
    plain = no_eos(peftlab.adapt(tiny_llama()))
    assert not torch.equal(got, plain.generate(ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=5, do_sample=False))


def test_generate_refuses_groups_it_cannot_extend():
    for groups in ({"m": {"mask": True}}, {"t": {"token_type": 0}}):
        am = adapted(tiny_llama, ContextConfig(groups=groups))
        with pytest.raises(peftlab.CapabilityError, match="cannot extend"):
            am.generate(make_ids(), max_new_tokens=2)
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS))
    with pytest.raises(peftlab.CapabilityError, match="beam"):
        am.generate(make_ids(), max_new_tokens=2, num_beams=2)


# ---- config, record --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"groups": {}}, "non-empty"),
    ({"groups": {"a": {"token_ids": []}}}, "token_ids"),
    ({"groups": {"a": {"span": [3, 3]}}}, "span"),
    ({"groups": {"a": {"all": True, "token_type": 1}}}, "cannot be combined"),
    ({"groups": {"a": {"colour": 1}}}, "one or more of"),
    ({"groups": {"a": {"token_ids": [1], "inclusive": True}}}, "inclusive"),
    ({"form": "dora"}, "form"),
    ({"multiplier": {"nope": 2.0}}, "not in groups"),
    ({"dropout": 1.0}, "dropout"),
    ({"r": 0}, "rank"),
])
def test_config_validation(bad, match):
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match=match):
        am.add_adapter("c", ContextConfig(**bad))
    assert not am.adapters


def test_defaults_shapes_and_record():
    assert ContextConfig().targets == ["attn.q", "attn.v"]
    assert ContextConfig(form="ia3").targets == ["attn.k", "attn.v", "ffn.down"]
    assert list(ContextConfig(groups={"text": {"all": True}, "image": {"token_ids": (5,)}}).groups) == \
        ["image", "text"]                                  # sorted: the tensors' group order
    am = adapted(tiny_llama, ContextConfig(groups=GROUPS, r=2))
    d = am.model.model.layers[0].self_attn.v_proj.deltas["c"]
    assert tuple(d.lora_A.shape) == (6, 32) and tuple(d.lora_B.shape) == (16, 6)
    assert am.num_parameters("c") == 4 * 3 * 2 * (32 + 32) - 2 * 3 * 2 * 16   # q: 32→32, v: 32→16
    with pytest.raises(peftlab.ConfigError, match="Linear and Conv1D"):
        am.add_adapter("n", ContextConfig(targets="norm"))
    m = METHODS["context"]
    assert m.typology.form == "lowrank" and m.supports("merge") and m.build_hook is not None
    assert "groups image(token_ids), quote(span), text(all)" in m.describe(am.adapters["c"].config)
