"""Mixed batches: every example routed to its own adapter (`adapter_ids=`, `AdaptedModel.routed`)
computes what that example computes alone with its adapter active, in inference and training."""

import pytest
import torch
import torch.nn.functional as F

import peftlab

from conftest import BUILDERS, VOCAB, tiny_bert, tiny_llama

ROUTE = ["a", None, "c", "b", "a", "c"]   # one example on the base model


def batch(arch: str, n: int = len(ROUTE), length: int = 9) -> dict[str, torch.Tensor]:
    """Token ids with right padding on some rows (attention_mask 0 there)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i, pad in enumerate([0, 3, 0, 5, 1, 0][:n]):
        if pad:
            ids[i, -pad:] = 0
            mask[i, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def perturb(am: peftlab.AdaptedModel, name: str, seed: int) -> None:
    """Give an adapter non-identity values (IA3 vectors near 1, biases and norm deltas near 0,
    whole-module copies near the original), so every example's adapter visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def outputs(am: peftlab.AdaptedModel, inputs: dict, route: list | None = None) -> torch.Tensor:
    """Logits and last hidden states per example, flattened (BERT's tiny classifier alone would
    hide most of an adapter's effect)."""
    out = am(**inputs, adapter_ids=route, output_hidden_states=True)
    return torch.cat([out.logits.flatten(1), out.hidden_states[-1].flatten(1)], dim=1)


def singles(am: peftlab.AdaptedModel, inputs: dict, route: list) -> torch.Tensor:
    """Each example alone, with its adapter as the only active one (or none)."""
    outs = []
    with torch.no_grad():
        for i, name in enumerate(route):
            am.set_active([name] if name else [])
            outs.append(outputs(am, {k: v[i:i + 1] for k, v in inputs.items()}))
    am.set_active([])
    return torch.cat(outs)


