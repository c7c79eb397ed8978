"""Role maps: which module paths play which PEFT-Ref role, per model family.

An architecture map turns roles (``attn.q``, ``ffn.down``, ...) into module-path patterns for one
family; a generic map guesses from common leaf names for everything else. `core/sites.py` applies
them to a model.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# PEFT-Ref components (shared/DESIGN.md, "Vocabulary"). Module-backed roles name a layer whose
# weight or output a method touches; position roles (attn.out, ffn.out, ffn.act, attn.kv) name the
# module whose output is that position in the sublayer. embed.out is the sequence entering the
# first transformer block: BERT's `embeddings` (token + position + type embeddings, LayerNorm,
# dropout), GPT-2's `drop` (after wte + wpe), the token embedding itself where it feeds block 0
# directly (Llama). A family whose model computes it inline (Granite's embedding multiplier, BART's
# positions) does not list it.
ROLES: tuple[str, ...] = (
    "embed", "embed.out", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "attn.kv", "attn.out",
    "ffn.up", "ffn.gate", "ffn.gate_up", "ffn.down", "ffn.act", "ffn.out", "norm", "head",
    "ffn.experts", "ssm.A", "ssm.D",
    # state-space (Mamba) mixers: input, x (dt/B/C), time-step and output projections, the conv
    "ssm.in", "ssm.x", "ssm.dt", "ssm.out", "ssm.conv",
)
# Role groups a user may name as one target.
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o"),
    "ffn": ("ffn.up", "ffn.gate", "ffn.gate_up", "ffn.down"),
    "ssm": ("ssm.in", "ssm.x", "ssm.dt", "ssm.out", "ssm.conv"),
}
# attn.kv names the same attention modules as attn.out, which claims them first.
fused_fallback = {"attn.kv": "attn.out"}
# Position roles whose module may play another role first: Llama's embed_tokens is the token
# embedding ("embed") and the block-0 input ("embed.out"); they match the family's patterns directly.
SHARED_POSITIONS = ("embed.out",)
# A fused projection answers its sub-roles on a slice of its output rows (`fused_layout`).
FUSED_PARTS: dict[str, str] = {"attn.q": "attn.qkv", "attn.k": "attn.qkv", "attn.v": "attn.qkv",
                               "ffn.gate": "ffn.gate_up", "ffn.up": "ffn.gate_up"}

# Patterns: '.' is literal, {L} is the layer index, (a|b) alternates; anchored at a path boundary
# and at the end, so the same map serves the bare model and its task heads (model., bert., ...).
_LLAMA = {
    "embed": ["embed_tokens"],
    "embed.out": ["embed_tokens"],
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
    "embed.out": ["drop"],
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
    "embed.out": ["embeddings", "embeddings_project"],     # ELECTRA projects after its embeddings
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
# Phi-3: fused q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`) projections; their sub-roles are
# slices of the fused output (`fused_layout`).
_PHI3 = {
    "embed": ["embed_tokens"],
    "embed.out": ["embed_tokens"],
    "attn.qkv": ["layers.{L}.self_attn.qkv_proj"],
    "attn.o": ["layers.{L}.self_attn.o_proj"],
    "attn.out": ["layers.{L}.self_attn"],
    "attn.kv": ["layers.{L}.self_attn"],
    "ffn.gate_up": ["layers.{L}.mlp.gate_up_proj"],
    "ffn.down": ["layers.{L}.mlp.down_proj"],
    "ffn.act": ["layers.{L}.mlp.activation_fn"],
    "ffn.out": ["layers.{L}.mlp"],
    "norm": ["layers.{L}.(input_layernorm|post_attention_layernorm)", "norm"],
    "head": ["lm_head", "score"],
}
# DeBERTa-v2 (and v3): BERT's layout with *_proj attention projections.
_DEBERTA_V2 = {
    "embed": ["embeddings.word_embeddings"],
    "embed.out": ["embeddings"],
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
    "embed.out": ["embeddings"],
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
    "attn.o": ["(o_proj|out_proj|out_lin|attention.output.dense|attn.c_proj|dense|attn.Wo)"],
    "ffn.gate": ["(gate_proj|w3)"],
    "ffn.gate_up": ["gate_up_proj"],
    "ffn.up": ["(up_proj|fc1|fc_in|c_fc|w1|lin1|dense_h_to_4h|intermediate.dense)"],
    "ffn.down": ["(down_proj|fc2|fc_out|w2|lin2|dense_4h_to_h|mlp.c_proj|output.dense|mlp.Wo)"],
    "norm": ["(\\w*norm\\w*|ln_\\w+|ln_f)"],
    "head": ["(lm_head|classifier|score|embed_out|qa_outputs)"],
}
# Granite multiplies the token embeddings inside the model's forward: no module outputs block 0's input.
_GRANITE = {role: pats for role, pats in _LLAMA.items() if role != "embed.out"}
_FAMILIES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                     "smollm3"], _LLAMA),
    "granite": _GRANITE,
    "gpt2": _GPT2,
    "phi3": _PHI3,
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
# An MoE whose experts are stacked parameters (Mixtral, Qwen3-MoE under transformers 5) has no
# ffn.down layer: (IA)3 rescales the attention keys and values only (its FFN activation lives
# inside the experts' parameters, which only LoRA adapts: targets=["ffn.experts"]).
_MOE_DEFAULTS: dict[str, dict[str, list[str]]] = {"ia3": {"targets": ["attn.k", "attn.v"], "feedforward": []}}
FAMILY_DEFAULTS: dict[str, dict[str, dict[str, list[str]]]] = {
    **dict.fromkeys(["mamba", "mamba2", "falcon_mamba"], _SSM_DEFAULTS),
    **dict.fromkeys(["mixtral", "qwen3_moe"], _MOE_DEFAULTS),
}


def family_defaults(model: nn.Module, method: str) -> dict[str, list[str]]:
    """Config field -> value replacing `method`'s defaults on `model`'s family ({} when the
    method's own defaults apply); keyed by the config's model_type, mapped by hand or not."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILY_DEFAULTS.get(model_type, {}).get(method, {})


# Parameter roles name nn.Parameters that a module's forward reads directly (they are sites of
# their own: core/sites.py `parameter_roles`); the patterns match parameter paths, in every family.
# ffn.experts: the stacked expert weights of an MoE layer (Mixtral, Qwen3-MoE under transformers 5:
# (experts, out, in) tensors on an `experts` module); ssm.A / ssm.D: Mamba's state matrix (as its
# log) and skip vector, read in the mixer's forward.
PARAMETER_ROLES: dict[str, list[str]] = {
    "ffn.experts": ["experts.\\w+"],
    "ssm.A": ["mixer.A_log"],
    "ssm.D": ["mixer.D"],
}


def _compile(pattern: str) -> re.Pattern[str]:
    body = pattern.replace(".", r"\.").replace("{L}", r"\d+")
    return re.compile(r"(?:^|\.)(?:" + body + r")$")


_COMPILED = {id(m): {role: [_compile(p) for p in pats] for role, pats in m.items()}
             for m in (_LLAMA, _GRANITE, _GPT2, _PHI3, _BERT, _T5, _DEBERTA_V2, _BART, _MAMBA, _GENERIC)}


_COMPILED_PARAMETERS = {role: [_compile(p) for p in pats] for role, pats in PARAMETER_ROLES.items()}


def parameter_role(path: str, param: torch.Tensor, owner: nn.Module) -> str | None:
    """The parameter role of the parameter at `path` (held by `owner`), or None. The experts role
    takes the weights (2-D and up, biases left out: a LoRA on a bias would be meaningless) of a
    module called `experts` or of a class named for experts (GraniteMoe's ParallelExperts)."""
    experts = "Experts" in type(owner).__name__
    for role, patterns in _COMPILED_PARAMETERS.items():
        if any(p.search(path) for p in patterns) or (experts and role == "ffn.experts"):
            if role == "ffn.experts" and (param.dim() < 2 or "bias" in path.rsplit(".", 1)[-1]):
                return None
            return role
    return None


def compiled_role_map(model: nn.Module) -> dict[str, list[re.Pattern[str]]]:
    """Role -> compiled path patterns, in the order they claim a path, of the map `model` uses:
    the projections its config's `base_model_tp_plan` names first (`tp_plan_roles`), then its
    family's hand map (the generic one if none) for every other role."""
    return role_map(model)[1]


def role_map(model: nn.Module) -> tuple[str, dict[str, list[re.Pattern[str]]]]:
    """(name, role -> compiled patterns) of the map `model` uses; the name is the hand map's
    ("llama", "generic", ...), prefixed "tp_plan+" when the config's tensor-parallel plan gave
    some roles."""
    hand = _COMPILED[id(_FAMILIES.get(model_family(model), _GENERIC))]
    derived = tp_plan_roles(model)
    if not derived:
        return model_family(model), hand
    paths = [path for path, _ in model.named_modules()]
    # a role whose tp_plan patterns match no module here (a plan naming parameters, or modules
    # this class does not build) keeps the hand map's patterns
    used = {role: pats for role, pats in derived.items() if any(p.search(x) for p in pats for x in paths)}
    if not used:
        return model_family(model), hand
    return (f"tp_plan+{model_family(model)}",
            {**used, **{role: pats for role, pats in hand.items() if role not in used}})


def model_family(model: nn.Module) -> str:
    """The architecture map's name for `model` ("llama", "gpt2", ...) or "generic"."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in _FAMILIES else "generic"


_LAYOUTS = {id(_LLAMA): "llama", id(_GPT2): "gpt2", id(_BERT): "bert", id(_T5): "t5"}


def model_layout(model: nn.Module) -> str:
    """The module layout `model` shares with its family: "llama" (also Mistral, Qwen, Gemma, ...),
    "bert" (also RoBERTa, ELECTRA), "gpt2", "t5" or "generic"."""
    return _LAYOUTS.get(id(_FAMILIES.get(model_family(model))), "generic")


# ---- roles from transformers' tensor-parallel plan -----------------------------------------------
# `config.base_model_tp_plan` maps module-path patterns ("layers.*.self_attn.q_proj") to how each
# is split across devices: column-wise splits are the input-side projections (q, k, v, gate, up
# and their fusions), row-wise ones the output-side (o, down). The leaf name says which one.
_ATTN_SECTIONS = frozenset({"self_attn", "attn", "attention", "self_attention"})
_FFN_SECTIONS = frozenset({"mlp", "feed_forward"})
_ATTN_COLWISE = {
    **dict.fromkeys(("q_proj", "query", "wq"), "attn.q"), **dict.fromkeys(("k_proj", "key", "wk"), "attn.k"),
    **dict.fromkeys(("v_proj", "value", "wv"), "attn.v"),
    **dict.fromkeys(("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack"), "attn.qkv"),
}
_ATTN_ROWWISE = {leaf: "attn.o" for leaf in ("o_proj", "dense", "out_proj", "c_proj", "wo")}
_FFN_COLWISE = {"gate_proj": "ffn.gate", "gate_up_proj": "ffn.gate_up",
                **dict.fromkeys(("up_proj", "fc1", "c_fc", "fc_in", "dense_h_to_4h"), "ffn.up")}
_FFN_ROWWISE = {leaf: "ffn.down" for leaf in ("down_proj", "fc2", "c_proj", "fc_out", "dense_4h_to_h")}


def tp_plan_roles(model: nn.Module) -> dict[str, list[re.Pattern[str]]]:
    """Role -> compiled patterns read from the model config's `base_model_tp_plan` (a multimodal
    model's text config): the projections of each block's attention and FFN, and the attention /
    FFN modules that hold them (attn.out, ffn.out). Routed experts (`experts`) are left
    out. {} when the config has no plan. Reads the attribute only: no transformers import."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    plan = getattr(config, "base_model_tp_plan", None)
    if not isinstance(plan, dict):
        return {}
    found: dict[str, list[str]] = {}
    for key, style in plan.items():
        parts = key.split(".") if isinstance(key, str) and isinstance(style, str) else []
        if "*" not in parts or "experts" in parts:
            continue
        inner = parts[parts.index("*") + 1:]                 # section, ..., leaf
        leaf = inner[-2] if inner and inner[-1] == "linear" and len(inner) > 2 else (inner or [""])[-1]
        if len(inner) < 2 or inner[0] not in _ATTN_SECTIONS | _FFN_SECTIONS:
            continue
        attention = inner[0] in _ATTN_SECTIONS
        if "colwise" in style:
            role = (_ATTN_COLWISE if attention else _FFN_COLWISE).get(leaf)
        elif "rowwise" in style and "embedding" not in style:
            role = (_ATTN_ROWWISE if attention else _FFN_ROWWISE).get(leaf)
        else:
            role = None
        if role is None:
            continue
        pattern = ".".join("{L}" if part == "*" else part for part in parts)
        found.setdefault(role, [])
        if pattern not in found[role]:
            found[role].append(pattern)
        if len(inner) == 2:       # the module holding the projection: the sublayer's position
            holder = pattern.rsplit(".", 1)[0]
            # (attn.kv names the same modules: `fused_fallback` answers it with attn.out's)
            position = "attn.out" if attention else "ffn.out"
            if holder not in found.setdefault(position, []):
                found[position].append(holder)
    return {role: [_compile(p) for p in found[role]] for role in ROLES if role in found}


# ---- fused projections -------------------------------------------------------------------------
# Where each sub-role's rows sit in a fused projection's output, as the model's forward splits it
# (read from transformers' modeling code): one block per group of `groups` repeats of
# (sub-role, width) parts.
RowRanges = tuple[tuple[int, int], ...]


def _blocks(groups: int, parts: list[tuple[str, int]]) -> tuple[tuple[str, RowRanges], ...]:
    ranges: dict[str, list[list[int]]] = {role: [] for role, _ in parts}
    at = 0
    for _ in range(groups):
        for role, width in parts:
            spans = ranges[role]
            if spans and spans[-1][1] == at:
                spans[-1][1] += width
            else:
                spans.append([at, at + width])
            at += width
    return tuple((role, tuple((a, b) for a, b in spans)) for role, spans in ranges.items())


def _qkv_parts(model_type: str | None, config: Any, d_out: int,
               heads: tuple[int, int, int] | None) -> tuple[int, list[tuple[str, int]]] | None:
    q, k, v = "attn.q", "attn.k", "attn.v"
    if model_type in ("gpt2", "mpt", "modernbert"):   # split / chunk(3) / view(3, ...): [q | k | v]
        return 1, [(q, d_out // 3), (k, d_out // 3), (v, d_out // 3)]
    if model_type == "codegen":      # view(..., mp_num=4, 3·E/4).split(E/4): per block [q | v | k]
        return 4, [(q, d_out // 12), (v, d_out // 12), (k, d_out // 12)]
    if heads is None:
        return None
    h, kv, hd = heads
    if model_type == "phi3":                     # qkv[..., :h·hd], then kv·hd each for k and v
        return 1, [(q, h * hd), (k, kv * hd), (v, kv * hd)]
    if model_type in ("gpt_neox", "bloom"):      # view(..., heads, 3·hd): per head [q | k | v]
        return h, [(q, hd), (k, hd), (v, hd)]
    if model_type == "falcon":
        if getattr(config, "new_decoder_architecture", False):   # per kv group: its queries, k, v
            groups = getattr(config, "num_kv_heads", None) or kv
            return groups, [(q, h // groups * hd), (k, hd), (v, hd)]
        if getattr(config, "multi_query", False):                # [q (h·hd) | k (hd) | v (hd)]
            return 1, [(q, h * hd), (k, hd), (v, hd)]
        return h, [(q, hd), (k, hd), (v, hd)]                    # per head [q | k | v]
    if model_type == "gpt_bigcode":
        if getattr(config, "multi_query", False):                # split((embed, hd, hd))
            return 1, [(q, h * hd), (k, hd), (v, hd)]
        return h, [(q, hd), (k, hd), (v, hd)]
    return None


def fused_layout(model: nn.Module, fused_role: str, d_out: int,
                 heads: tuple[int, int, int] | None) -> tuple[tuple[str, RowRanges], ...] | None:
    """((sub-role, row ranges), ...) of a fused projection of `model` playing `fused_role`
    ("attn.qkv" or "ffn.gate_up") with `d_out` outputs, in output order; `heads` is (query
    heads, key/value heads, head width) from its config. None when peftlab does not know how
    this family splits it or the sizes do not add up to `d_out` (e.g. a pruned model)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if fused_role == "attn.qkv":
        found = _qkv_parts(model_type, config, d_out, heads)
    elif fused_role == "ffn.gate_up" and model_type in ("phi3", "glm", "glm4"):
        found = 1, [("ffn.gate", d_out // 2), ("ffn.up", d_out // 2)]  # gate, up = out.chunk(2)
    else:
        found = None
    if found is None:
        return None
    groups, parts = found
    if groups < 1 or groups * sum(width for _, width in parts) != d_out or any(w <= 0 for _, w in parts):
        return None
    return _blocks(groups, parts)
