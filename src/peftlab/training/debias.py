"""PEFTDebias (Agarwal, Veerubhotla & Bansal, EMNLP 2023): a debiasing "patch" adapter, trained
upstream on counterfactually augmented text and frozen under a downstream task adapter.

    pairs = load_word_pairs()                                  # the shipped gender list
    patch = train_patch(am, "patch", tok, train_rows, pairs, train_config=TrainConfig(steps=300))
    save_patch(am, "runs/patch", "patch", patch.info)          # adapter + debias_patch.json
    # later, on a fresh model:
    load_patch(am, "runs/patch", "patch", axis="gender")
    train_task_on_patch(am, "patch", "task", LoraConfig(modules_to_save=["head"]), task,
                        train_rows, None, TrainConfig(steps=300))
    counterfactual_flip_rate(am, task, test_rows, pairs)      # the bias measure

**Counterfactual data augmentation (CDA).** A word-pair list (`assets/data/gender_pairs.txt`, one
"male female" pair per line) maps every listed word to its counterpart in both directions.
`swap_words` swaps whole words, keeping their case and the punctuation around them. As the
official code does, augmentation keeps only texts holding at least one listed word and emits both
the original and its counterfactual.

**Upstream phase: what the paper does and what we do.** The paper trains the patch (LoRA, a
bottleneck adapter, prefix tuning or sparse fine-tuning) with masked-LM (masking probability
0.15) on the CDA text, through BERT-base's pretrained MLM head, the base frozen. Here the patch
is any peftlab method config (default LoRA) and the objective is one of

* ``"mlm"`` (the paper's): BERT's 80/10/10 masking of 15% of the tokens. A model with its own
  MLM head (``*ForMaskedLM``) uses it; an encoder shipped without one, such as the offline
  all-MiniLM-L6-v2 (a sentence-embedding model: no ``cls.predictions`` weights), gets a new
  BERT-shaped head (dense, GELU, LayerNorm, decoder tied to the frozen input embeddings) that is
  trained with the patch and then discarded: it is scaffolding, not part of the patch.
* ``"invariance"`` (our addition, not the paper's): on each pair (x, cf(x)) the patched model's
  pooled hidden states (the [CLS] state and the token mean) of both texts are pulled towards the
  mean of the *base* model's pooled states of the two, so the pair's representations agree while
  staying close to what the base computed (pulling them together alone could collapse every text
  to one point). `invariance_layers` chooses the last layer or every layer; dropout is off in
  these forwards (its noise is larger than the gap being closed).
* ``"mlm+invariance"``: both, the invariance term weighted by `invariance_weight`.

**Downstream phase.** The paper fully fine-tunes the base model with the patch frozen and
active. Here the base stays frozen too: a task adapter is trained on top of the frozen, active
patch (`train_task_on_patch`), and the patch stays active at inference (the paper's "before"
configuration).

**Bias measure.** The paper evaluates with CrowS-Pairs / StereoSet / SEAT and group-fairness gaps.
Here `counterfactual_flip_rate` measures a classifier directly: on held-out rows holding attribute
words, the fraction whose predicted label changes when the text is swapped, and the mean
absolute change of the positive-class probability.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError, DataError
from ..core.files import commit_files, write_json
from ..core.io import read_json
from ..core.method import MethodConfig
from ..methods.lora import LoraConfig
from .loop import TaskLike, TrainConfig, TrainResult, train
from .tasks import IGNORE

if TYPE_CHECKING:
    from ..core.model import AdaptedModel

__all__ = [
    "OBJECTIVES",
    "PATCH_FILE",
    "MaskedLMHead",
    "PatchConfig",
    "PatchResult",
    "PatchTask",
    "WordPairs",
    "counterfactual_augment",
    "counterfactual_flip_rate",
    "counterfactual_pairs",
    "has_attribute_word",
    "load_patch",
    "load_word_pairs",
    "mask_tokens",
    "save_patch",
    "swap_words",
    "train_patch",
    "train_task_on_patch",
]

OBJECTIVES = ("mlm", "invariance", "mlm+invariance")
PATCH_FILE = "debias_patch.json"     # the patch's axis metadata, beside peftlab.json
PATCH_FORMAT = "peftlab-debias-patch"
DEFAULT_PAIRS = "gender_pairs.txt"   # package data under peftlab/assets/data/
CF_KEY = "counterfactual"            # the swapped text in counterfactual_pairs() rows

# A word: letters, optionally joined by hyphens ("spider-man" is one word, so its "man" stays).
# Digits, underscores and apostrophes end a word, so "he's" swaps its "he".
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


# ---- word pairs -------------------------------------------------------------------------------
class WordPairs(dict):
    """word -> counterpart, both directions, lower case; `source` and `sha256` name the list."""

    def __init__(self, mapping: Mapping[str, str], *, source: str, sha256: str, axis: str) -> None:
        super().__init__(mapping)
        self.source = source
        self.sha256 = sha256
        self.axis = axis

    def describe(self) -> dict[str, Any]:
        """The list's identity, for patch metadata."""
        return {"source": self.source, "sha256": self.sha256, "axis": self.axis, "words": len(self)}


