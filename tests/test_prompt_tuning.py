"""Prompt tuning on tiny random models, checked against plain forwards and the real `peft`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from method_checks import (QUIET, adapted_with, assert_changes_outputs_and_disable_restores_base,
                           assert_generate_matches_greedy_loop, assert_left_padded_call_matches_unpadded,
                           assert_save_load_bit_exact, check_training, forward_logits, peft_load, rand_ids)

import peftlab
from peftlab.core.errors import CapabilityError, ConfigError
from peftlab.methods.prompt_tuning import PromptTuningConfig

peft = pytest.importorskip("peft")

pytestmark = QUIET

N = 4
ATOL = 1e-5
_prompted = adapted_with(PromptTuningConfig, num_virtual_tokens=N)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_prompt_changes_outputs_and_disable_restores_base(build):
    am = _prompted(build)
    ids, base = assert_changes_outputs_and_disable_restores_base(am, build)
    am.set_active([])
    assert torch.equal(forward_logits(am, ids), base)


def test_prompt_part_and_card():
    am = _prompted(tiny_llama)
    (path, tname), t = next(iter(am.adapter_tensors("p").items()))
    assert (path, tname) == ("model.embed_tokens", "prompt") and t.shape == (N, 32)
    assert am.num_parameters("p") == N * 32
    assert "in-sequence" in am.card("p")
    with pytest.raises(CapabilityError):
        am.merge(["p"])


def test_init_vocab_and_text():
    model = tiny_llama()
    weight = model.model.embed_tokens.weight.detach().clone()
    am = peftlab.adapt(model)
    am.add_adapter("t", PromptTuningConfig(num_virtual_tokens=5, init="text", init_token_ids=[7, 9]))
    assert torch.equal(am.hooks["t"].prompt, weight[[7, 9, 7, 9, 7]])
    am.add_adapter("v", PromptTuningConfig(num_virtual_tokens=5, init="vocab", seed=3))
    am.add_adapter("v2", PromptTuningConfig(num_virtual_tokens=5, init="vocab", seed=3))
    v = am.hooks["v"].prompt
    assert torch.equal(v, am.hooks["v2"].prompt)
    assert all(any(torch.equal(row, w) for w in weight) for row in v)


def test_config_errors():
    with pytest.raises(ConfigError, match="init_token_ids"):
        PromptTuningConfig(init="text").validate()
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0).validate()
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(ConfigError):
        am.add_adapter("p", PromptTuningConfig(targets=["attn.q"]))
    assert not am.adapters


def test_training_lowers_loss_and_touches_only_the_prompt():
    am = _prompted(tiny_llama)
    am.set_trainable("p")
    ids = rand_ids(4, 8, seed=5)
    check_training(am, "p", ids, ids, attention_mask=torch.ones_like(ids), steps=15, lr=0.3,
                   margin=0.02)


def test_save_load_roundtrip(tmp_path):
    am = _prompted(tiny_llama)
    assert_save_load_bit_exact(am, "p", tiny_llama, tmp_path, rand_ids())


def test_export_llama_matches_peft(tmp_path):
    am = _prompted(tiny_llama)
    ids = rand_ids()
    mask = torch.ones_like(ids)
    ours = forward_logits(am, ids, attention_mask=mask)
    peftlab.export_peft(am, "p", tmp_path / "e")
    pm = peft_load(tiny_llama, tmp_path / "e")
    theirs = forward_logits(pm, ids, attention_mask=mask)
    assert theirs.shape[1] == ids.shape[1] + N         # peft keeps the virtual positions
    torch.testing.assert_close(theirs[:, N:], ours, atol=ATOL, rtol=0)
    # the loss is peft's (labels get -100 in front of the virtual tokens)
    with torch.no_grad():
        loss = am(input_ids=ids, attention_mask=mask, labels=ids).loss
        torch.testing.assert_close(loss, pm(input_ids=ids, attention_mask=mask, labels=ids).loss,
                                   atol=ATOL, rtol=0)
    # and the other way: our import of the export is bit-exact
    back = peftlab.adapt(tiny_llama())
    peftlab.import_peft(back, tmp_path / "e", "q")
    assert torch.equal(back.hooks["q"].prompt, am.hooks["p"].prompt)


@pytest.mark.parametrize("with_head", [False, True])
def test_export_bert_seq_cls_matches_peft(tmp_path, with_head):
    am = peftlab.adapt(tiny_bert())
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=N,
                                           modules_to_save=["classifier"] if with_head else None))
    am.set_active("p")
    if with_head:   # a trained head differs from the base's
        with torch.no_grad():
            am.model.classifier.copies["p"].weight.add_(0.5)
    ids = rand_ids()
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    kw = {"attention_mask": torch.ones_like(ids), "token_type_ids": tt}
    ours = forward_logits(am, ids, **kw)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = peft_load(tiny_bert, d)
    torch.testing.assert_close(forward_logits(pm, ids, **kw), ours, atol=ATOL, rtol=0)
    back = peftlab.adapt(tiny_bert())
    peftlab.import_peft(back, d, "q")
    back.set_active("q")
    assert torch.equal(forward_logits(back, ids, **kw), ours)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_import_peft_saved_prompt(tmp_path, kind):
    build = {"llama": tiny_llama, "bert": tiny_bert}[kind]
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind]
    torch.manual_seed(7)
    pm = peft.get_peft_model(build(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)).eval()
    if kind == "bert":   # peft trains the head too (modules_to_save): make it differ
        with torch.no_grad():
            for p in pm.base_model.classifier.modules_to_save["default"].parameters():
                p.add_(0.3)
    pm.save_pretrained(tmp_path / "s")
    ids = rand_ids()
    mask = torch.ones_like(ids)
    theirs = forward_logits(pm, ids, attention_mask=mask)
    am = peftlab.adapt(build())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    ours = forward_logits(am, ids, attention_mask=mask)
    if kind == "llama":
        theirs = theirs[:, N:]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_matches_greedy_loop(build):
    assert_generate_matches_greedy_loop(_prompted(build))


def test_generate_matches_peft(tmp_path):
    am = _prompted(tiny_llama)
    ids = rand_ids(2, 5)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = peft_load(tiny_llama, d)
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "do_sample": False}
    ours = am.generate(ids, **kw)
    theirs = pm.generate(input_ids=ids, **kw)
    assert torch.equal(ours[:, -4:], theirs[:, -4:])


def test_left_padded_instruction_call_matches_unpadded():
    assert_left_padded_call_matches_unpadded(_prompted(tiny_llama))


# ---- families beyond the decoder-only and BERT ones (issue 22) --------------------------------------
def _family(name: str):
    """A fresh tiny model of a support-matrix family, seeded."""
    from peftlab.apps.support import FAMILIES
    torch.manual_seed(0)
    return FAMILIES[name].build().eval()


def _family_ids(seed: int = 1) -> torch.Tensor:
    """Token ids in the support-matrix families' 64-token vocabulary."""
    from peftlab.apps.support import VOCAB
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_bart_prompt_goes_in_front_of_the_encoder_input():
    """BART's "embed" role names the encoder's and the decoder's embed_tokens (tied to `shared`):
    the prompt attaches to the encoder's and is prepended to what it embeds."""
    am = peftlab.adapt(_family("bart"))
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=N))
    am.set_active("p")
    assert [s.path for s in am.adapter("p").sites] == ["model.encoder.embed_tokens"]
    ids, dec = _family_ids(), _family_ids(seed=2)
    prompt = am.hooks["p"].prompt.detach()
    with torch.no_grad(), am.disabled():
        embeds = torch.cat([prompt.expand(2, -1, -1), am.model.model.encoder.embed_tokens(ids)], dim=1)
        expected = am.model(inputs_embeds=embeds, decoder_input_ids=dec).logits
    assert torch.equal(forward_logits(am, ids, decoder_input_ids=dec), expected)


