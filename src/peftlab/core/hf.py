"""What transformers' `Trainer`, trl's trainers and peft-minded code expect of a model, for
`AdaptedModel` (its base class `HFCompat`; the façade's own methods stay in model.py).

* **The forward's signature.** `Trainer` keeps the dataset columns that the model's forward names
  (`inspect.signature(model.forward)`), and our forward is `(*args, adapter_ids=None, **kwargs)`.
  `signed_forward` makes `am.forward` carry the wrapped model's parameters plus `adapter_ids`:
  a per-instance copy of the function (it holds no reference to the instance, so no reference
  cycle keeps a wrapper and its model alive) with `__signature__` set, bound on each access.
* **Names `PreTrainedModel` also has** keep transformers' meaning, since `AdaptedModel` forwards
  unknown attributes to the wrapped model and code written for transformers models calls them:
  `num_parameters(only_trainable=, exclude_embeddings=)` counts the whole model (an adapter's
  count is `count_parameters(name)`), `save_pretrained` writes the adapters (never the base or
  wrapper keys, which a forwarded call wrote), `push_to_hub` refuses (peftlab works offline),
  gradient (activation) checkpointing reaches the wrapped model and turns input gradients on,
  and `base_model` (the backbone, which trl's fused LM head runs itself) goes through the
  active prompt/prefix adapters.
* **`restore_pretrained`**: the inverse of `save_pretrained` into a model that already holds the
  adapters, values copied in place (an optimizer's references stay valid): what resuming a
  `Trainer` checkpoint needs (interop/trainer.py).
* **`probe_inputs`**: the smallest inputs a model's forward takes, built from its config, for
  the probe forward that finds which layers run (core/probe.py).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .attach import lookup, name_list
from .errors import AdapterError, CapabilityError, CheckpointError
from .layer import AdaptedLayer, ModuleCopies
from .quantised import parameter_count

if TYPE_CHECKING:
    from .model import AdaptedModel

# ---- the forward's signature --------------------------------------------------------------------
class signed_forward:   # lower case: a decorator, like `property`
    """A `forward` whose bound form carries the wrapped model's signature (see the module
    docstring). The class attribute is the plain function, so `functools.wraps(type(m).forward)`
    and `find_labels(type(m))` see what they always saw; an instance's `forward` assigned by
    others (trl's fused LM head) takes precedence as for any method."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, cls: type | None = None) -> Callable:
        if obj is None:
            return self.fn
        if torch.compiler.is_compiling():   # dynamo cannot trace types.MethodType; same function
            return functools.partial(self.fn, obj)
        return types.MethodType(obj.__dict__.get("_signed_forward", self.fn), obj)

    def sign(self, obj: Any, wrapped: Callable) -> None:
        """Give `obj`'s bound forward the signature of `wrapped` plus `adapter_ids`."""
        fn = self.fn
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
        copy.__signature__ = _signature_with_ids(fn, wrapped)
        obj.__dict__["_signed_forward"] = copy


def _signature_with_ids(fn: Callable, wrapped: Callable) -> inspect.Signature:
    """(self, <wrapped's parameters>, *, adapter_ids=None, [**kwargs]): keyword-only parameters
    must precede **kwargs, so adapter_ids goes right before it."""
    own = inspect.signature(fn)
    try:
        params = list(inspect.signature(wrapped).parameters.values())
        if "adapter_ids" not in {p.name for p in params}:
            at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
            params.insert(at, own.parameters["adapter_ids"])
        return own.replace(parameters=[own.parameters["self"], *params])
    except (TypeError, ValueError):   # no signature (a C callable), or one `self` cannot lead
        return own


# ---- the mixin ------------------------------------------------------------------------------------
class HFCompat:
    """The transformers-facing methods of `AdaptedModel` (see the module docstring)."""

    model: nn.Module
    adapters: dict
    hooks: nn.ModuleDict

    # ---- parameter counts ---------------------------------------------------------------------
    def count_parameters(self, name: str) -> int:
        """Parameters adapter `name` adds (its deltas and modules_to_save copies)."""
        return sum(p.numel() for p in lookup(self.adapters, name).parameters())

    def num_parameters(self, only_trainable: bool | str = False, exclude_embeddings: bool = False) -> int:
        """As transformers' `PreTrainedModel.num_parameters`: every parameter of the model with
        its adapters (`only_trainable`: those with gradients; `exclude_embeddings`: without the
        nn.Embedding weights). A name as the first argument is the former adapter count, kept
        for one release: use `count_parameters(name)`."""
        if isinstance(only_trainable, str):
            warnings.warn("AdaptedModel.num_parameters(name) is renamed count_parameters(name); "
                          "num_parameters() now counts the whole model as in transformers",
                          DeprecationWarning, stacklevel=2)
            return self.count_parameters(only_trainable)
        named = self.named_parameters()  # type: ignore[attr-defined]
        skip = ({f"{path}.weight" for path, m in self.named_modules()  # type: ignore[attr-defined]
                 if isinstance(m, nn.Embedding)} if exclude_embeddings else set())
        return sum(parameter_count(p) for n, p in named
                   if n not in skip and (p.requires_grad or not only_trainable))

    # ---- the backbone ---------------------------------------------------------------------------
    @property
    def base_model(self) -> Any:
        """The wrapped transformers model's backbone (its `base_model`), run through the active
        prompt/prefix adapters: for code that calls the backbone and applies the head itself, as
        trl's fused LM head does (SFTTrainer replaces `am.forward` by one that calls
        `am.base_model(...)` and multiplies by `am.get_output_embeddings().weight`; as for any
        model it takes there, the first input token is no target, while `am(labels=...)` with a
        prompt adapter predicts it from the last virtual token, as peft does). Refused
        (CapabilityError) while an adapter sits on the output head: that code would ignore it."""
        inner = self.model
        backbone = inner.base_model        # AttributeError (not a transformers model) as before
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if isinstance(head, (AdaptedLayer, ModuleCopies)):
            raise CapabilityError("an adapter on the output head is ignored by code that runs the "
                                  "backbone and the head's weight itself (trl's fused LM head, "
                                  "SFTTrainer): target other modules, or train with transformers' "
                                  "Trainer or peftlab.train")
        hooks = self._active_hooks()  # type: ignore[attr-defined]
        return _Backbone(self, backbone, hooks) if hooks else backbone  # type: ignore[arg-type]

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `resize_token_embeddings` of the wrapped model; refused while an adapter
        sits on the input embeddings or the output head: transformers cannot resize a wrapped
        module, and would fail after resizing the other one."""
        inner = self.model
        adapted = [name for name, get in (("input embeddings", "get_input_embeddings"),
                                          ("output head", "get_output_embeddings"))
                   if hasattr(inner, get) and isinstance(getattr(inner, get)(), (AdaptedLayer, ModuleCopies))]
        if adapted:
            raise CapabilityError(f"cannot resize the token embeddings while an adapter sits on the "
                                  f"{' and the '.join(adapted)}: resize the base model before adding "
                                  "adapters (or delete those adapters first)")
        return inner.resize_token_embeddings(*args, **kwargs)

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, *, selected_adapters: Sequence[str] | None = None,
                        is_main_process: bool = True, state_dict: dict | None = None,
                        safe_serialization: bool = True, push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write the adapters (never the base model) as `save_adapter` does: one adapter into
        `save_directory` itself; with several, the first active one (else the first added) there
        and each other in the subfolder named after it, as peft lays out its adapters. Each
        folder is switched in atomically on its own. Returns `save_directory`.

        Accepts what `Trainer` and transformers' callers pass: `is_main_process=False` writes
        nothing; `safe_serialization` is moot (always safetensors); sharding and variant options
        (`max_shard_size`, `variant`, ...) do not apply to adapter files and are ignored. A
        `state_dict` (gathered by DeepSpeed ZeRO-3 or FSDP) is refused: the adapters are saved
        from the live model. `push_to_hub=True` is refused (see `push_to_hub`)."""
        if push_to_hub:
            self.push_to_hub()
        if state_dict is not None:
            raise CapabilityError("save_pretrained(state_dict=...) is not supported: peftlab saves "
                                  "the adapters from the live model (so ZeRO-3 / FSDP sharded "
                                  "training cannot save an AdaptedModel); call save_pretrained(dir)")
        layout = saved_layout(self, selected_adapters)    # checks every name before writing
        directory = Path(save_directory)
        if is_main_process:
            for name, sub in layout.items():
                self.save_adapter(directory / sub, name)  # type: ignore[attr-defined]
        return directory

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Refused: peftlab never talks to a hub. `save_pretrained(dir)` writes the folder (a peft
        adapter where the method has a peft form); upload it with your own tools."""
        raise CapabilityError("push_to_hub is not supported: peftlab works offline. Save with "
                              "am.save_pretrained(dir) and upload that folder yourself "
                              "(e.g. huggingface_hub's upload_folder)")

    # ---- gradient (activation) checkpointing ------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """The wrapped model's activation checkpointing, with gradients for the input embeddings'
        output (as peft does): reentrant checkpointing of a frozen base gives the adapters inside a
        checkpointed block no gradient unless the block's input requires one. Refused for a model
        that has no checkpointing, and while a prefix adapter is installed on a model whose
        checkpointed layers cannot keep the attention cache that carries the prefix (before
        transformers' `_can_checkpoint_with_cache`; prefix_tuning.py passes a cache they only read)."""
        inner = self.model
        enable = getattr(inner, "activation_checkpointing_enable", None)
        if enable is None:
            raise CapabilityError(f"{type(inner).__name__} has no activation_checkpointing_enable: "
                                  "gradient checkpointing needs a transformers model")
        refuse_cache_hooks(self)
        kwargs: dict[str, Any] = {"activation_checkpointing_kwargs": activation_checkpointing_kwargs}
        if every_n_layers != 1 or offload:
            kwargs.update(every_n_layers=every_n_layers, offload=offload)
        enable(**kwargs)
        self.enable_input_require_grads()     # (transformers does it itself for text models)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      **kwargs: Any) -> None:
        """transformers' older name of `activation_checkpointing_enable` (peft and trl call it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Turn the wrapped model's checkpointing off and the input-gradient hooks with it."""
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        if disable is not None:
            disable()
        self.disable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        """transformers' older name of `activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require gradients (a forward hook), so gradients reach
        adapters behind frozen layers under reentrant checkpointing."""
        inner = self.model
        if getattr(inner, "_require_grads_hooks", None):   # on already: a second set would leak
            return
        if hasattr(inner, "enable_input_require_grads"):
            inner.enable_input_require_grads()
            return
        embeddings = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        if embeddings is None:
            raise CapabilityError(f"{type(inner).__name__} has no input embeddings to give gradients")
        inner.__dict__["_require_grads_hooks"] = [   # where transformers keeps its own
            embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_(True))]

    def disable_input_require_grads(self) -> None:
        """Remove the hooks `enable_input_require_grads` added."""
        inner = self.model
        if hasattr(inner, "disable_input_require_grads"):
            inner.disable_input_require_grads()
            return
        for hook in inner.__dict__.pop("_require_grads_hooks", None) or ():
            hook.remove()


class _Backbone:
    """`am.base_model` while prompt/prefix adapters are active: the backbone called with the
    inputs the adapters add, their positions trimmed from its output (hook.finish)."""

    def __init__(self, am: AdaptedModel, backbone: nn.Module, hooks: Sequence[Any]) -> None:
        self.am, self.backbone, self.hooks = am, backbone, hooks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.am._as_kwargs(args, kwargs, "the backbone")
        try:
            for hook in self.hooks:
                kwargs = hook.prepare(self.am.model, kwargs)
            out = self.backbone(**kwargs)
        finally:
            for hook in self.hooks:
                hook.release(self.am.model)
        for hook in reversed(self.hooks):
            out = hook.finish(out, kwargs)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backbone, name)


