"""Tiny random models built from configs: Llama (causal LM), GPT-2 (Conv1D, fused c_attn), BERT
(sequence classification). Built fresh per test so no test sees another's adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

# Tiny models: one thread is several times faster than two contending for a shared 2-core box.
torch.set_num_threads(1)

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

def quantised_config(kind: str, compute: torch.dtype = torch.float32):
    """transformers' BitsAndBytesConfig for "nf4" / "fp4" (compute dtype `compute`) or "int8"."""
    from transformers import BitsAndBytesConfig
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute)


@pytest.fixture(scope="session")
def quantised_llama(tmp_path_factory):
    """quantised_llama(kind, seed=0, dtype=fp32): a fresh tiny Llama (64 wide) loaded through
    transformers' BitsAndBytesConfig in nf4 / fp4 (compute dtype = dtype) or int8 (~0.05 s);
    kind None: the same weights unquantised. 64 wide, not tiny_llama's 32: bitsandbytes' 4-bit
    blocks are 64 values and its CPU inference layout wants 32-row tiles."""
    from transformers import AutoModelForCausalLM
    saved: dict[int, str] = {}

    def load(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
        if seed not in saved:
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
            path = tmp_path_factory.mktemp(f"llama64-{seed}")
            LlamaForCausalLM(cfg).save_pretrained(path)
            saved[seed] = str(path)
        quantisation = quantised_config(kind, dtype) if kind else None
        return AutoModelForCausalLM.from_pretrained(saved[seed], dtype=dtype,
                                                    quantization_config=quantisation).eval()
    return load


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (2, 9), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