def test_whisper_prompt_is_refused_before_anything_changes():
    """Whisper's forward takes input_features, no inputs_embeds: a CapabilityError at
    add_adapter, not a ValueError at the first forward."""
    am = peftlab.adapt(_family("whisper"))
    with pytest.raises(CapabilityError, match="takes no inputs_embeds"):
        am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=N))
    assert not am.adapters and not am.hooks


def test_distilbert_seq_cls_prompt_round_trips_with_peft(tmp_path):
    """peft matches modules_to_save 'classifier' by string suffix, so it also trains and saves
    DistilBERT's 'pre_classifier': our export writes it (peft loads it), and a peft-saved
    adapter, pre_classifier trained, imports with peft's logits."""
    build = lambda: _family("distilbert")
    torch.manual_seed(7)
    # DistilBERT's config calls the width `dim`, which peft does not read: say it
    pm = peft.get_peft_model(build(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N,
                                                              token_dim=32, num_attention_heads=4,
                                                              num_layers=2))
    pm.eval()
    with torch.no_grad():
        for name in ("pre_classifier", "classifier"):
            for p in getattr(pm.base_model, name).modules_to_save["default"].parameters():
                p.add_(0.3)
    pm.save_pretrained(tmp_path / "s")
    ids = _family_ids()
    am = peftlab.adapt(build())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    assert sorted(am.adapter("p").copies) == ["classifier", "pre_classifier"]
    torch.testing.assert_close(forward_logits(am, ids), forward_logits(pm, ids), atol=ATOL, rtol=0)
    # and our export of it loads in peft with the same logits
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    torch.testing.assert_close(forward_logits(peft_load(build, d), ids), forward_logits(am, ids),
                               atol=ATOL, rtol=0)


def test_distilbert_prompt_with_trained_classifier_exports_to_peft(tmp_path):
    """A trained 'classifier' copy alone: peft still wraps 'pre_classifier' (suffix match) and
    needs its tensors, which the export writes unchanged from the base."""
    build = lambda: _family("distilbert")
    am = peftlab.adapt(build())
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=N, modules_to_save=["classifier"]))
    am.set_active("p")
    with torch.no_grad():
        am.model.classifier.copies["p"].weight.add_(0.5)
    ids = _family_ids()
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    torch.testing.assert_close(forward_logits(peft_load(build, d), ids), forward_logits(am, ids),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_prompt_round_trips_with_peft(tmp_path, family):
    """SEQ_2_SEQ_LM prompt tuning with the prompt before the encoder input only
    (num_transformer_submodules 1): a peft-made adapter imports with peft's logits, ours exports
    to peft with ours; peft's default two-submodule layout is refused by name."""
    build = lambda: _family(family)
    torch.manual_seed(7)
    pm = peft.get_peft_model(build(), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, num_transformer_submodules=1)).eval()
    pm.save_pretrained(tmp_path / "s")
    kw = {"decoder_input_ids": _family_ids(seed=2)}
    ids = _family_ids()
    am = peftlab.adapt(build())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    torch.testing.assert_close(forward_logits(am, ids, **kw), forward_logits(pm, ids, **kw),
                               atol=ATOL, rtol=0)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    torch.testing.assert_close(forward_logits(peft_load(build, d), ids, **kw),
                               forward_logits(am, ids, **kw), atol=ATOL, rtol=0)
    peft.get_peft_model(build(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
                        ).save_pretrained(tmp_path / "two")
    with pytest.raises(CapabilityError, match="num_transformer_submodules=2"):
        peftlab.import_peft(peftlab.adapt(build()), tmp_path / "two", "q")
