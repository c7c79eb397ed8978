"""Errors peftlab raises. Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftlabError(ValueError):
    """Base class of every error peftlab raises on bad input."""


class TargetNotFoundError(PeftlabError):
    """A target (role, name, glob or regex) matched no module of the model."""


class AdapterError(PeftlabError):
    """An adapter name is missing, duplicated, or in the wrong state for the operation."""


class ConfigError(PeftlabError):
    """A method config holds an invalid value."""


class CheckpointError(PeftlabError):
    """A checkpoint directory is missing, corrupted, or does not fit the model."""


class MissingAssetError(PeftlabError):
    """An asset package (or a file it should hold) is not installed; the message has the command."""


class DataError(PeftlabError):
    """A dataset file is unreadable or malformed, or a dataset name is unknown."""


class CapabilityError(PeftlabError):
    """The method does not declare the capability an operation needs."""


class TrainingError(PeftlabError):
    """Training cannot go on: the loss or the adapter stopped being finite."""


class PeftlabWarning(UserWarning):
    """Base class of every warning peftlab gives: it went ahead, but something looks wrong."""


class TargetWarning(PeftlabWarning):
    """Targets resolved, but they leave out sites the user likely meant (e.g. `all-linear` on an
    MoE model, whose expert weights are parameters, not Linear layers); the message names them."""


class CheckpointWarning(PeftlabWarning):
    """A checkpoint loaded, but it was made for another base model or holds NaN/inf values;
    `load_adapter(..., strict=True)` refuses such a checkpoint with a CheckpointError instead."""


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like `word`, best first (for "did you mean" hints)."""
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if len(found) < n:  # substring hits catch 'q' -> 'q_proj' that difflib scores low
        found += [c for c in pool if word.lower() in c.lower() and c not in found][: n - len(found)]
    return found
