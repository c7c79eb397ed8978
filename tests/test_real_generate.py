"""Prompt and prefix tuning generate on the real SmolLM2-135M-Instruct (marked real_model)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.assets import load_model


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2", kind="causal-lm")
    return model, tok


def greedy(am, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by repeated full forwards: the reference for generate."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = am(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, -1].argmax(-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("config", [peftlab.PromptTuningConfig(num_virtual_tokens=8, init="vocab"),
                                    peftlab.PrefixTuningConfig(num_virtual_tokens=8)],
                         ids=["prompt", "prefix"])
def test_generate_with_prompt_like_adapter_on_smollm2(smollm2, config):
    model, tok = smollm2
    am = peftlab.adapt(model)
    try:
        am.add_adapter("a", config)
        am.set_active("a")
        ids = tok("The movie was", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            with am.disabled():
                plain = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
            got = am.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=tok.pad_token_id)
        assert got.shape == (1, ids.shape[1] + 6) and torch.equal(got[:, : ids.shape[1]], ids)
        assert torch.equal(got, greedy(am, ids, 6))
        with am.disabled():
            assert torch.equal(plain, greedy(am, ids, 6))
    finally:
        am.unload()
