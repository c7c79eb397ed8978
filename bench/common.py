"""What the bench scripts share: the SmolLM2-135M architecture and the aligned result table."""

from __future__ import annotations

from transformers import LlamaConfig


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M-Instruct's architecture (weights are random in the benches: timing only)."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000,
                       tie_word_embeddings=True)


def print_columns(head: tuple[str, ...], body: list[tuple[str, ...]]) -> None:
    """Print rows as ' | '-separated columns padded to the widest cell, with a rule under `head`."""
    w = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    print(" | ".join(h.ljust(x) for h, x in zip(head, w, strict=True)))
    print("-+-".join("-" * x for x in w))
    for r in body:
        print(" | ".join(c.ljust(x) for c, x in zip(r, w, strict=True)))
