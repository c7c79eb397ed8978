"""The names Hugging Face `peft` gives things on disk (shared/specs/peft-format.md), shared by the
format dispatch (peft_format.py) and the methods' peft codecs (`Method.to_peft` / `from_peft`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.sites import match_targets

if TYPE_CHECKING:
    from ..core.model import AdaptedModel

PREFIX = "base_model.model."   # peft's key of a module's tensor: PREFIX + module path + "." + name
PROMPT_LEARNING_PREFIX = "base_model."   # the same for prompt learning, whose base_model is the model
PEFT_VERSION = "0.21.2"        # the peft release whose format this writes and is tested against
# peft refuses LoRA-like adapters on these modules of these state-space families (its CUDA kernel
# path reads their weights directly; peft/tuners/tuners_utils.py _check_lora_target_modules_mamba),
# so a directory holding one would fail to load in peft: such adapters are saved in peftlab's
# format only. Ours run them through the module's forward, which the probe forward checks.
PEFT_REFUSED_SSM_MODULES = frozenset({"out_proj", "conv1d"})
PEFT_SSM_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"

# peft task type per transformers auto-class mapping (GPT2LMHeadModel is a causal LM too).
_TASK_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                  ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"))


# the transformers Auto class that builds a base model for each peft task type (as peft's
# AutoPeftModel classes do); a task-agnostic adapter (no task type) goes on the class its base
# folder declares
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
                "FEATURE_EXTRACTION": "AutoModel"}


def task_type(model: nn.Module, *, head_in_file: bool) -> str | None:
    """peft's task type for this model class (None when transformers maps it to no task).
    peft's SEQ_CLS / TOKEN_CLS / QA models expect the head in the file, so unless it is there
    (`head_in_file`: a trained head copy) the adapter is written task-agnostic (None)."""
    from transformers.models.auto import modeling_auto  # on first use: a heavy import
    cls = type(model).__name__
    task = next((task for mapping, task in _TASK_MAPPINGS
                 if cls in getattr(modeling_auto, mapping, {}).values()), None)
    if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") and not head_in_file:
        return None
    return task


def split_copies(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[tuple[str, str], torch.Tensor], dict[str, torch.Tensor]]:
    """(the tensors of modules_to_save copies keyed (copied module's path, parameter name), every
    other tensor by its file key) of a peft file whose keys start with PREFIX. peft lists
    'classifier' and 'score' for SEQ_CLS whether they exist or not: names of no module are
    skipped."""
    found = match_targets(am.model, cfg.get("modules_to_save") or [], roles=am.site_roles())
    copy_paths = sorted(set().union(set(), *found.values()), key=len, reverse=True)  # innermost first
    copies: dict[tuple[str, str], torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        sub = key[len(PREFIX):] if key.startswith(PREFIX) else ""
        owner = next((p for p in copy_paths if sub.startswith(p + ".")), None)
        if owner is None:
            rest[key] = t
        else:
            copies[(owner, sub[len(owner) + 1:])] = t
    return copies, rest