def cache_keeping_layers(model: nn.Module) -> list[nn.Module]:
    """The gradient-checkpointed layers of a transformers model that can be told to keep a cache
    they only read (`_can_checkpoint_with_cache`, transformers 5.2x); otherwise they replace it
    by None. Empty for older versions and other models."""
    return [m for m in model.modules() if hasattr(type(m), "_can_checkpoint_with_cache")]


def refuse_cache_hooks(am: AdaptedModel) -> None:
    """CapabilityError while an installed adapter passes the attention cache (prefix tuning) and
    the model's checkpointed layers cannot keep it: they replace the cache by None, so the prefix
    would be ignored."""
    prefixed = [name for name, hook in am.hooks.items() if getattr(hook, "uses_cache", False)]
    if prefixed and not cache_keeping_layers(am.model):
        raise CapabilityError(f"gradient checkpointing cannot train prefix adapters {prefixed}: "
                              "transformers' checkpointed layers drop the attention cache that "
                              "carries the prefix. Train them without gradient checkpointing")


def saved_layout(am: AdaptedModel, selected: Sequence[str] | None) -> dict[str, str]:
    """Adapter name -> its folder relative to the save directory ('' for the directory itself):
    the first active adapter (else the first added) at the root, the others in subfolders."""
    names = list(name_list(selected)) if selected is not None else list(am.adapters)
    for n in names:
        lookup(am.adapters, n)
    if not names:
        raise AdapterError("save_pretrained: the model holds no adapter to save (add or load one "
                           "first); peftlab never writes the base model's weights")
    root = next((n for n in am.state.active if n in names), names[0])
    return {root: "", **{n: n for n in names if n != root}}


