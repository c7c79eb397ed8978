import pytest

import peftlab
from peftlab.core.sites import describe_sites, layer_index, resolve_sites

from conftest import tiny_bert, tiny_gpt2, tiny_llama


def paths(sites):
    return [s.path for s in sites]


def test_llama_roles_resolve_to_projections():
    m = tiny_llama()
    assert paths(resolve_sites(m, ["attn.q", "attn.v"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    roles = describe_sites(m)
    assert roles["ffn.gate"] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    assert roles["embed"] == ["model.embed_tokens"] and roles["head"] == ["lm_head"]
    assert "model.norm" in roles["norm"]


def test_gpt2_fused_qkv_answers_attn_q_and_v():
    m = tiny_gpt2()
    sites = resolve_sites(m, ["attn.q", "attn.v"])
    assert paths(sites) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert {s.role for s in sites} == {"attn.qkv"} and sites[0].type_name == "Conv1D"
    assert paths(resolve_sites(m, "ffn.down")) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_bert_roles_and_head():
    m = tiny_bert()
    assert paths(resolve_sites(m, ["attn.k"])) == [f"bert.encoder.layer.{i}.attention.self.key" for i in (0, 1)]
    assert paths(resolve_sites(m, "ffn.down")) == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert paths(resolve_sites(m, "head")) == ["classifier"]


def test_t5_map():
    from transformers import T5Config, T5ForConditionalGeneration
    m = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                            num_decoder_layers=1, num_heads=2))
    q = paths(resolve_sites(m, "attn.q"))
    assert q == ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
                 "decoder.block.0.layer.1.EncDecAttention.q"]
    assert paths(resolve_sites(m, "ffn.down")) == ["encoder.block.0.layer.1.DenseReluDense.wo",
                                                   "decoder.block.0.layer.2.DenseReluDense.wo"]


def test_generic_fallback_names():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.fc1, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 8), nn.LayerNorm(4)

    m = nn.Sequential(Block(), Block())
    assert paths(resolve_sites(m, "attn.q")) == ["0.q_proj", "1.q_proj"]
    assert paths(resolve_sites(m, "ffn.up", layers=[1])) == ["1.fc1"]
    assert paths(resolve_sites(m, "norm")) == ["0.norm", "1.norm"]


def test_name_suffix_glob_regex_all_linear_layers_exclude():
    m = tiny_llama()
    assert paths(resolve_sites(m, "q_proj")) == paths(resolve_sites(m, "attn.q"))
    assert paths(resolve_sites(m, "self_attn.o_proj", layers=1)) == ["model.layers.1.self_attn.o_proj"]
    assert paths(resolve_sites(m, "*.mlp.*_proj", layers=[0])) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert paths(resolve_sites(m, r"re:model\.layers\.1\.self_attn\.[qk]_proj")) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    linear = resolve_sites(m, "all-linear")
    assert len(linear) == 14 and "lm_head" not in paths(linear)
    assert len(resolve_sites(m, "all-linear", exclude=["ffn"])) == 8
    assert len(resolve_sites(m, ["attn", "ffn"])) == 14


def test_unknown_target_lists_close_candidates():
    with pytest.raises(peftlab.TargetNotFoundError, match=r"'q_prj'.*close candidates: q_proj"):
        resolve_sites(tiny_llama(), ["attn.q", "q_prj"])
    with pytest.raises(peftlab.TargetNotFoundError, match="close candidates: attn.q"):
        resolve_sites(tiny_llama(), "attn.qq")
    with pytest.raises(peftlab.TargetNotFoundError, match="leave no site"):
        resolve_sites(tiny_llama(), "attn.q", layers=[7])


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("encoder.block.3.layer.1.DenseReluDense.wo") == 3
    assert layer_index("lm_head") is None