def assert_mixed_equals_singles(am: peftlab.AdaptedModel, inputs: dict, route: list = ROUTE) -> None:
    with torch.no_grad():
        mixed = outputs(am, inputs, route)
    # fp32 sums in another order (one routed batch against per-adapter batches): on AVX-512 CPUs
    # that differs by up to 2e-5 relative; in float64 the same comparison holds at atol 1e-5 alone
    torch.testing.assert_close(mixed, singles(am, inputs, route), atol=1e-5, rtol=1e-4)
    # the adapters really differ from each other and from the base, so the test means something
    names = list(dict.fromkeys(route))
    with torch.no_grad():
        same_input = outputs(am, {k: v[:1].expand(len(names), *v.shape[1:]) for k, v in inputs.items()},
                             names)
    for i in range(1, len(names)):
        assert (same_input[i] - same_input[0]).abs().max() > 1e-3, names[i]
    assert am.state.routed is None and am.active == []


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_lora_of_different_ranks_in_one_batch(arch):
    am = peftlab.adapt(BUILDERS[arch]())
    for name, r in (("a", 2), ("b", 4), ("c", 8)):
        am.add_adapter(name, peftlab.LoraConfig(r=r, alpha=2 * r, targets=["all-linear", "embed"],
                                                init="random"))
    assert_mixed_equals_singles(am, batch(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rslora_pissa_dora_in_one_batch(arch):
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear", init="random", rslora=True))
    am.add_adapter("b", peftlab.LoraConfig(r=2, targets="all-linear", init="pissa"))
    am.add_adapter("c", peftlab.LoraConfig(r=3, targets="all-linear", init="random", dora=True))
    perturb(am, "b", 1)    # PiSSA starts as a no-op: move it off its start
    perturb(am, "c", 2)    # and DoRA's magnitude off ‖W + ΔW‖
    assert_mixed_equals_singles(am, batch(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_ia3_bitfit_ln_tuning_and_lora_in_one_batch(arch):
    am = peftlab.adapt(BUILDERS[arch]())
    am.add_adapter("a", peftlab.IA3Config())                     # output scaling on k, v; input on ffn.down
    am.add_adapter("b", peftlab.BitFitConfig())                  # linear layers and norms
    am.add_adapter("c", peftlab.LNTuningConfig())                # LayerNorm (GPT-2, BERT) / RMSNorm (Llama)
    am.add_adapter("d", peftlab.LoraConfig(r=2, targets=["attn.v", "ffn.down"], init="random"))
    am.add_adapter("e", peftlab.IA3Config(feedforward=[]))       # ffn.down output-scaled: both stages there
    for seed, name in enumerate("abce"):
        perturb(am, name, seed)
    assert_mixed_equals_singles(am, batch(arch), ["a", None, "c", "b", "d", "e"])


def test_per_example_classification_heads():
    am = peftlab.adapt(tiny_bert())
    for name in ("a", "b", "c"):
        am.add_adapter(name, peftlab.LoraConfig(r=2, init="random", modules_to_save=["classifier"]))
        perturb(am, name, ord(name))
    am.add_adapter("d", peftlab.BitFitConfig(targets="attn.v"))   # no head of its own: the original
    perturb(am, "d", 0)
    assert_mixed_equals_singles(am, batch("bert"))
    assert_mixed_equals_singles(am, batch("bert"), ["d", "a", "d", None, "a", "a"])
    assert_mixed_equals_singles(am, batch("bert"), ["b", "b", "b", "b", "b", "b"])


def test_routing_ignores_the_active_set_and_restores_it():
    am = peftlab.adapt(tiny_llama())
    for name, r in (("a", 2), ("b", 4), ("c", 8)):
        am.add_adapter(name, peftlab.LoraConfig(r=r, init="random"))
    inputs = batch("llama")
    am.set_active(["b", "c"], weights=[0.5, 2.0])
    with torch.no_grad():
        before = outputs(am, inputs)
        routed = outputs(am, inputs, ROUTE)
        with am.disabled():    # routing says exactly what each example uses
            torch.testing.assert_close(outputs(am, inputs, ROUTE), routed, atol=0, rtol=0)
        torch.testing.assert_close(outputs(am, inputs), before, atol=0, rtol=0)
    assert am.active == ["b", "c"]
    torch.testing.assert_close(routed, singles(am, inputs, ROUTE), atol=1e-5, rtol=0)


def test_cached_stacks_follow_weight_updates():
    """Inference reuses stacked weights across calls, but never stale ones."""
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=2, init="random"))
    am.add_adapter("b", peftlab.IA3Config())
    inputs = batch("llama", n=2)
    with torch.no_grad():
        first = outputs(am, inputs, ["a", "b"])
        layer = am.model.model.layers[0].self_attn.v_proj
        groups = [g for stage in layer._mixed_memo[1] for g in stage]
        stacks = [dict(g._stacks) for g in groups]
        assert len(groups) == 2 and all(len(t) == 1 for t in stacks)       # LoRA and IA3 here
        torch.testing.assert_close(outputs(am, inputs, ["a", "b"]), first, atol=0, rtol=0)
        for g, before in zip(groups, stacks):                                # reused, not rebuilt
            assert g._stacks.keys() == before.keys()
            assert all(g._stacks[k] is v for k, v in before.items())
        layer.deltas["a"].lora_B.mul_(3.0)
        layer.deltas["b"].ia3_l.add_(0.5)
        after = outputs(am, inputs, ["a", "b"])
    assert (after - first).abs().max() > 1e-4
    torch.testing.assert_close(after, singles(am, inputs, ["a", "b"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 9])   # one token per row: the decoding case
def test_half_precision_mixed_batch_matches_fp32(length):
    """bf16 on a CPU: the rank-r products of a mixed batch run in bf16 or, with one or two tokens
    per row, in fp32 (faster there); either way the mixed batch is as close to the fp32 model as
    running each example alone in bf16 is, and each row still gets its own adapter."""
    am = peftlab.adapt(tiny_llama())
    for name, r in (("a", 2), ("b", 4), ("c", 8)):
        am.add_adapter(name, peftlab.LoraConfig(r=r, targets="all-linear", init="random"))
        perturb(am, name, seed=r)
    inputs = {k: v[:, :length] for k, v in batch("llama").items()}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        full = outputs(am, inputs)
        reference = outputs(am, inputs, ROUTE)
        am.to(torch.bfloat16)
        half = outputs(am, inputs, ROUTE).float()
        half_alone = singles(am, inputs, ROUTE).float()
    rounding = (half_alone - reference).abs().max()       # what bf16 costs anyway
    assert (half - reference).abs().max() <= 1.5 * rounding
    differs = (reference - full).abs().amax(1) > 10 * rounding    # rows whose adapter matters
    assert differs.sum() >= 4


# ---- training ------------------------------------------------------------------------------------
def example_losses(am, inputs, route=None):
    """Per-example losses (summed: every example's gradient counts once, whatever its batch)."""
    out = am(**inputs, adapter_ids=route).logits
    if out.dim() == 2:                                   # classification: labels from the ids
        return F.cross_entropy(out, inputs["input_ids"][:, 1] % out.shape[-1], reduction="sum")
    logp = F.cross_entropy(out[:, :-1].transpose(1, 2), inputs["input_ids"][:, 1:], reduction="none")
    mask = inputs["attention_mask"][:, 1:]
    return ((logp * mask).sum(1) / mask.sum(1)).sum()


def grads(am, names):
    return {(n, i): p.grad.clone() for n in names for i, p in enumerate(am.adapter_parameters(n))}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_in_one_mixed_batch_gives_each_adapter_its_own_gradients(arch):
    """Trains LoRA of two ranks, DoRA, IA3, BitFit, LN tuning, embedding LoRA (BERT: with a padding
    row) and per-adapter heads together; each gets the gradients of its own sub-batch."""
    am = peftlab.adapt(BUILDERS[arch]())
    heads = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets=["all-linear", "embed"], init="random", **heads))
    am.add_adapter("b", peftlab.LoraConfig(r=4, targets="all-linear", init="random", dora=True))
    am.add_adapter("c", peftlab.IA3Config(**heads))
    am.add_adapter("d", peftlab.LNTuningConfig())
    am.add_adapter("e", peftlab.BitFitConfig())
    names = ["a", "b", "c", "d", "e"]
    for seed, name in enumerate(names):
        perturb(am, name, seed)
    route = ["a", "b", None, "c", "d", "a", "e", "b"]
    inputs = batch(arch, n=len(route))
    am.set_trainable(names)     # eval mode: BERT's own dropout would make the two runs differ

    example_losses(am, inputs, route).backward()
    mixed = grads(am, names)
    am.zero_grad()
    for name in names:
        rows = [i for i, n in enumerate(route) if n == name]
        am.set_active([name])
        example_losses(am, {k: v[rows] for k, v in inputs.items()}).backward()
    separate = grads(am, names)
    assert mixed.keys() == separate.keys()
    for key, g in separate.items():
        assert g.abs().max() > 0, key
        # 1e-6, plus fp32 rounding where gradients are large: summed over another batch layout, up
        # to 4e-5 of the largest entry on AVX-512 CPUs (float64 meets 1e-5 of it)
        assert (mixed[key] - g).abs().max() <= 1e-6 + 1e-4 * g.abs().max(), key


def test_training_step_in_a_mixed_batch_updates_each_adapter():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", peftlab.LoraConfig(r=2, targets="all-linear"))
    am.add_adapter("b", peftlab.LoraConfig(r=4, targets="all-linear", dropout=0.1))
    am.set_trainable(["a", "b"])
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch("llama", n=4)
    route = ["a", "b", "a", "b"]
    am.train()
    losses = []
    for _ in range(10):
        loss = am(**inputs, labels=inputs["input_ids"], adapter_ids=route).loss
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(am, inputs, route), singles(am, inputs, route), atol=1e-5, rtol=0)