@torch.no_grad()
def restore_pretrained(am: AdaptedModel, directory: str | Path) -> None:
    """Copy the adapter values `save_pretrained(directory)` wrote into the adapters `am` already
    holds, in place (the same parameter objects, so an optimizer built on them stays valid).
    Every folder is loaded and checked (through `load_adapter`, into temporary adapters) before
    any value is copied: a missing folder or a tensor that does not fit changes nothing."""
    directory = Path(directory)
    layout = saved_layout(am, None)
    merged = [n for n, a in am.adapters.items() if a.merged]
    if merged:
        raise AdapterError(f"adapters {merged} are merged into the base weights, which restoring "
                           "their values would not update: unmerge them first")
    loaded: list[str] = []
    try:
        pairs = []
        for name, sub in layout.items():
            temp = f"{name}_restoring"
            while temp in am.adapters:
                temp += "_"
            source = directory / sub
            if not source.is_dir():
                raise CheckpointError(f"{source} does not exist: {directory} holds no saved "
                                      f"adapter {name!r} (save_pretrained writes one folder per "
                                      "adapter; was it saved from a model with these adapters?)")
            am.load_adapter(source, temp)
            loaded.append(temp)
            pairs.append((am.adapter_tensors(name), am.adapter_tensors(temp), source))
        for live, saved, source in pairs:
            if live.keys() != saved.keys() or any(live[k].shape != saved[k].shape for k in live):
                raise CheckpointError(f"{source} holds another adapter shape than the model's "
                                      f"(tensors {sorted(set(live) ^ set(saved))[:3] or 'of other shapes'})")
        for live, saved, _ in pairs:
            for key, t in live.items():
                t.copy_(saved[key])
    finally:
        for temp in loaded:
            am.delete_adapter(temp)


