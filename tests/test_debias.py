"""PEFTDebias: CDA word swapping and augmentation, masked-LM masking, the patch's two training
phases on a tiny BERT with a word-level tokenizer, patch checkpoints and the flip-rate measure."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

import peftlab
from peftlab.training.debias import (
    PATCH_FILE,
    MaskedLMHead,
    PatchConfig,
    PatchTask,
    counterfactual_augment,
    counterfactual_flip_rate,
    counterfactual_pairs,
    load_patch,
    load_word_pairs,
    mask_tokens,
    save_patch,
    swap_words,
    train_patch,
    train_task_on_patch,
)
from peftlab.core.errors import AdapterError, CheckpointError, ConfigError, DataError
from peftlab.training.tasks import IGNORE, ClassificationTask
from peftlab.training.loop import TrainConfig

torch.set_num_threads(1)

PAIRS = load_word_pairs()
SUBJECTS = ["he", "she", "the man", "the woman", "his brother", "her sister", "the actor",
            "the actress", "the film", "the plot"]
VERDICTS = ["was good", "was great", "was bad", "was awful", "was fine", "was dull"]
SENTENCES = [f"{s} {v} ." for s in SUBJECTS for v in VERDICTS]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing whitespace tokenizer over the test sentences' words, BERT-style specials."""
    words = sorted({w for s in SENTENCES for w in s.split()} | {w for s in SENTENCES
                                                              for w in swap_words(s, PAIRS).split()})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


TOK = word_tokenizer()


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


def rows(labels: bool = True) -> list[dict]:
    out = [{"text": s} for s in SENTENCES]
    if labels:   # sentiment from the verdict, so the task is learnable and gender-free
        for r in out:
            r["label"] = int(any(w in r["text"] for w in ("good", "great", "fine")))
    return out


def quick(steps: int = 20, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=lr, progress=False)


# ---- word swapping ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, swapped", [
    ("he said", "she said"),
    ("She said", "He said"),
    ("HE SAID", "SHE SAID"),
    ("His wife, her husband.", "Her husband, his wife."),
    ('"Mr. Smith?" asked the actress!', '"Mrs. Smith?" asked the actor!'),
    ("Mrs. Jones", "Mr. Jones"),
    ("the heat, the theme, another mrsa shell", "the heat, the theme, another mrsa shell"),
    ("he's a Spider-Man fan", "she's a Spider-Man fan"),
    ("men (and women) 2 kings", "women (and men) 2 queens"),
])
def test_swap_words_whole_words_case_and_punctuation(text, swapped):
    assert swap_words(text, PAIRS) == swapped


def test_swap_is_its_own_inverse_for_unambiguous_words():
    text = "The King met his nephew, the Prince, and HIS father."
    assert swap_words(swap_words(text, PAIRS), PAIRS) == text
    # "her" reads as possessive: her -> his, so him -> her -> his does not come back
    assert swap_words("saw him", PAIRS) == "saw her" and swap_words("saw her", PAIRS) == "saw his"


def test_shipped_list_is_two_way_and_first_line_decides(tmp_path):
    assert PAIRS["king"] == "queen" and PAIRS["queen"] == "king"
    assert PAIRS["her"] == "his" and PAIRS["hers"] == "his" and PAIRS["his"] == "her"
    assert PAIRS.source == "peftlab:data/gender_pairs.txt" and len(PAIRS.sha256) == 64
    path = tmp_path / "pairs.txt"
    path.write_text("# comment\nKing Queen  # trailing comment\n\nking empress\n")
    custom = load_word_pairs(path, axis="royal")
    assert dict(custom) == {"king": "queen", "queen": "king", "empress": "king"}
    assert custom.axis == "royal" and custom.sha256 != PAIRS.sha256


@pytest.mark.parametrize("content, line, words", [
    ("he she\nman woman boy\n", 2, "expected two words"),
    ("# only\n\nhe he\n", 3, "paired with itself"),
    ("he she\nhe/him she\n", 2, "is not a word"),
    ("# nothing here\n\n", 1, "no word pairs"),
])
def test_bad_pair_file_names_file_and_line(tmp_path, content, line, words):
    path = tmp_path / "pairs.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=words) as err:
        load_word_pairs(path)
    assert f"{path}:{line}:" in str(err.value)


