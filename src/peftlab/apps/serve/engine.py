"""The model side of the server: tokenising, and running a batch of requests as one mixed batch
in which every example uses its own adapter."""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.bank import AdapterBank
from ...core.errors import CapabilityError, PeftlabError
from ...core.model import AdaptedModel
from ...core.quantised import Quantization
from ...training.chat import conversation_prompt_ids, prompt_ids

KINDS = ("causal-lm", "classification")
DEFAULT_MAX_INPUT_TOKENS = 2048   # when neither the caller nor the model's config sets one


class RequestError(PeftlabError):
    """A request the server refuses as asked; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Sampling:
    """How a generate request picks its tokens: temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False}
        # top_k=0 switches off the top-k filter a generation config may default to, so that
        # temperature and top_p alone shape the distribution.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(eq=False)
class Job:
    """One queued request: its token ids, its adapter (None = the base model), what to do with
    them, and the future its answer goes to."""

    kind: str                              # "generate" or "classify"
    ids: list[int]
    adapter: str | None
    max_tokens: int = 0                    # generate: new tokens at most
    sampling: Sampling = Sampling()
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        """Jobs of one group can share a batch (one `generate` call takes one set of sampling
        settings). A seeded sampling job is a group of its own, so its seed alone fixes its
        sample whatever else arrives with it."""
        s = self.sampling
        if self.kind == "classify" or s.greedy:
            return (self.kind,)
        if s.seed is not None:
            return (self.kind, id(self))
        return (self.kind, s.temperature, s.top_p)


