"""The names Hugging Face `peft` gives things on disk (shared/specs/peft-format.md), shared by the
format dispatch (peft_format.py) and the methods' peft codecs (`Method.to_peft` / `from_peft`)."""

from __future__ import annotations

from torch import nn

PREFIX = "base_model.model."   # peft's key of a module's tensor: PREFIX + module path + "." + name
PROMPT_LEARNING_PREFIX = "base_model."   # the same for prompt learning, whose base_model is the model
PEFT_VERSION = "0.21.2"        # the peft release whose format this writes and is tested against
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"

# peft task type per transformers auto-class mapping (GPT2LMHeadModel is a causal LM too).
_TASK_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                  ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"))


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
