"""peftlab: parameter-efficient fine-tuning on one reference architecture (PEFT-Ref).

    import peftlab
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=8, alpha=16, targets=["attn.q", "attn.v"]))
    am.set_active(["a"]); am.set_trainable("a")

This module is the public API and only re-exports it. The code lives in layers, each importing
only from the ones below (tools/check_layers.py): core (the machinery: sites, the one layer
wrapper, AdaptedModel, checkpoints), interop (other libraries' formats), methods (one file per
technique), compose and assets, training (the loop, tasks and the training-side methods), apps
(recipes, the CLI, comparison, serving; not imported here). The training-side research methods
(DEFT, Light-PEFT, GaLore, PEFTDebias) are re-exported below so that their documented one-line
use keeps working; their full interfaces are in `peftlab.training.*`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .assets import Dataset, load_dataset, load_model
from .compose import (
    CompositionWarning,
    add,
    analogy,
    merge_adapters,
    negate,
    scale,
    subtract,
)
from .core.bank import AdapterBank, BankFullError, UnknownAdapterError
from .core.errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    CheckpointWarning,
    ConfigError,
    DataError,
    MissingAssetError,
    PeftlabError,
    PeftlabWarning,
    TargetNotFoundError,
    TrainingError,
)
from .core.hotswap import hotswap
from .core.layer import AdaptedLayer, Delta, InputHook, MixedDeltas, ModuleCopies
from .core.model import AdaptedModel, Adapter, LayerStatus, adapt
from .core.pretrained import from_pretrained
from .core.recompute import set_input_recompute
from .core.report import card
from .core.sites import ROLES, Site, describe_sites, resolve_sites
from .core.taps import ActivationTaps
from .core.terms import LossContext, LossTerm, delayed_ramp
from .core.typology import Typology
from .interop.peft_format import export_peft, import_peft
from .methods import METHODS, Capability, Method, MethodConfig, get_method
from .methods.adalink import AdaLinkConfig
from .methods.balora import BALoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.bottleneck import deprecated_name as _deprecated_name
from .methods.context_peft import ContextConfig
from .methods.ia3 import IA3Config
from .methods.kasa import KasaConfig
from .methods.ln_tuning import LNTuningConfig
from .methods.lora import LoraConfig, LowRankDelta
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.s2ft import S2FTConfig, s2ft_to_lora, select_by_gradient

# training-side methods (full interfaces in peftlab.training.debias / objectives / optim / pruning)
from .training.debias import (
    PatchConfig,
    WordPairs,
    counterfactual_augment,
    counterfactual_flip_rate,
    load_patch,
    load_word_pairs,
    save_patch,
    swap_words,
    train_patch,
    train_task_on_patch,
)
from .training.loop import TrainConfig, TrainResult, train
from .training.objectives import activation_density, density_term
from .training.optim import (
    OPTIMIZERS,
    SubspaceAdamW,
    build_optimizer,
    optimizer_state_bytes,
)
from .training.pruning import (
    EarlyPruning,
    PrunePlan,
    PruneRatios,
    load_plan,
    parse_prune_spec,
    save_plan,
)
from .training.tasks import (
    CausalLMTask,
    ClassificationTask,
    InstructionClassificationTask,
    RegressionTask,
)


def __getattr__(name: str) -> Any:
    """`adapter_trainer` (imported on first use: it imports transformers' Trainer), and names kept
    for one release after a rename (each access warns): AdapterConfig."""
    if name == "adapter_trainer":
        from .interop.trainer import adapter_trainer
        return adapter_trainer
    try:
        return _deprecated_name(name)
    except AttributeError:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}") from None


__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "ROLES",
    "ActivationTaps",
    "AdaLinkConfig",
    "AdaptedLayer",
    "AdaptedModel",
    "Adapter",
    "AdapterBank",
    "AdapterError",
    "BALoraConfig",
    "BankFullError",
    "BitFitConfig",
    "BottleneckConfig",
    "Capability",
    "CapabilityError",
    "CausalLMTask",
    "CheckpointError",
    "CheckpointWarning",
    "ClassificationTask",
    "CompositionWarning",
    "ConfigError",
    "ContextConfig",
    "DataError",
    "Dataset",
    "Delta",
    "EarlyPruning",
    "IA3Config",
    "InputHook",
    "InstructionClassificationTask",
    "KasaConfig",
    "LNTuningConfig",
    "LayerStatus",
    "LoraConfig",
    "LossContext",
    "LossTerm",
    "LowRankDelta",
    "Method",
    "MethodConfig",
    "MissingAssetError",
    "MixedDeltas",
    "ModuleCopies",
    "PatchConfig",
    "PeftlabError",
    "PeftlabWarning",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PrunePlan",
    "PruneRatios",
    "RegressionTask",
    "S2FTConfig",
    "Site",
    "SubspaceAdamW",
    "TargetNotFoundError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "Typology",
    "UnknownAdapterError",
    "WordPairs",
    "__version__",
    "activation_density",
    "adapt",
    "adapter_trainer",
    "add",
    "analogy",
    "build_optimizer",
    "card",
    "counterfactual_augment",
    "counterfactual_flip_rate",
    "delayed_ramp",
    "density_term",
    "describe_sites",
    "export_peft",
    "from_pretrained",
    "get_method",
    "hotswap",
    "set_input_recompute",
    "import_peft",
    "load_dataset",
    "load_model",
    "load_patch",
    "load_plan",
    "load_word_pairs",
    "merge_adapters",
    "negate",
    "optimizer_state_bytes",
    "parse_prune_spec",
    "resolve_sites",
    "s2ft_to_lora",
    "save_patch",
    "save_plan",
    "scale",
    "select_by_gradient",
    "subtract",
    "swap_words",
    "train",
    "train_patch",
    "train_task_on_patch",
]