# ---- generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_routes_each_prompt(beams):
    am = peftlab.adapt(tiny_llama())
    for name, r in (("a", 2), ("b", 4)):
        am.add_adapter(name, peftlab.LoraConfig(r=r, alpha=8 * r, targets="all-linear", init="random"))
    route = ["a", None, "b", "a"]
    prompts = batch("llama", n=4)["input_ids"][:, :5].clamp(min=3)    # no padding, no eos
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "num_beams": beams,
                "num_return_sequences": beams}
    with torch.no_grad():
        mixed = am.generate(prompts, adapter_ids=route, **settings)
        base = am.model.generate(prompts, **settings)
        alone = []
        for i, name in enumerate(route):
            am.set_active([name] if name else [])
            alone.append(am.generate(prompts[i:i + 1], **settings))
    assert torch.equal(mixed, torch.cat(alone))
    assert not torch.equal(mixed, base)           # the adapters changed some continuations
    assert am.state.routed is None


# ---- errors --------------------------------------------------------------------------------------
def error_model():
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("alpha", peftlab.LoraConfig(r=2, init="random"))
    am.add_adapter("beta", peftlab.LoraConfig(r=2, init="random"))
    am.add_adapter("bottle", peftlab.AdapterConfig())
    am.add_adapter("prompt", peftlab.PromptTuningConfig(num_virtual_tokens=2))
    am.set_active(["beta"])
    return am