def load_word_pairs(path: str | os.PathLike[str] | None = None, *, axis: str = "gender") -> WordPairs:
    """The word-pair list at `path` (default: the shipped gender list) as a two-way mapping.

    One pair per line, ``male female`` (two words separated by whitespace); ``#`` starts a
    comment. The first line a word appears on decides its counterpart, so ambiguous words are
    resolved by line order (the shipped list maps "her" to "his", not "him"). A malformed line
    raises DataError naming the file and the line."""
    if path is None:
        resource = importlib.resources.files("peftlab.assets").joinpath("data", DEFAULT_PAIRS)
        raw, source = resource.read_bytes(), f"peftlab:data/{DEFAULT_PAIRS}"
    else:
        source = os.fspath(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"{source}: cannot read the word-pair file ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{source}:{line}: not UTF-8 text; save the word-pair file as UTF-8") from e
    mapping = _parse_pairs(text, source)
    return WordPairs(mapping, source=source, sha256=hashlib.sha256(raw).hexdigest(), axis=axis)


def _parse_pairs(text: str, source: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise DataError(f"{source}:{number}: expected two words 'male female', got "
                            f"{len(words)}: {line.strip()!r}")
        a, b = (w.lower() for w in words)
        for w in (a, b):
            if not _WORD.fullmatch(w):
                raise DataError(f"{source}:{number}: {w!r} is not a word (letters, optionally "
                                "joined by hyphens); write one word per side")
        if a == b:
            raise DataError(f"{source}:{number}: {a!r} is paired with itself; a pair needs two "
                            "different words")
        mapping.setdefault(a, b)
        mapping.setdefault(b, a)
    if not mapping:
        raise DataError(f"{source}:1: no word pairs (only blank lines and comments); write one "
                        "'male female' pair per line")
    return mapping


def _match_case(word: str, like: str) -> str:
    """`word` in the case pattern of `like`: HE -> SHE, He -> She, he -> she."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_words(text: str, pairs: Mapping[str, str]) -> str:
    """`text` with every listed word replaced by its counterpart, keeping case and punctuation.
    Only whole words are swapped: "heat" and "Mrs." keep their letters unless listed."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        other = pairs.get(word.lower())
        return word if other is None else _match_case(other, word)
    return _WORD.sub(swap, text)


def has_attribute_word(text: str, pairs: Mapping[str, str]) -> bool:
    return any(m.group(0).lower() in pairs for m in _WORD.finditer(text))


def _text_of(row: Mapping[str, Any], index: int, text_key: str) -> str:
    text = row.get(text_key) if isinstance(row, Mapping) else None
    if not isinstance(text, str):
        raise DataError(f"row {index} has no string {text_key!r} field (keys: "
                        f"{sorted(row) if isinstance(row, Mapping) else type(row).__name__})")
    return text


def counterfactual_pairs(rows: Sequence[Mapping[str, Any]], pairs: Mapping[str, str],
                         text_key: str = "text") -> list[dict[str, Any]]:
    """The rows holding at least one attribute word, each with its swapped text added under
    "counterfactual" (other fields kept): the unit the patch objectives and the flip rate use."""
    out = []
    for i, row in enumerate(rows):
        text = _text_of(row, i, text_key)
        if has_attribute_word(text, pairs):
            out.append({**row, CF_KEY: swap_words(text, pairs)})
    return out


def counterfactual_augment(rows: Sequence[Mapping[str, Any]], pairs: Mapping[str, str],
                           text_key: str = "text") -> list[dict[str, Any]]:
    """Two-sided CDA as the official code does it: rows without an attribute word are dropped,
    every other row is emitted twice, as it is and then with its text swapped."""
    out = []
    for i, row in enumerate(rows):
        text = _text_of(row, i, text_key)
        if has_attribute_word(text, pairs):
            out += [dict(row), {**row, text_key: swap_words(text, pairs)}]
    return out


# ---- masked-LM --------------------------------------------------------------------------------
def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, *, mask_token_id: int,
                vocab_size: int, mask_prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is picked with probability `mask_prob`; a picked
    token becomes [MASK] (80%), a random token (10%) or stays (10%). Returns (inputs, labels),
    labels = the original id at picked positions and -100 elsewhere. At least one token is picked
    per batch (when any is maskable), so the loss is always defined."""
    picked = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & maskable  # (B, T)
    if not picked.any() and maskable.any():
        candidates = maskable.flatten().nonzero().squeeze(1)
        choice = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        picked.view(-1)[choice] = True
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[picked & (roll < 0.8)] = mask_token_id
    randomised = picked & (roll >= 0.8) & (roll < 0.9)
    inputs[randomised] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomised]
    return inputs, labels


class MaskedLMHead(nn.Module):
    """BERT's MLM head shape for an encoder shipped without one: dense -> GELU -> LayerNorm ->
    decoder tied to the (frozen) input embeddings, plus a bias. Trained with the patch as
    scaffolding and discarded afterwards."""

    def __init__(self, embeddings: nn.Embedding, hidden_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        vocab, dim = embeddings.weight.shape
        if dim != hidden_size:
            raise ConfigError(f"the input embeddings are {dim}-wide but the hidden states "
                              f"{hidden_size}-wide; a tied MLM decoder needs them equal")
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.__dict__["embeddings"] = embeddings   # a plain reference: the base's own weight

    @classmethod
    def for_model(cls, model: nn.Module) -> MaskedLMHead:
        """A head for `model`'s input embeddings and hidden size, on their device and dtype."""
        emb = model.get_input_embeddings()
        config = model.config
        head = cls(emb, config.hidden_size, getattr(config, "layer_norm_eps", 1e-12))
        return head.to(device=emb.weight.device, dtype=emb.weight.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(hidden)))                          # (N, H)
        return F.linear(h, self.embeddings.weight, self.bias)              # (N, vocab)


