"""Role maps: which module paths play which PEFT-Ref role, per model family.

An architecture map turns roles (``attn.q``, ``ffn.down``, ...) into module-path patterns for one
family; a generic map guesses from common leaf names for everything else. `core/sites.py` applies
them to a model.
"""

from __future__ import annotations

import re

from torch import nn

# PEFT-Ref components (shared/DESIGN.md, "Vocabulary"). Module-backed roles name a layer whose
# weight or output a method touches; position roles (attn.out, ffn.out, ffn.act, attn.kv) name the
# module whose output is that position in the sublayer.
ROLES: tuple[str, ...] = (
    "embed", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "attn.kv", "attn.out",
    "ffn.up", "ffn.gate", "ffn.down", "ffn.act", "ffn.out", "norm", "head",
    # state-space (Mamba) mixers: input, x (dt/B/C), time-step and output projections, the conv
    "ssm.in", "ssm.x", "ssm.dt", "ssm.out", "ssm.conv",
)
# Role groups a user may name as one target.
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o"),
    "ffn": ("ffn.up", "ffn.gate", "ffn.down"),
    "ssm": ("ssm.in", "ssm.x", "ssm.dt", "ssm.out", "ssm.conv"),
}
# A model with fused q/k/v projections (GPT-2 c_attn) answers attn.q/k/v with the fused layer.
fused_fallback = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv",
                   # attn.kv names the same attention modules as attn.out, which claims them first
                   "attn.kv": "attn.out"}

# Patterns: '.' is literal, {L} is the layer index, (a|b) alternates; anchored at a path boundary
# and at the end, so the same map serves the bare model and its task heads (model., bert., ...).
_LLAMA = {
    "embed": ["embed_tokens"],
    "attn.q": ["layers.{L}.self_attn.q_proj"],
    "attn.k": ["layers.{L}.self_attn.k_proj"],
    "attn.v": ["layers.{L}.self_attn.v_proj"],
    "attn.o": ["layers.{L}.self_attn.o_proj"],
    "attn.out": ["layers.{L}.self_attn"],
    "attn.kv": ["layers.{L}.self_attn"],
    "ffn.gate": ["layers.{L}.mlp.gate_proj"],
    "ffn.up": ["layers.{L}.mlp.up_proj"],
    "ffn.down": ["layers.{L}.mlp.down_proj"],
    "ffn.act": ["layers.{L}.mlp.act_fn"],
    "ffn.out": ["layers.{L}.mlp"],
    "norm": ["layers.{L}.(input_layernorm|post_attention_layernorm)", "norm"],
    "head": ["lm_head", "score"],
}
_GPT2 = {
    "embed": ["wte"],
    "attn.qkv": ["h.{L}.attn.c_attn"],
    "attn.o": ["h.{L}.attn.c_proj"],
    "attn.out": ["h.{L}.attn"],
    "attn.kv": ["h.{L}.attn"],
    "ffn.up": ["h.{L}.mlp.c_fc"],
    "ffn.down": ["h.{L}.mlp.c_proj"],
    "ffn.act": ["h.{L}.mlp.act"],
    "ffn.out": ["h.{L}.mlp"],
    "norm": ["h.{L}.(ln_1|ln_2)", "ln_f"],
    "head": ["lm_head", "score"],
}
_BERT = {
    "embed": ["embeddings.word_embeddings"],
    "attn.q": ["layer.{L}.attention.self.query"],
    "attn.k": ["layer.{L}.attention.self.key"],
    "attn.v": ["layer.{L}.attention.self.value"],
    "attn.o": ["layer.{L}.attention.output.dense"],
    "attn.out": ["layer.{L}.attention.self"],
    "attn.kv": ["layer.{L}.attention.self"],
    "ffn.up": ["layer.{L}.intermediate.dense"],
    "ffn.act": ["layer.{L}.intermediate.intermediate_act_fn"],
    "ffn.down": ["layer.{L}.output.dense"],
    "norm": ["layer.{L}.attention.output.LayerNorm", "layer.{L}.output.LayerNorm", "embeddings.LayerNorm"],
    "head": ["classifier", "qa_outputs", "cls.predictions.decoder"],
}
_T5 = {
    "embed": ["shared"],
    "attn.q": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention).q"],
    "attn.k": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention).k"],
    "attn.v": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention).v"],
    "attn.o": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention).o"],
    "attn.out": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention)"],
    "attn.kv": ["block.{L}.layer.(0|1).(SelfAttention|EncDecAttention)"],
    "ffn.gate": ["block.{L}.layer.(1|2).DenseReluDense.wi_0"],
    "ffn.up": ["block.{L}.layer.(1|2).DenseReluDense.(wi|wi_1)"],
    "ffn.down": ["block.{L}.layer.(1|2).DenseReluDense.wo"],
    "ffn.out": ["block.{L}.layer.(1|2).DenseReluDense"],
    "norm": ["block.{L}.layer.(0|1|2).layer_norm", "final_layer_norm"],
    "head": ["lm_head", "classification_head.out_proj"],
}
# DeBERTa-v2 (and v3): BERT's layout with *_proj attention projections.
_DEBERTA_V2 = {
    "embed": ["embeddings.word_embeddings"],
    "attn.q": ["layer.{L}.attention.self.query_proj"],
    "attn.k": ["layer.{L}.attention.self.key_proj"],
    "attn.v": ["layer.{L}.attention.self.value_proj"],
    "attn.o": ["layer.{L}.attention.output.dense"],
    "ffn.up": ["layer.{L}.intermediate.dense"],
    "ffn.down": ["layer.{L}.output.dense"],
    "norm": ["layer.{L}.attention.output.LayerNorm", "layer.{L}.output.LayerNorm", "embeddings.LayerNorm",
             "encoder.LayerNorm"],
    "head": ["classifier", "qa_outputs", "lm_predictions.lm_head.dense"],
}
# BART-style encoder-decoders (BART, mBART, Whisper): self_attn / encoder_attn, fc1 / fc2.
_BART = {
    "embed": ["(encoder|decoder).embed_tokens"],
    "attn.q": ["layers.{L}.(self_attn|encoder_attn).q_proj"],
    "attn.k": ["layers.{L}.(self_attn|encoder_attn).k_proj"],
    "attn.v": ["layers.{L}.(self_attn|encoder_attn).v_proj"],
    "attn.o": ["layers.{L}.(self_attn|encoder_attn).out_proj"],
    "ffn.up": ["layers.{L}.fc1"],
    "ffn.down": ["layers.{L}.fc2"],
    "norm": ["layers.{L}.(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)",
             "(encoder|decoder).(layer_norm|layernorm_embedding)"],
    "head": ["lm_head", "proj_out", "classification_head.out_proj", "qa_outputs"],
}
# Mamba / Mamba2 / FalconMamba mixers (Mamba2 has no x_proj or dt_proj: its dt is a slice of in_proj).
_MAMBA = {
    "embed": ["embeddings"],
    "ssm.in": ["layers.{L}.mixer.in_proj"],
    "ssm.x": ["layers.{L}.mixer.x_proj"],
    "ssm.dt": ["layers.{L}.mixer.dt_proj"],
    "ssm.out": ["layers.{L}.mixer.out_proj"],
    "ssm.conv": ["layers.{L}.mixer.conv1d"],
    "norm": ["layers.{L}.norm", "layers.{L}.mixer.norm", "norm_f"],
    "head": ["lm_head"],
}
# Fallback for unknown families: common leaf names. Norms are also found by class name.
_GENERIC = {
    "embed": ["(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)"],
    "attn.q": ["(q_proj|query|wq|q_lin)"],
    "attn.k": ["(k_proj|key|wk|k_lin)"],
    "attn.v": ["(v_proj|value|wv|v_lin)"],
    "attn.qkv": ["(c_attn|qkv_proj|query_key_value|Wqkv|qkv)"],
    "attn.o": ["(o_proj|out_proj|out_lin|attention.output.dense|attn.c_proj|dense)"],
    "ffn.gate": ["(gate_proj|w3)"],
    "ffn.up": ["(up_proj|fc1|c_fc|w1|lin1|dense_h_to_4h|intermediate.dense)"],
    "ffn.down": ["(down_proj|fc2|w2|lin2|dense_4h_to_h|mlp.c_proj|output.dense)"],
    "norm": ["(\\w*norm\\w*|ln_\\w+|ln_f)"],
    "head": ["(lm_head|classifier|score|embed_out|qa_outputs)"],
}
_FAMILIES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                     "granite", "phi3", "smollm3"], _LLAMA),
    "gpt2": _GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
    **dict.fromkeys(["t5", "mt5"], _T5),
    "deberta-v2": _DEBERTA_V2,
    **dict.fromkeys(["bart", "mbart", "whisper"], _BART),
    **dict.fromkeys(["mamba", "mamba2", "falcon_mamba"], _MAMBA),
}