@pytest.mark.parametrize("ids, error, match", [
    (["alpha", "alpah"], peftlab.AdapterError, "no adapter 'alpah'; did you mean 'alpha'"),
    (["alpha"], peftlab.AdapterError, "adapter_ids has 1 entries but the batch has 2 examples"),
    ("alpha", peftlab.AdapterError, "one adapter name .* per example"),
    ([], peftlab.AdapterError, "non-empty sequence"),
    (["alpha", 3], peftlab.AdapterError, "each entry is an adapter name or None"),
    (["bottle", None], peftlab.CapabilityError,
     r"'bottle' is a Bottleneck adapter.*without a batched.*support LoRA, \(IA\)³, BitFit"),
    (["prompt", "alpha"], peftlab.CapabilityError, "model-level hook"),
])
def test_routing_errors_leave_the_model_unchanged(ids, error, match):
    am = error_model()
    inputs = batch("llama", n=2)
    with torch.no_grad():
        before = am(**inputs).logits
        with pytest.raises(error, match=match):
            am(**inputs, adapter_ids=ids)
        with pytest.raises(error, match=match):
            am.generate(inputs["input_ids"], adapter_ids=ids, max_new_tokens=2, pad_token_id=0)
        assert am.state.routed is None and am.state.index is None and am.active == ["beta"]
        torch.testing.assert_close(am(**inputs).logits, before, atol=0, rtol=0)


def test_merged_adapters_refuse_routing():
    am = error_model()
    am.merge("beta")
    inputs = batch("llama", n=2)
    with pytest.raises(peftlab.AdapterError, match=r"\['beta'\] are merged .* unmerge"):
        am(**inputs, adapter_ids=["alpha", None])
    am.unmerge("beta")
    am(**inputs, adapter_ids=["alpha", "beta"])


def test_batch_size_mismatch_inside_a_block_is_an_error():
    am = error_model()
    inputs = batch("llama", n=3)
    with (pytest.raises(peftlab.AdapterError, match="routes 2 examples but a wrapped linear layer got a batch of 3"),
          am.routed(["alpha", None])):
        am(**inputs)
    assert am.state.routed is None
    with torch.no_grad():
        torch.testing.assert_close(outputs(am, inputs), singles(am, inputs, ["beta"] * 3), atol=1e-5, rtol=0)


def test_routed_training_refuses_pissa_with_dropout_and_eval_runs():
    """Stacked ranks share one dropout mask, which PiSSA's frozen start must not see: refused in
    training (LowRankDelta runs it right one adapter at a time), fine in eval."""
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("p", peftlab.LoraConfig(r=2, targets="attn.q", init="pissa", dropout=0.3))
    am.add_adapter("q", peftlab.LoraConfig(r=2, targets="attn.q", init="random"))
    inputs = batch("llama", n=2)
    am.train()
    with pytest.raises(peftlab.CapabilityError, match="PiSSA with dropout"):
        am(**inputs, adapter_ids=["p", "q"])
    am.eval()
    with torch.no_grad():
        out = outputs(am, inputs, ["p", "q"])
        am.set_active("p")
        alone = outputs(am, {k: v[:1] for k, v in inputs.items()})
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)