# ---- the upstream objective ---------------------------------------------------------------------
@dataclass
class PatchConfig:
    """How the patch is trained: the objective (see the module docstring) and its settings."""

    axis: str = "gender"
    objective: str = "mlm"
    mask_prob: float = 0.15
    invariance_weight: float = 1.0
    invariance_layers: str = "last"     # "last": the final hidden states; "all": every layer's
    max_length: int = 128

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"PatchConfig.objective {self.objective!r} is unknown; choose one of "
                              f"{OBJECTIVES}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"PatchConfig.mask_prob must be in (0, 1), got {self.mask_prob!r} "
                              "(the paper uses 0.15)")
        if not (self.invariance_weight > 0 and math.isfinite(self.invariance_weight)):
            raise ConfigError(f"PatchConfig.invariance_weight must be a finite number > 0, got "
                              f"{self.invariance_weight!r}")
        if self.invariance_layers not in ("last", "all"):
            raise ConfigError(f"PatchConfig.invariance_layers must be 'last' or 'all', got "
                              f"{self.invariance_layers!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"PatchConfig.max_length must be an integer >= 2, got {self.max_length!r}")

    @property
    def uses_mlm(self) -> bool:
        return "mlm" in self.objective

    @property
    def uses_invariance(self) -> bool:
        return "invariance" in self.objective


def _adapted(model: nn.Module) -> AdaptedModel:
    """The AdaptedModel behind what the training loop passes (itself, or its DDP wrapper)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _own_mlm_head(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForMaskedLM")


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2H): the first token's state ([CLS], what BERT classifiers read) and the mean over
    the real tokens (what sentence-embedding models read)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)                              # (B, T, 1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)           # (B, H)
    return torch.cat([hidden[:, 0], mean], dim=-1)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class PatchTask:
    """The upstream objective as a task for `peftlab.train` over counterfactual pair rows
    ({"text": x, "counterfactual": cf(x)}, see `counterfactual_pairs`). A batch of B pairs is
    2B texts: the originals and their counterfactuals, as two-sided CDA emits them."""

    tokenizer: Any
    config: PatchConfig = field(default_factory=PatchConfig)
    head: MaskedLMHead | None = None      # None: the model's own MLM head (or no MLM objective)
    metric: str = "loss"
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        self.config.validate()
        if self.config.uses_mlm and self.tokenizer.mask_token_id is None:
            raise ConfigError("the masked-LM objective needs a tokenizer with a mask token; this "
                              "one has none (use objective='invariance')")

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in rows] + [r[CF_KEY] for r in rows]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        batch = dict(enc)
        if self.config.uses_mlm:
            maskable = batch["attention_mask"].bool() & ~special
            batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
                batch["input_ids"], maskable, mask_token_id=self.tokenizer.mask_token_id,
                vocab_size=len(self.tokenizer), mask_prob=self.config.mask_prob)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if not k.startswith("mlm_")}
        total = None
        if self.config.uses_mlm:
            total = self._mlm_loss(model, inputs, batch["mlm_input_ids"], batch["mlm_labels"])
        if self.config.uses_invariance:
            term = self.config.invariance_weight * self._invariance_loss(model, inputs)
            total = term if total is None else total + term
        return total

    def _mlm_loss(self, model: nn.Module, inputs: dict, masked_ids: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        inputs = {**inputs, "input_ids": masked_ids}
        if self.head is None:
            return model(**inputs, labels=labels).loss
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]   # (2B, T, H)
        if hidden.shape[:2] != labels.shape:
            raise ConfigError(f"the patch changes the sequence length ({labels.shape[1]} -> "
                              f"{hidden.shape[1]} positions); the masked-LM objective needs a "
                              "method that keeps it (not prompt tuning)")
        picked = labels != IGNORE                                                # (2B, T)
        logits = self.head(hidden[picked])                                       # (N, vocab)
        return F.cross_entropy(logits.float(), labels[picked])

    def _invariance_loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """Relative squared distance of each text's pooled states to the pair's base-model mean,
        averaged over the chosen layers. Dropout is off in both forwards: its noise would
        otherwise dominate the small distance being minimised."""
        mask = inputs["attention_mask"]
        am = _adapted(model)
        with _eval_mode(am):
            states = model(**inputs, output_hidden_states=True).hidden_states      # (2B, T, H) each
            with torch.no_grad(), am.disabled():
                base = am(**inputs, output_hidden_states=True).hidden_states
        layers = range(1, len(states)) if self.config.invariance_layers == "all" else [len(states) - 1]
        half = mask.shape[0] // 2
        total = 0.0
        for i in layers:
            pooled = _pooled(states[i], mask).float()                           # (2B, 2H)
            target = _pooled(base[i], mask).float()
            target = 0.5 * (target[:half] + target[half:])                      # (B, 2H)
            target = torch.cat([target, target])                                # (2B, 2H)
            err = (pooled - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
            total = total + err.mean()
        return total / len(layers)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], batch_size: int) -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            total += float(self.loss(model, self.collate(chunk))) * len(chunk)
            count += len(chunk)
        return {"loss": total / max(count, 1)}


# ---- the two phases ---------------------------------------------------------------------------
@dataclass
class PatchResult:
    train: TrainResult
    pairs: int                       # counterfactual pairs (texts with attribute words) trained on
    info: dict[str, Any]             # the metadata save_patch writes beside the adapter


@contextmanager
def _scaffold(am: AdaptedModel, head: MaskedLMHead | None) -> Iterator[None]:
    """Register the MLM head on `am` for the duration, trainable, so the training loop (which
    optimises every parameter that requires gradients) trains it with the patch."""
    if head is None:
        yield
        return
    am.add_module("debias_mlm_head", head.requires_grad_(True))
    try:
        yield
    finally:
        del am._modules["debias_mlm_head"]


def _as_word_pairs(pairs: Mapping[str, str], axis: str) -> WordPairs:
    """`pairs` with an identity for the patch metadata (an in-memory dict gets a content hash)."""
    if isinstance(pairs, WordPairs):
        if pairs.axis != axis:
            raise ConfigError(f"the word pairs {pairs.source} are for the {pairs.axis!r} axis but "
                              f"the patch is for {axis!r}; load the list with axis={axis!r}")
        return pairs
    text = "\n".join(f"{a} {b}" for a, b in sorted(pairs.items()))
    return WordPairs(pairs, source="in-memory", sha256=hashlib.sha256(text.encode()).hexdigest(),
                     axis=axis)


def train_patch(am: AdaptedModel, name: str, tokenizer: Any, rows: Sequence[Mapping[str, Any]],
                pairs: Mapping[str, str], *, method_config: MethodConfig | None = None,
                patch: PatchConfig | None = None, train_config: TrainConfig | None = None,
                text_key: str = "text", eval_rows: Sequence[Mapping[str, Any]] | None = None
                ) -> PatchResult:
    """Upstream phase: add adapter `name` (default LoRA) to `am` and train it on the CDA pairs
    of `rows` with `patch.objective`; it is left active and frozen. Rows without an attribute
    word are dropped (as in the paper)."""
    patch = patch or PatchConfig()
    train_config = train_config or TrainConfig()
    patch.validate()
    pairs = _as_word_pairs(pairs, patch.axis)
    pair_rows = [{"text": r[text_key], CF_KEY: r[CF_KEY]}
                 for r in counterfactual_pairs(rows, pairs, text_key)]
    if not pair_rows:
        raise DataError(f"none of the {len(rows)} rows holds a word of the pair list "
                        f"{pairs.source}; CDA keeps only those, so there is nothing to train on")
    held = [{"text": r[text_key], CF_KEY: r[CF_KEY]}
            for r in counterfactual_pairs(eval_rows, pairs, text_key)] if eval_rows else None
    head = MaskedLMHead.for_model(am.model) if patch.uses_mlm and not _own_mlm_head(am.model) else None
    task = PatchTask(tokenizer, patch, head)
    am.add_adapter(name, method_config or LoraConfig())
    am.set_active([name])
    am.set_trainable(name)
    try:
        with _scaffold(am, head):
            result = train(am, name, task, pair_rows, held, train_config)
    finally:
        am.set_trainable(None)
    info = {
        "format": PATCH_FORMAT, "format_version": 1,
        "paper": "PEFTDebias (Agarwal, Veerubhotla & Bansal, EMNLP 2023)",
        "axis": patch.axis, "word_pairs": pairs.describe(), "patch": asdict(patch),
        "mlm_head": ("own" if _own_mlm_head(am.model) else "scaffold") if patch.uses_mlm else None,
        "cda_pairs": len(pair_rows), "steps": result.steps_done, "lr": train_config.lr,
        "batch_size": train_config.batch_size, "seed": train_config.seed,
        "final_loss": sum(result.losses[-10:]) / max(len(result.losses[-10:]), 1),
    }
    return PatchResult(result, len(pair_rows), info)


def save_patch(am: AdaptedModel, directory: str | os.PathLike[str], name: str,
               info: Mapping[str, Any]) -> Path:
    """Save the patch as a normal peftlab adapter plus `debias_patch.json` (axis, word-pair list
    and its hash, objective, training settings: `PatchResult.info`)."""
    directory = am.save_adapter(directory, name)
    commit_files(Path(directory), {PATCH_FILE: write_json(dict(info))})
    return Path(directory)


def load_patch(am: AdaptedModel, directory: str | os.PathLike[str], name: str, *,
               axis: str | None = None, pairs: WordPairs | None = None) -> dict[str, Any]:
    """Load a saved patch as adapter `name`, frozen and inactive, and return its metadata.
    `axis` / `pairs`, when given, must match what the patch was trained for."""
    directory = Path(directory)
    info = read_json(directory / PATCH_FILE)
    if info.get("format") != PATCH_FORMAT:
        raise CheckpointError(f"{directory / PATCH_FILE} is not a debias patch description; "
                              "save patches with peftlab.save_patch")
    if axis is not None and info.get("axis") != axis:
        raise CheckpointError(f"{directory} is a patch for the {info.get('axis')!r} axis, not "
                              f"{axis!r}; train a patch for {axis!r}")
    trained = info.get("word_pairs", {})
    if pairs is not None and trained.get("sha256") != pairs.sha256:
        raise CheckpointError(f"{directory} was trained with the word pairs {trained.get('source')} "
                              f"(sha256 {str(trained.get('sha256'))[:12]}…), not {pairs.source} "
                              f"(sha256 {pairs.sha256[:12]}…); use the same list or retrain")
    am.load_adapter(directory, name, trainable=False)
    return info


def train_task_on_patch(am: AdaptedModel, patch: str, task_adapter: str, task_config: MethodConfig,
                        task: TaskLike, train_rows: list[dict], eval_rows: list[dict] | None,
                        train_config: TrainConfig) -> TrainResult:
    """Downstream phase: add `task_adapter` and train it with the patch active but frozen (the
    paper fine-tunes the whole base here; we keep the base frozen and train an adapter). Both
    stay active afterwards, the patch first."""
    am.adapter(patch)   # AdapterError naming the adapters when the patch is missing
    am.add_adapter(task_adapter, task_config)
    am.set_active([patch, task_adapter])
    am.set_trainable(task_adapter)   # freezes the patch: only the task adapter gets gradients
    return train(am, task_adapter, task, train_rows, eval_rows, train_config)


# ---- bias measure -----------------------------------------------------------------------------
@torch.no_grad()
def _class_probs(model: nn.Module, task: Any, rows: list[dict], batch_size: int) -> torch.Tensor:
    """(N, C) class probabilities of the rows, in order."""
    out = []
    for i in range(0, len(rows), batch_size):
        batch = task.collate(rows[i:i + batch_size])
        batch.pop("labels", None)
        out.append(model(**batch).logits.float().softmax(-1))
    return torch.cat(out)


def counterfactual_flip_rate(am: nn.Module, task: Any, rows: Sequence[Mapping[str, Any]],
                             pairs: Mapping[str, str], batch_size: int = 64, *,
                             text_key: str = "text", positive_label: int = 1) -> dict[str, float]:
    """How much a classifier's predictions depend on the attribute words, on the rows holding
    any: the fraction whose predicted label changes when the text is swapped (`flip_rate`,
    `flipped` of `examples`) and the mean |Δ p(positive_label)| (`mean_abs_dprob`). `task`
    turns rows into model inputs (`collate`, e.g. `ClassificationTask`); the model runs in eval
    mode with its current adapters."""
    cf = counterfactual_pairs(rows, pairs, text_key)
    if not cf:
        raise DataError(f"none of the {len(rows)} rows holds a word of the pair list; the flip "
                        "rate needs rows with attribute words")
    swapped = [{**r, text_key: r[CF_KEY]} for r in cf]
    with _eval_mode(am):
        p = _class_probs(am, task, cf, batch_size)                  # (N, C)
        q = _class_probs(am, task, swapped, batch_size)             # (N, C)
    if not 0 <= positive_label < p.shape[1]:
        raise ConfigError(f"positive_label {positive_label} is not a class of this "
                          f"{p.shape[1]}-class model")
    flipped = int((p.argmax(-1) != q.argmax(-1)).sum())
    return {"examples": len(cf), "flipped": flipped, "flip_rate": flipped / len(cf),
            "mean_abs_dprob": float((p[:, positive_label] - q[:, positive_label]).abs().mean()),
            "skipped": len(rows) - len(cf)}