def test_pair_file_not_utf8_or_missing(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"he she\nm\xe9re p\xe8re\n")
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        load_word_pairs(path)
    with pytest.raises(DataError, match="cannot read"):
        load_word_pairs(tmp_path / "absent.txt")


def test_augment_keeps_rows_with_attribute_words_and_doubles_them():
    data = [{"text": "the film was good", "label": 1}, {"text": "He was great", "label": 1},
            {"text": "the heat was awful", "label": 0}, {"text": "her sister was dull", "label": 0}]
    out = counterfactual_augment(data, PAIRS)
    assert out == [{"text": "He was great", "label": 1}, {"text": "She was great", "label": 1},
                   {"text": "her sister was dull", "label": 0}, {"text": "his brother was dull", "label": 0}]
    pairs = counterfactual_pairs(data, PAIRS)
    assert [(r["text"], r["counterfactual"]) for r in pairs] == [
        ("He was great", "She was great"), ("her sister was dull", "his brother was dull")]
    with pytest.raises(DataError, match="row 1 has no string 'text'"):
        counterfactual_augment([{"text": "he"}, {"body": "she"}], PAIRS)


# ---- masked-LM -----------------------------------------------------------------------------------
def test_masking_ratio_labels_and_80_10_10_split():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (200, 100), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :3] = False                         # e.g. [CLS] and padding are never picked
    inputs, labels = mask_tokens(ids, maskable, mask_token_id=4, vocab_size=50, generator=g)
    picked = labels != IGNORE
    assert not picked[:, :3].any()
    assert abs(picked[maskable].float().mean().item() - 0.15) < 0.01     # 19,400 candidates
    assert torch.equal(labels[picked], ids[picked])                     # labels: the original ids
    assert torch.equal(inputs[~picked], ids[~picked])                   # unpicked tokens untouched
    as_mask = (inputs[picked] == 4).float().mean().item()
    kept = (inputs[picked] == ids[picked]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and 0.07 < kept < 0.14            # 10% kept (+ random hits)


def test_masking_always_picks_one_token_and_collate_skips_specials():
    ids = torch.tensor([[2, 9, 9, 3, 0]])
    maskable = torch.tensor([[False, True, True, False, False]])
    _, labels = mask_tokens(ids, maskable, mask_token_id=4, vocab_size=20, mask_prob=1e-9)
    assert (labels != IGNORE).sum() == 1 and (labels[~maskable] == IGNORE).all()
    batch = PatchTask(TOK).collate(counterfactual_pairs(rows(False)[:4], PAIRS))
    special = (batch["input_ids"] == TOK.cls_token_id) | (batch["input_ids"] == TOK.sep_token_id) \
        | (batch["attention_mask"] == 0)
    assert batch["input_ids"].shape[0] == 8                             # 4 originals + 4 swapped
    assert (batch["mlm_labels"][special] == IGNORE).all()


def test_masked_lm_head_decodes_through_the_tied_embeddings():
    model = tiny_classifier()
    head = MaskedLMHead.for_model(model)
    h = torch.randn(3, 32)
    expected = head.norm(torch.nn.functional.gelu(head.dense(h))) @ model.get_input_embeddings().weight.T
    assert torch.allclose(head(h), expected, atol=1e-6)
    assert not any(p is model.get_input_embeddings().weight for p in head.parameters())


# ---- the upstream phase ----------------------------------------------------------------------------
def test_mlm_patch_trains_lowers_the_loss_and_leaves_no_scaffold():
    am = peftlab.adapt(tiny_classifier())
    result = train_patch(am, "patch", TOK, rows(False), PAIRS, train_config=quick(80))
    losses = result.train.losses
    assert result.pairs == 48                                           # 8 of 10 subjects are gendered
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    assert not any("debias_mlm_head" in n for n, _ in am.named_modules())
    assert am.active == ["patch"] and not am.adapters["patch"].trainable
    assert result.info["mlm_head"] == "scaffold" and result.info["axis"] == "gender"
    assert result.info["word_pairs"]["sha256"] == PAIRS.sha256
    assert any(t.abs().sum() > 0 for (_, n), t in am.adapter_tensors("patch").items() if n == "lora_B")


def test_mlm_patch_uses_a_models_own_head():
    torch.manual_seed(0)
    am = peftlab.adapt(BertForMaskedLM(bert_config()).eval())
    result = train_patch(am, "patch", TOK, rows(False), PAIRS, train_config=quick(30))
    assert result.info["mlm_head"] == "own"
    assert sum(result.train.losses[-5:]) < sum(result.train.losses[:5])


def pair_gap(am, texts: list[dict]) -> float:
    """Mean relative distance between the pooled states of each text and its counterfactual."""
    from peftlab.training.debias import _pooled
    batch = PatchTask(TOK, PatchConfig(objective="invariance")).collate(texts)
    with torch.no_grad():
        h = _pooled(am(**batch, output_hidden_states=True).hidden_states[-1], batch["attention_mask"])
    a, b = h[: len(texts)], h[len(texts):]
    return float(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean())


@pytest.mark.parametrize("layers", ["last", "all"])
def test_invariance_patch_brings_counterfactual_pairs_together(layers):
    am = peftlab.adapt(tiny_classifier())
    pairs = counterfactual_pairs(rows(False), PAIRS)
    before = pair_gap(am, pairs)
    result = train_patch(am, "patch", TOK, rows(False), PAIRS, train_config=quick(60, 2e-2),
                         patch=PatchConfig(objective="invariance", invariance_layers=layers),
                         method_config=peftlab.LoraConfig(targets=["attn.q", "attn.v", "ffn.down"]))
    after = pair_gap(am, pairs)
    assert result.info["mlm_head"] is None
    assert after < 0.5 * before, (before, after)


def test_combined_objective_is_mlm_plus_weighted_invariance():
    am = peftlab.adapt(tiny_classifier())
    am.add_adapter("p", peftlab.LoraConfig(init="random"))
    am.set_active(["p"])
    head = MaskedLMHead.for_model(am.model)
    both = PatchTask(TOK, PatchConfig(objective="mlm+invariance", invariance_weight=0.3), head)
    batch = both.collate(counterfactual_pairs(rows(False)[:6], PAIRS))
    with torch.no_grad():
        mlm = PatchTask(TOK, PatchConfig(objective="mlm"), head).loss(am, batch)
        inv = PatchTask(TOK, PatchConfig(objective="invariance")).loss(am, batch)
        total = both.loss(am, batch)
    assert inv > 0 and mlm > 0
    assert float(total) == pytest.approx(float(mlm + 0.3 * inv), rel=1e-6)


def test_patch_input_errors():
    am = peftlab.adapt(tiny_classifier())
    with pytest.raises(ConfigError, match="objective 'adversarial' is unknown"):
        train_patch(am, "p", TOK, rows(False), PAIRS, patch=PatchConfig(objective="adversarial"))
    with pytest.raises(ConfigError, match="invariance_layers must be 'last' or 'all'"):
        train_patch(am, "p", TOK, rows(False), PAIRS, patch=PatchConfig(invariance_layers="first"))
    with pytest.raises(ConfigError, match="for the 'gender' axis but the patch is for 'race'"):
        train_patch(am, "p", TOK, rows(False), PAIRS, patch=PatchConfig(axis="race"))
    with pytest.raises(DataError, match="none of the 2 rows holds a word"):
        train_patch(am, "p", TOK, [{"text": "the film"}, {"text": "the plot"}], PAIRS)
    assert am.adapters == {}


# ---- checkpoints and the downstream phase -------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_patch(tmp_path_factory):
    am = peftlab.adapt(tiny_classifier())
    result = train_patch(am, "patch", TOK, rows(False), PAIRS, train_config=quick(10))
    directory = save_patch(am, tmp_path_factory.mktemp("patch"), "patch", result.info)
    return directory, {k: v.clone() for k, v in am.adapter_tensors("patch").items()}


def test_patch_round_trips_with_its_axis_metadata(saved_patch, tmp_path):
    directory, tensors = saved_patch
    assert (directory / PATCH_FILE).is_file() and (directory / "adapter_config.json").is_file()
    am = peftlab.adapt(tiny_classifier())
    info = load_patch(am, directory, "p", axis="gender", pairs=PAIRS)
    assert info["axis"] == "gender" and info["patch"]["objective"] == "mlm"
    assert all(torch.equal(am.adapter_tensors("p")[k], t) for k, t in tensors.items())
    assert not am.adapters["p"].trainable and am.active == []
    with pytest.raises(CheckpointError, match="'gender' axis, not 'race'"):
        load_patch(am, directory, "q", axis="race")
    other = tmp_path / "pairs.txt"
    other.write_text("he she\n")
    with pytest.raises(CheckpointError, match="use the same list or retrain"):
        load_patch(am, directory, "q", pairs=load_word_pairs(other))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_patch(am, tmp_path, "q")


def test_downstream_trains_the_task_adapter_and_leaves_the_patch_bit_identical(saved_patch):
    directory, tensors = saved_patch
    am = peftlab.adapt(tiny_classifier())
    load_patch(am, directory, "patch")
    task = ClassificationTask(TOK)
    result = train_task_on_patch(am, "patch", "task",
                                 peftlab.LoraConfig(modules_to_save=["classifier"]), task,
                                 rows(), None, quick(30))
    assert am.active == ["patch", "task"]
    assert all(torch.equal(am.adapter_tensors("patch")[k], t) for k, t in tensors.items())
    assert any(t.abs().sum() > 0 for (_, n), t in am.adapter_tensors("task").items() if n == "lora_B")
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    trainable = {id(p) for p in am.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in am.adapter_parameters("task")}
    with pytest.raises(AdapterError, match="no adapter 'pach'"):
        train_task_on_patch(am, "pach", "t2", peftlab.LoraConfig(), task, rows(), None, quick(1))


# ---- the bias measure ----------------------------------------------------------------------------
def near_tied_classifier(data: list[dict]) -> BertForSequenceClassification:
    """A random classifier with large weights (so words move the prediction far more than rounding
    does) whose bias is moved so half the texts fall on each side: some swaps cross the boundary,
    others do not."""
    config = bert_config()
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        batch = TOK([r["text"] for r in data], padding=True, return_tensors="pt")
        logits = model(**batch).logits
        # the boundary halfway between the two middle margins: not on any text's margin, where
        # padded and unpadded forwards (equal up to rounding) could disagree about the argmax
        margins = (logits[:, 1] - logits[:, 0]).sort().values
        k = len(margins) // 2
        model.classifier.bias[1] -= (margins[k - 1] + margins[k]) / 2
    return model


def test_flip_rate_equals_a_direct_count():
    data = rows()
    model = near_tied_classifier(data)
    task = ClassificationTask(TOK)
    got = counterfactual_flip_rate(model, task, data, PAIRS, batch_size=5)
    flipped, deltas, examples = 0, [], 0
    with torch.no_grad():
        for r in data:
            swapped = swap_words(r["text"], PAIRS)
            if swapped == r["text"]:
                continue
            examples += 1
            p, q = (model(**TOK(t, return_tensors="pt")).logits.softmax(-1)[0] for t in (r["text"], swapped))
            flipped += int(p.argmax() != q.argmax())
            deltas.append(float((p[1] - q[1]).abs()))
    assert 0 < flipped < examples                 # the case exercises both outcomes
    assert got["examples"] == examples == 48 and got["skipped"] == 12
    assert got["flipped"] == flipped and got["flip_rate"] == pytest.approx(flipped / examples)
    assert got["mean_abs_dprob"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-6)
    with pytest.raises(DataError, match="needs rows with attribute words"):
        counterfactual_flip_rate(model, task, [{"text": "the plot", "label": 0}], PAIRS)