# Default targets where a method's own defaults name roles the family lacks (a Mamba has no
# attention): family -> method name -> the config fields to use instead. Applied only while
# every listed field still holds the method's default (attach.install), so anything the user
# set is kept. LoRA adapts the SSM's input and output projections; (IA)3 rescales in_proj's
# output (the x / gate streams, as it rescales k and v) and out_proj's input (the gated SSM
# output, as it rescales the FFN activation before ffn.down).
_SSM_DEFAULTS: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["lora", "balora", "kasa"], {"targets": ["ssm.in", "ssm.out"]}),
    "ia3": {"targets": ["ssm.in", "ssm.out"], "feedforward": ["ssm.out"]},
}
FAMILY_DEFAULTS: dict[str, dict[str, dict[str, list[str]]]] = dict.fromkeys(
    ["mamba", "mamba2", "falcon_mamba"], _SSM_DEFAULTS)


def family_defaults(model: nn.Module, method: str) -> dict[str, list[str]]:
    """Config field -> value replacing `method`'s defaults on `model`'s family ({} when the
    method's own defaults apply)."""
    return FAMILY_DEFAULTS.get(model_family(model), {}).get(method, {})


def _compile(pattern: str) -> re.Pattern[str]:
    body = pattern.replace(".", r"\.").replace("{L}", r"\d+")
    return re.compile(r"(?:^|\.)(?:" + body + r")$")


_COMPILED = {id(m): {role: [_compile(p) for p in pats] for role, pats in m.items()}
             for m in (_LLAMA, _GPT2, _BERT, _T5, _DEBERTA_V2, _BART, _MAMBA, _GENERIC)}


def compiled_role_map(model: nn.Module) -> dict[str, list[re.Pattern[str]]]:
    """Role -> compiled path patterns of the map `model`'s family uses (the generic one if none)."""
    return _COMPILED[id(_FAMILIES.get(model_family(model), _GENERIC))]


def model_family(model: nn.Module) -> str:
    """The architecture map's name for `model` ("llama", "gpt2", ...) or "generic"."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in _FAMILIES else "generic"


_LAYOUTS = {id(_LLAMA): "llama", id(_GPT2): "gpt2", id(_BERT): "bert", id(_T5): "t5"}


def model_layout(model: nn.Module) -> str:
    """The module layout `model` shares with its family: "llama" (also Mistral, Qwen, Gemma, ...),
    "bert" (also RoBERTa, ELECTRA), "gpt2", "t5" or "generic"."""
    return _LAYOUTS.get(id(_FAMILIES.get(model_family(model))), "generic")
