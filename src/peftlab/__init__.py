"""peftlab: parameter-efficient fine-tuning on one reference architecture (PEFT-Ref).

    import peftlab
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=8, alpha=16, targets=["attn.q", "attn.v"]))
    am.set_active(["a"]); am.set_trainable("a")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .assets import Dataset, load_dataset, load_model
from .errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    DataError,
    MissingAssetError,
    PeftlabError,
    TargetNotFoundError,
)
from .layer import AdaptedLayer, Delta, InputHook, ModuleCopies
from .methods import METHODS, Method, MethodConfig, get_method
from .methods.adalink import AdaLinkConfig
from .methods.balora import BALoraConfig
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import AdapterConfig
from .methods.context_peft import ContextConfig
from .methods.ia3 import IA3Config
from .methods.kasa import KasaConfig
from .methods.ln_tuning import LNTuningConfig
from .methods.lora import LoraConfig, LowRankDelta
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.s2ft import S2FTConfig, s2ft_to_lora, select_by_gradient
from .model import AdaptedModel, Adapter, LayerStatus, adapt
from .objectives import LossContext, LossTerm
from .peft_format import export_peft, import_peft
from .sites import ROLES, Site, describe_sites, resolve_sites
from .tasks import (
    CausalLMTask,
    ClassificationTask,
    InstructionClassificationTask,
    RegressionTask,
)
from .train import TrainConfig, TrainResult, train
from .typology import Typology


def card(am: AdaptedModel, name: str) -> str:
    """The PEFT-Ref typology card of adapter `name`, with its actual sites and parameter count."""
    return am.card(name)


__all__ = [
    "__version__", "adapt", "AdaptedModel", "Adapter", "LayerStatus", "card",
    "LoraConfig", "LowRankDelta", "IA3Config", "BitFitConfig", "LNTuningConfig", "AdapterConfig",
    "PromptTuningConfig", "PrefixTuningConfig", "AdaLinkConfig",
    "KasaConfig", "BALoraConfig", "S2FTConfig", "s2ft_to_lora", "select_by_gradient", "ContextConfig",
    "LossTerm", "LossContext",
    "MethodConfig", "Method", "METHODS", "get_method",
    "AdaptedLayer", "ModuleCopies", "Delta", "InputHook", "Typology",
    "Site", "ROLES", "resolve_sites", "describe_sites",
    "export_peft", "import_peft",
    "load_model", "load_dataset", "Dataset",
    "ClassificationTask", "RegressionTask", "InstructionClassificationTask", "CausalLMTask",
    "train", "TrainConfig", "TrainResult",
    "PeftlabError", "DataError", "MissingAssetError", "TargetNotFoundError", "AdapterError", "ConfigError", "CheckpointError",
    "CapabilityError",
]
