"""Tasks: how rows become batches, what the loss is, and how a model is scored.

Each task implements the protocol the training loop reads (`collate`, `loss`, `evaluate`,
`metric`, `higher_is_better`). Rows are the dicts `peftlab.assets.load_dataset` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, DataError
from .chat import IGNORE, chat_example, has_chat_template, prompt_ids


def format_metrics(metrics: dict[str, float]) -> str:
    """'accuracy 0.8233, loss 0.4100' for progress lines and reports."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _batches(rows: list[dict], batch_size: int):
    for i in range(0, len(rows), batch_size):
        yield rows[i:i + batch_size]


@dataclass
class ClassificationTask:
    """Sequence classification with an encoder and a classification head: accuracy."""

    tokenizer: object
    max_length: int = 128
    metric: str = "accuracy"
    higher_is_better: bool = True

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return dict(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        correct = total = 0
        for chunk in _batches(rows, batch_size):
            batch = self.collate(chunk)
            labels = batch.pop("labels")
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == labels).sum())
            total += len(chunk)
        return {"accuracy": correct / max(total, 1)}


@dataclass
class RegressionTask:
    """Sentence-pair regression (STS-B) with a one-output head: Pearson and Spearman."""

    tokenizer: object
    max_length: int = 128
    metric: str = "pearson"
    higher_is_better: bool = True

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer([r["text"] for r in rows], [r["text_pair"] for r in rows],
                               padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        batch["labels"] = torch.tensor([float(r["label"]) for r in rows])
        return dict(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return F.mse_loss(out.logits.squeeze(-1).float(), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        preds, gold = [], []
        for chunk in _batches(rows, batch_size):
            batch = self.collate(chunk)
            gold.append(batch.pop("labels"))
            preds.append(model(**batch).logits.squeeze(-1).float())
        p, g = torch.cat(preds), torch.cat(gold)
        return {"pearson": _pearson(p, g), "spearman": _pearson(_ranks(p), _ranks(g)),
                "mse": float(F.mse_loss(p, g))}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(len(x), dtype=x.dtype))


@dataclass
class InstructionClassificationTask:
    """Classification as an instruction for a causal LM: the prompt asks for one of the label
    words. Training is the LM loss of the answer token; scoring compares the label words'
    logits at the answer position.

    Prompts are left-padded with explicit position ids, so every row's answer position is the
    last one and the LM head runs on that position only (`logits_to_keep=1`): the head is a
    49k-way projection, as costly as the rest of a small model when applied to every token.
    """

    tokenizer: object
    labels: list[str]
    instruction: str = "Is the sentiment of this movie review positive or negative? Answer with one word."
    max_text_tokens: int = 96
    metric: str = "accuracy"
    higher_is_better: bool = True
    _label_ids: list[int] = field(default_factory=list, init=False, repr=False)
    # text -> prompt ids: the held-out rows are scored before and after training, and tokenising
    # a prompt (encode, decode, chat template) costs more than reading it back
    _prompt_cache: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._label_ids = []
        for word in self.labels:
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            if not ids:
                raise ConfigError(f"label word {word!r} encodes to no token")
            self._label_ids.append(ids[0])
        if len(set(self._label_ids)) != len(self._label_ids):
            raise ConfigError(f"label words {self.labels} share their first token; choose words "
                              "that start differently")

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the prompt for one text, up to the answer position."""
        cached = self._prompt_cache.get(text)
        if cached is None:
            cached = self._prompt_cache[text] = self._encode_prompt(text)
        return list(cached)

    def _encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)[: self.max_text_tokens]
        message = f"{self.instruction}\n\nReview: {tok.decode(ids)}"
        if has_chat_template(tok):
            return prompt_ids(tok, message)     # as generate and serve format a prompt
        return tok.encode(f"{message}\nAnswer:", add_special_tokens=True)

    def _prompts(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [self.prompt_ids(r["text"]) for r in rows]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)   # 0..n-1 over each row's real tokens
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._prompts(rows)
        batch["labels"] = torch.tensor([self._label_ids[int(r["label"])] for r in rows])
        return batch

    def answer_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, vocab) logits at the answer position."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs, logits_to_keep=1).logits[:, -1]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.answer_logits(model, batch).float(), batch["labels"])

    @torch.no_grad()
    def label_scores(self, model: nn.Module, rows: list[dict], batch_size: int) -> torch.Tensor:
        """(len(rows), n_labels) label-word logits at each row's answer position, in row order.

        Rows are batched by prompt length (longest first), so a batch pads its prompts to
        similar lengths: each row's scores are those of its prompt alone (padding is masked and
        positions count real tokens only), up to float noise, with much less padded work."""
        choices = torch.tensor(self._label_ids)
        order = sorted(range(len(rows)), key=lambda i: -len(self.prompt_ids(rows[i]["text"])))
        scores = torch.empty((len(rows), len(choices)))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = self._prompts([rows[i] for i in index])
            scores[torch.tensor(index)] = self.answer_logits(model, batch)[:, choices].float()
        return scores

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        gold = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        correct = int((self.label_scores(model, rows, batch_size).argmax(-1) == gold).sum())
        return {"accuracy": correct / max(len(rows), 1)}


@dataclass
class CausalLMTask:
    """Causal language modelling on `text` rows, or on the assistant turns of chat rows
    (prompt,response or messages) formatted as `generate` and `serve` format prompts (the
    tokenizer's chat template, else prompt + newline: training/chat.py): token-level loss,
    scored by perplexity."""

    tokenizer: object
    max_length: int = 128
    metric: str = "perplexity"
    higher_is_better: bool = False

    def _encode(self, row: dict) -> tuple[list[int], list[int]]:
        if "prompt" in row or "messages" in row:
            ids, labels = chat_example(self.tokenizer, row)
            return ids[: self.max_length], labels[: self.max_length]
        ids = self.tokenizer.encode(row["text"], add_special_tokens=False)[: self.max_length]
        return ids, list(ids)

    def check(self, rows: list[dict]) -> None:
        """DataError naming the first chat row the tokenizer cannot format (a chat template that
        refuses or rewrites the conversation; a conversation and no template), so `train` stops
        before its first step rather than at the step that meets the row (~0.4 ms a row)."""
        for i, row in enumerate(rows):
            if "prompt" in row or "messages" in row:
                try:
                    chat_example(self.tokenizer, row)
                except DataError as e:
                    raise DataError(f"training row {i} of {len(rows)}: {e}") from e

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [self._encode(r) for r in rows]
        width = max(len(ids) for ids, _ in pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (seq, target) in enumerate(pairs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            lab[i, : len(target)] = torch.tensor(target)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        nll, count = 0.0, 0
        for chunk in _batches(rows, batch_size):
            batch = self.collate(chunk)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         ignore_index=IGNORE, reduction="sum"))
            count += int((target != IGNORE).sum())
        loss = nll / max(count, 1)
        return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}
