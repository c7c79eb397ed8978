"""Prompt tuning on tiny random models, checked against plain forwards and the real `peft`."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import peftlab
from peftlab.errors import CapabilityError, ConfigError
from peftlab.methods.prompt_tuning import PromptTuningConfig

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N = 4
ATOL = 1e-5


def _ids(b: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def _prompted(build, n: int = N, **kw) -> peftlab.AdaptedModel:
    am = peftlab.adapt(build())
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=n, **kw))
    am.set_active("p")
    return am


@torch.no_grad()
def _logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_prompt_changes_outputs_and_disable_restores_base(build):
    ids = _ids()
    am = _prompted(build)
    base = _logits(build(), ids)
    ours = _logits(am, ids, attention_mask=torch.ones_like(ids))
    assert ours.shape == base.shape and torch.isfinite(ours).all()
    assert (ours - base).abs().max() > 1e-3
    with am.disabled():
        assert torch.equal(_logits(am, ids), base)
    am.set_active([])
    assert torch.equal(_logits(am, ids), base)


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
    base_before = {k: v.clone() for k, v in am.model.state_dict().items()}
    prompt_before = am.hooks["p"].prompt.detach().clone()
    ids = _ids(4, 8, seed=5)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.Adam(list(am.adapter_parameters("p")), lr=0.3)
    losses = []
    for _ in range(15):
        loss = am(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses
    assert not torch.equal(am.hooks["p"].prompt, prompt_before)
    for k, v in am.model.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_save_load_roundtrip(tmp_path):
    am = _prompted(tiny_llama)
    ids = _ids()
    ours = _logits(am, ids)
    am.save_adapter(tmp_path / "a", "p")
    fresh = peftlab.adapt(tiny_llama())
    fresh.load_adapter(tmp_path / "a", "p")
    fresh.set_active("p")
    assert torch.equal(fresh.hooks["p"].prompt, am.hooks["p"].prompt)
    assert torch.equal(_logits(fresh, ids), ours)


def _peft_load(build, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build(), str(directory)).eval()


def test_export_llama_matches_peft(tmp_path):
    am = _prompted(tiny_llama)
    ids = _ids()
    mask = torch.ones_like(ids)
    ours = _logits(am, ids, attention_mask=mask)
    peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_llama, tmp_path / "e")
    theirs = _logits(pm, ids, attention_mask=mask)
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
    ids = _ids()
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    kw = {"attention_mask": torch.ones_like(ids), "token_type_ids": tt}
    ours = _logits(am, ids, **kw)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_bert, d)
    torch.testing.assert_close(_logits(pm, ids, **kw), ours, atol=ATOL, rtol=0)
    back = peftlab.adapt(tiny_bert())
    peftlab.import_peft(back, d, "q")
    back.set_active("q")
    assert torch.equal(_logits(back, ids, **kw), ours)


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
    ids = _ids()
    mask = torch.ones_like(ids)
    theirs = _logits(pm, ids, attention_mask=mask)
    am = peftlab.adapt(build())
    peftlab.import_peft(am, tmp_path / "s", "p")
    am.set_active("p")
    ours = _logits(am, ids, attention_mask=mask)
    if kind == "llama":
        theirs = theirs[:, N:]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _no_eos(am):
    am.model.generation_config.eos_token_id = None    # the greedy reference never stops
    return am


def _greedy(model, ids, steps):
    """Reference: greedy decoding by full forwards, one token at a time."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_matches_greedy_loop(build):
    am = _no_eos(_prompted(build))
    ids = _ids(2, 5)
    got = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, _greedy(am, ids, 4))


def test_generate_matches_peft(tmp_path):
    am = _prompted(tiny_llama)
    ids = _ids(2, 5)
    d = peftlab.export_peft(am, "p", tmp_path / "e")
    pm = _peft_load(tiny_llama, d)
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "do_sample": False}
    ours = am.generate(ids, **kw)
    theirs = pm.generate(input_ids=ids, **kw)
    assert torch.equal(ours[:, -4:], theirs[:, -4:])


def test_left_padded_instruction_call_matches_unpadded():
    """InstructionClassificationTask's call: left padding, explicit positions, logits_to_keep=1."""
    am = _prompted(tiny_llama)
    short, long_ = _ids(1, 5, seed=2)[0], _ids(1, 8, seed=3)[0]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = short, 1
    ids[1], mask[1] = long_, 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = am(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
        assert out.shape == (2, 1, VOCAB)
        alone = [am(input_ids=s[None]).logits[0, -1] for s in (short, long_)]
    for row, ref in zip(out[:, -1], alone, strict=True):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=0)