class Engine:
    """One AdaptedModel with its tokenizer and AdapterBank, and the limits requests must keep.

    `run(jobs)` answers a batch of jobs of one group. With `mixed` (the default when the model
    has `AdaptedModel.routed`, i.e. per-example `adapter_ids`) the batch is one forward or
    `generate` call; without it, one call per adapter group (see `_routed`).
    """

    def __init__(self, am: AdaptedModel, tokenizer: Any, bank: AdapterBank, *,
                 kind: str | None = None, model_name: str = "model",
                 labels: Sequence[str] | None = None, max_input_tokens: int | None = None,
                 max_new_tokens: int = 256, mixed: bool | None = None) -> None:
        self.am, self.tokenizer, self.bank, self.model_name = am.eval(), tokenizer, bank, model_name
        self.kind = kind or ("causal-lm" if am.model.can_generate() else "classification")
        if self.kind not in KINDS:
            raise PeftlabError(f"kind must be one of {KINDS}, got {self.kind!r}")
        config = am.model.config
        # The model's context window, when its config states one: prompt + new tokens must fit.
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.max_input_tokens = max_input_tokens or self.max_positions or DEFAULT_MAX_INPUT_TOKENS
        self.max_new_tokens = max_new_tokens
        self.mixed = hasattr(type(am), "routed") if mixed is None else mixed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(am.model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.labels: list[str] = []
        if self.kind == "classification":
            self.labels = list(labels or (config.id2label[i] for i in range(config.num_labels)))
            if len(self.labels) != config.num_labels:
                raise PeftlabError(f"{len(self.labels)} labels {self.labels} for a head of "
                                   f"{config.num_labels} outputs; give one label per output")
        # Fast tokenizers refuse concurrent use of one instance ("Already borrowed"): request
        # handlers take turns encoding, and the worker decodes with its own copy, so that a long
        # prompt being tokenized never holds up a batch's answers.
        self._tok_lock = threading.Lock()
        self._decoder = copy.deepcopy(tokenizer)
        self._decode_lock = threading.Lock()
        # Only the last position's logits are needed per step: models that can skip the rest
        # (the vocabulary projection of every prompt token) are asked to.
        parameters = inspect.signature(am.model.forward).parameters
        self._last_logits_only = "logits_to_keep" in parameters
        # transformers 5 renames the forward's `past_key_values` to `cache`
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    # ---- tokenising (request handlers) ------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a generate prompt, formatted as training formats it (a user turn of the
        chat template, else prompt + newline: `peftlab.training.chat.prompt_ids`, as `peftlab
        generate`). Takes about a second per million characters: call it off the event loop."""
        with self._tok_lock:
            return prompt_ids(self.tokenizer, prompt)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a text to classify."""
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a chat conversation followed by the assistant header, formatted as
        training formats it (`peftlab.training.chat.conversation_prompt_ids`)."""
        with self._tok_lock:
            return conversation_prompt_ids(self.tokenizer, messages)

    def check_input(self, n_tokens: int, max_tokens: int = 0) -> None:
        """RequestError 413 when the input (plus the new tokens) does not fit the limits."""
        if n_tokens > self.max_input_tokens:
            raise RequestError(413, f"the input is {n_tokens} tokens; this server takes at most "
                                    f"{self.max_input_tokens} (--max-input-tokens)")
        if self.max_positions and n_tokens + max_tokens > self.max_positions:
            raise RequestError(413, f"the prompt ({n_tokens} tokens) plus max_tokens ({max_tokens}) "
                                    f"exceeds the model's context of {self.max_positions} tokens; "
                                    "shorten the prompt or lower max_tokens")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated token ids (special tokens left out). Thread-safe."""
        with self._decode_lock:
            return self._decoder.decode(list(ids), skip_special_tokens=True)

    # ---- one step of the decode loop (scheduler.py) ---------------------------------------------------
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any, adapter_ids: list[str | None]) -> torch.Tensor:
        """The last position's logits (rows, vocabulary) of one forward that extends `cache`
        (a DynamicCache, updated in place) by `input_ids`, row i under adapter `adapter_ids[i]`.
        Call with those adapters in use (`bank.using`) and gradients off."""
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._last_logits_only else {}
        kwargs[self._cache_argument] = cache
        out = self.am(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, adapter_ids=adapter_ids, **kwargs)
        return out.logits[:, -1]

    # ---- running a batch (the worker) -------------------------------------------------------------
    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """The answers to a batch of jobs of one group, in order."""
        with self.bank.using(j.adapter for j in jobs), torch.inference_mode():
            if jobs[0].kind == "generate":
                return self._generate(jobs)
            return self._classify(jobs)

    def _generate(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        ids, mask = self._pad([j.ids for j in jobs], left=True)   # new tokens follow every row
        sampling = jobs[0].sampling
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # One call for the longest request; shorter ones are cut to their own max_tokens below
        # (greedy decoding gives the same first tokens either way).
        outputs = self._routed(self.am.generate, [j.adapter for j in jobs],
                               {"input_ids": ids, "attention_mask": mask},
                               max_new_tokens=max(j.max_tokens for j in jobs),
                               pad_token_id=self.pad_id, **sampling.generate_kwargs())
        width = ids.shape[1]
        return [self._completion(row[width:].tolist(), job) for row, job in zip(outputs, jobs, strict=True)]

    def _completion(self, new: list[int], job: Job) -> dict[str, Any]:
        new = new[: job.max_tokens]
        stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
        if stop is not None:
            new = new[: stop + 1]   # the end-of-sequence token counts, as in a lone generate
        return {"text": self.decode(new), "adapter": job.adapter, "tokens": len(new), "ids": new}

    def _classify(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        ids, mask = self._pad([j.ids for j in jobs], left=False)
        logits = self._routed(lambda **kw: self.am(**kw).logits, [j.adapter for j in jobs],
                              {"input_ids": ids, "attention_mask": mask})
        answers = []
        for row, job in zip(logits, jobs, strict=True):
            if len(self.labels) == 1:   # a regression head (num_labels 1): the score itself
                answers.append({"score": float(row[0]), "adapter": job.adapter})
                continue
            probs = torch.softmax(row.float(), dim=-1).tolist()
            answers.append({"label": self.labels[int(row.argmax())],
                            "probs": dict(zip(self.labels, probs, strict=True)),
                            "adapter": job.adapter})
        return answers

    def _routed(self, call: Callable[..., torch.Tensor], adapter_ids: list[str | None],
                inputs: dict[str, torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
        """The rows of `call(**inputs, **kwargs)` with example i under adapter `adapter_ids[i]`
        (None = the base model). The one place that decides how: one mixed-batch call when the
        model routes per example, else one call per adapter with that adapter active."""
        if self.mixed:
            try:
                return list(call(**inputs, **kwargs, adapter_ids=adapter_ids))
            except CapabilityError:
                # An adapter without a per-example form (prompt / prefix tuning, ...): routing
                # refuses it before anything runs, and its examples go in their own group below.
                pass
        rows: list[torch.Tensor | None] = [None] * len(adapter_ids)
        try:
            for name in dict.fromkeys(adapter_ids):
                index = [i for i, a in enumerate(adapter_ids) if a == name]
                self.am.set_active([] if name is None else [name])
                out = call(**{k: v[index] for k, v in inputs.items()}, **kwargs)
                for i, row in zip(index, out, strict=True):
                    rows[i] = row
        finally:
            self.am.set_active([])
        return rows

    def _pad(self, rows: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded to one width (on the left for generation) and their attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids, mask


def load_engine(model: str, adapters: str | Path | None, *, causal: bool,
                max_adapters: int = 8, labels: Sequence[str] | None = None, num_labels: int = 2,
                max_input_tokens: int | None = None, max_new_tokens: int = 256,
                max_adapter_bytes: int | None = None, quantization: Quantization | None = None) -> Engine:
    """An Engine for a model name (`smollm2`, `minilm`) or local model directory, serving the
    adapters under `adapters`. Classification models get a head of `num_labels` outputs (the
    length of `labels` when given), which each adapter's trained head replaces.
    `max_adapter_bytes`: the largest tensors file the bank loads (None: its default).
    `quantization`: the base loaded quantised by bitsandbytes, as the adapters were trained."""
    from ... import adapt
    from ...assets import load_model

    if causal:
        base, tokenizer = load_model(model, kind="causal-lm", quantization=quantization)
    else:
        base, tokenizer = load_model(model, kind="classification", quantization=quantization,
                                     num_labels=len(labels) if labels else num_labels)
    am = adapt(base)
    bank = AdapterBank(am, adapters, max_adapters=max_adapters, max_adapter_bytes=max_adapter_bytes)
    return Engine(am, tokenizer, bank, kind="causal-lm" if causal else "classification",
                  model_name=model, labels=labels, max_input_tokens=max_input_tokens,
                  max_new_tokens=max_new_tokens)
