"""The bitsandbytes quantisation a base model is loaded with (QLoRA's frozen 4-bit base, or 8-bit):
`peftlab train --quantize nf4|fp4|int8`, its record (run.json's "quantization" and, read from the
loaded model, an adapter's peftlab.json `base_model.quantization`), and the transformers
`BitsAndBytesConfig` that loads a base the same way again, so that `eval`, `generate`, `serve`
and `from_pretrained` score an adapter on the base it was trained on.

bitsandbytes is an extra (`pip install "peftlab[quant]"`); asking for a quantised base without it
is a CapabilityError that names that command, raised before any model is read.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import CapabilityError, CheckpointError, ConfigError

QUANT_METHODS = ("nf4", "fp4", "int8")     # 4-bit NormalFloat, 4-bit float, LLM.int8()
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
INSTALL = 'pip install "peftlab[quant]"'


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are quantised. `double_quant` (the 4-bit scales quantised
    too) and `compute_dtype` (the dtype the 4-bit layers dequantise to and multiply in) are the
    4-bit methods' options; int8 has neither."""

    method: str
    double_quant: bool = False
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization method must be one of {', '.join(QUANT_METHODS)}, "
                              f"got {self.method!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                              f"{self.compute_dtype!r}")
        if self.method == "int8" and (self.double_quant or self.compute_dtype != "float32"):
            raise ConfigError("double quantisation and the compute dtype are options of the 4-bit "
                              "methods (nf4, fp4); int8 takes neither")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, value: Any, source: str) -> Quantization | None:
        """The quantisation a record holds (None: an unquantised base); CheckpointError naming
        `source` when the field is not one this module wrote."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {"method", "double_quant", "compute_dtype"}:
            raise CheckpointError(f"{source}: field 'quantization' is {value!r:.120}, not a record of "
                                  "method, double_quant and compute_dtype; the file was edited")
        try:
            return cls(**value)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{source}: field 'quantization': {e}") from None

    def describe(self) -> str:
        """'nf4 (double quantisation, computed in bfloat16)' / 'int8'."""
        if self.method == "int8":
            return "int8"
        double = "double quantisation, " if self.double_quant else ""
        return f"{self.method} ({double}computed in {self.compute_dtype})"

    def loading_config(self) -> Any:
        """transformers' BitsAndBytesConfig for `from_pretrained(..., quantization_config=...)`;
        CapabilityError naming the pip command when bitsandbytes is not installed."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig
        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.method,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                  bnb_4bit_use_double_quant=self.double_quant)


def require_bitsandbytes() -> None:
    """CapabilityError with the install command when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CapabilityError(f"a quantised base model needs bitsandbytes, which is not installed: {INSTALL}")


def model_quantization(model: nn.Module) -> Quantization | None:
    """The bitsandbytes quantisation `model` was loaded with (transformers keeps its
    BitsAndBytesConfig in `config.quantization_config`), or None: unquantised, or quantised
    another way (which peftlab does not reload)."""
    found = getattr(getattr(model, "config", None), "quantization_config", None)
    if found is None:
        return None
    fields = found if isinstance(found, dict) else found.to_dict()
    if str(fields.get("quant_method", "")).lower().split(".")[-1] not in ("bitsandbytes", "bits_and_bytes"):
        return None
    if fields.get("load_in_8bit"):
        return Quantization("int8")
    if not fields.get("load_in_4bit"):
        return None
    dtype = fields.get("bnb_4bit_compute_dtype") or "float32"
    return Quantization(fields.get("bnb_4bit_quant_type", "fp4"), bool(fields.get("bnb_4bit_use_double_quant")),
                        str(dtype).removeprefix("torch."))
