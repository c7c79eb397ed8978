"""What prompt tuning and prefix tuning share: reading the batch shape of a forward's arguments,
padding masks and labels for the virtual positions, the generate check, and their peft format
(both are peft "prompt learning": one `prompt_embeddings` tensor, a task type that needs a task
model, the head of a sequence classifier written beside it).

Not a method (no METHOD record); the two method files import from here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import CapabilityError, CheckpointError
from ..core.geometry import attention_heads
from ..core.model import AdaptedModel, Adapter
from ..core.sites import match_targets
from ..interop.peft_names import PREFIX, PROMPT_LEARNING_PREFIX, task_type

# the task types of peft's prompt learning peftlab writes and reads; SEQ_2_SEQ_LM with the prompt
# before the encoder input only (num_transformer_submodules 1; prefix tuning refuses
# encoder-decoders before it gets here)
PEFT_TASKS = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM")


# ---- forward arguments ------------------------------------------------------------------------
def batch_and_length(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(batch, sequence length) of a forward's input_ids or inputs_embeds."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is not None:
        return ids.shape[0], ids.shape[1]
    if embeds is not None:
        return embeds.shape[0], embeds.shape[1]
    raise ValueError("a prompt/prefix adapter needs input_ids or inputs_embeds")


def prepend(t: torch.Tensor | None, n: int, fill: int) -> torch.Tensor | None:
    """`t` (B, L) with n columns of `fill` on the left (None stays None)."""
    if t is None:
        return None
    return torch.cat([t.new_full((t.shape[0], n), fill), t], dim=1)


def check_generates(model: nn.Module) -> None:
    """CapabilityError unless `model` is a decoder-only model that generates text."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise CapabilityError("generate with prompt/prefix adapters supports decoder-only models")
    can = getattr(model, "can_generate", None)
    if not hasattr(model, "generate") or (callable(can) and not can()):
        raise CapabilityError(f"{type(model).__name__} does not generate text")


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(num_layers, num_attention_heads) from the model config, as peft reads them."""
    cfg = model.config
    layers = next(getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, k))
    heads = attention_heads(model)
    if heads is None:
        raise CapabilityError(f"the config of {type(model).__name__} declares no attention head count "
                              "(num_attention_heads / n_head / num_heads), which peft's prompt-learning "
                              "format records; set it in the config")
    return int(layers), heads[0]


# ---- peft format ---------------------------------------------------------------------------------
def peft_task(model: nn.Module) -> str:
    """peft's task type for prompt learning: it needs a task model (CAUSAL_LM, SEQ_CLS or
    SEQ_2_SEQ_LM)."""
    task = task_type(model, head_in_file=True)    # a SEQ_CLS file always carries the head
    if task not in PEFT_TASKS:
        raise CapabilityError(f"peft's prompt learning needs a causal LM, a sequence classifier or a "
                              f"seq2seq LM; {type(model).__name__} is none of these (peft task {task!r})")
    return task


def head_tensors(am: AdaptedModel, adapter: Adapter, fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft's SEQ_CLS prompt learning always trains and loads the head ('classifier' or
    'score'); without a trained copy we write the base head's tensors, unchanged (and list the
    head in `fields["modules_to_save"]`). peft also wraps, and expects in the file, every other
    module its suffix match takes (DistilBERT's 'pre_classifier' for 'classifier'): those get
    their base tensors too."""
    if fields["task_type"] == "SEQ_CLS" and not adapter.copies:
        heads = [name for name, _ in am.model.named_children() if name in ("classifier", "score")]
        if not heads:
            raise CapabilityError(f"peft's SEQ_CLS prompt learning needs a 'classifier' or 'score' "
                                  f"head; {type(am.model).__name__} has neither")
        fields["modules_to_save"] = heads
    return {f"{PROMPT_LEARNING_PREFIX}{path}.{k}": t.detach().clone()
            for path in peft_wrapped_paths(am.model, fields.get("modules_to_save") or [])
            if path not in adapter.copies
            for k, t in am.model.get_submodule(path).state_dict().items()}


def peft_wrapped_paths(model: nn.Module, names: list[str]) -> list[str]:
    """The module paths peft wraps for modules_to_save `names`: it matches by plain string
    suffix, so 'classifier' also takes DistilBERT's 'pre_classifier', whose tensors peft then
    expects in the file and writes into it."""
    paths = [p for p, _ in model.named_modules() if p and any(p.endswith(n) for n in names)]
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]   # outermost only


def check_peft_header(cfg: dict[str, Any]) -> None:
    """CapabilityError for a prompt-learning config peftlab cannot import."""
    if cfg.get("task_type") not in PEFT_TASKS + (None,):
        raise CapabilityError(f"peft task_type {cfg.get('task_type')!r} is not supported for "
                              f"prompt learning; peftlab imports {PEFT_TASKS}")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CapabilityError("encoder-decoder prompt learning (num_transformer_submodules=2) is "
                              "not supported")


def prompt_tensor(tensors: dict[str, torch.Tensor], expected: tuple[int, int], what: str
                  ) -> torch.Tensor:
    """The file's `prompt_embeddings`, checked to be `expected` in shape."""
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"the {what} adapter has no 'prompt_embeddings' tensor")
    t = tensors["prompt_embeddings"]
    if tuple(t.shape) != expected:
        raise CheckpointError(f"'prompt_embeddings' is {list(t.shape)} but this model needs "
                              f"{list(expected)}: the adapter was made for a different base model")
    return t


def _module_key(key: str) -> str:
    """A file key without its peft prefix ('base_model.model.' or prompt learning's 'base_model.')."""
    return key.removeprefix(PREFIX).removeprefix(PROMPT_LEARNING_PREFIX)


def split_copies(tensors: dict[str, torch.Tensor], copy_paths: list[str]
                 ) -> dict[tuple[str, str], torch.Tensor]:
    """modules_to_save tensors of a prompt-learning file, keyed (path, param). peft writes them
    as `base_model.<path>.<param>` for prompt learning (its base_model is the model itself)."""
    out = {}
    for key, t in tensors.items():
        if key == "prompt_embeddings":
            continue
        rest = _module_key(key)
        owner = next((p for p in sorted(copy_paths, key=len, reverse=True)
                      if rest.startswith(p + ".")), None)
        if owner is None:
            raise CheckpointError(f"tensor {key!r} is neither 'prompt_embeddings' nor part of "
                                  f"modules_to_save {copy_paths}")
        out[(owner, rest[len(owner) + 1:])] = t
    return out


def copy_paths_of(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules_to_save paths that the file actually carries (peft lists 'classifier' and
    'score' for SEQ_CLS whether they exist or not)."""
    names = cfg.get("modules_to_save") or []
    found = match_targets(am.model, names)
    paths = sorted(set().union(set(peft_wrapped_paths(am.model, names)), *found.values()))
    keys = [_module_key(k) for k in tensors]
    return [p for p in paths if any(k.startswith(p + ".") for k in keys)]