def contiguous_head_input(model: nn.Module):
    """Make the output head's (B, T, d) input contiguous when it is not (the hook's handle; None: no Linear head).

    torch's matmul runs a Linear on a (B, T, d) input as one (B·T, d) GEMM only when the input
    folds without a copy or the weight requires grad; a frozen weight with a strided input is
    instead expanded to (B, d, vocab) and copied. transformers hands the head the last position
    of the prompt (`hidden[:, -1:]`, strided), so freezing the base made SmolLM2's prefill copy a
    (16, 576, 49152) weight: 3.2× the whole generate time of the unfrozen model (bf16, CPU); the
    contiguous copy of one position per row costs nothing next to that."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None

    def contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
            return (x.contiguous(), *args[1:])
        return None

    return head.register_forward_pre_hook(contiguous_input)


# ---- probe inputs ---------------------------------------------------------------------------------
_PROBE_TOKENS = 1     # every layer runs on one token; more only costs time (core/probe.py)
# Multimodal configs whose text must hold image placeholders for the vision tower to run: a
# text-only probe would miss the tower, so they are checked at their first real forward instead.
_PLACEHOLDER_KEYS = ("image_token_id", "image_token_index", "video_token_id", "audio_token_id")


def probe_inputs(model: nn.Module) -> dict[str, Any] | None:
    """The smallest inputs a forward of `model` takes, from its config: one example of a couple
    of tokens (`input_ids`; `decoder_input_ids` for encoder-decoders), Whisper-style log-mel
    `input_features`, or `pixel_values` for vision models (CLIP gets both text and image).
    None when it cannot tell what the forward needs (no config, a required argument it does not
    know, image placeholders in the text): the caller then checks at the first real forward."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, k, None) is not None for k in _PLACEHOLDER_KEYS):
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    if reference is None:
        return None
    device, dtype = reference.device, reference.dtype
    inputs: dict[str, Any] = {}
    if "input_features" in params:
        mel_bins = getattr(config, "num_mel_bins", None)
        positions = getattr(config, "max_source_positions", None)
        if not (mel_bins and positions):
            return None
        # Whisper's encoder takes exactly 2 frames per source position (its conv stride)
        inputs["input_features"] = torch.zeros(1, mel_bins, 2 * positions, device=device, dtype=dtype)
    if "pixel_values" in params:
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", None)
        if not size:
            return None
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(vision, "num_channels", 3)
        inputs["pixel_values"] = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if "input_ids" in params and vocab and "input_features" not in inputs:
        inputs["input_ids"] = torch.arange(_PROBE_TOKENS, device=device).remainder(vocab).unsqueeze(0)
        if "attention_mask" in params:   # without one, some models warn about padding
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False) and vocab:
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) and 0 <= start < vocab else 0
        inputs["decoder_input_ids"] = torch.full((1, 1), start, device=device)
    if not inputs:
        return None
    required = [name for name, p in params.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(name not in inputs for name in required):
        return None
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs
