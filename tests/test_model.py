"""AdaptedModel lifecycle: activation, disabling, training marks, merging, status and cards."""

import pytest
import torch

import peftlab

from conftest import logits, tiny_bert, tiny_gpt2, tiny_llama


def two_adapters():
    model = tiny_llama()
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets=["attn.q", "attn.v"], init="random"))
    am.add_adapter("b", peftlab.LoraConfig(r=2, targets=["attn.v", "ffn.down"], init="random"))
    return am


def test_disabled_gives_base_and_two_adapters_sum(ids):
    base = logits(tiny_llama(), ids)
    am = two_adapters()
    assert torch.equal(logits(am, ids), base)          # added adapters start inactive
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        am.set_active(names)
        outs[tuple(names)] = logits(am, ids)
    with am.disabled():
        assert torch.equal(logits(am, ids), base)
    assert torch.equal(logits(am, ids), outs[("a", "b")])   # restored after the block
    # Both active: every layer output is base + Δa + Δb. Check on a shared layer directly.
    layer = am.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (layer.deltas["a"].delta_weight() + layer.deltas["b"].delta_weight()).t()
        torch.testing.assert_close(layer(x), expected)
    # Merging both reproduces the two-adapter outputs.
    am.merge(["a", "b"])
    torch.testing.assert_close(logits(am, ids), outs[("a", "b")], atol=1e-5, rtol=0)


def test_activation_and_trainability_are_separate():
    am = two_adapters()
    assert am.trainable_parameters() == 0            # base frozen, adapters frozen
    am.set_active("a")
    assert am.trainable_parameters() == 0            # activating does not unfreeze
    am.set_trainable("b")
    assert am.active == ["a"]                        # unfreezing does not activate
    assert am.trainable_parameters() == am.num_parameters("b")
    am.set_trainable("a")                            # one trainable: b is frozen again
    assert am.trainable_parameters() == am.num_parameters("a")
    am.set_trainable(None)
    assert am.trainable_parameters() == 0


def test_training_changes_only_adapter_and_lowers_loss(ids):
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(r=4, targets="all-linear"))
    am.set_active("a"); am.set_trainable("a")
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    am.train()
    losses = []
    for _ in range(15):
        loss = am(input_ids=ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    plain = am.unload()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_delete_restores_plain_layers(ids):
    base = logits(tiny_llama(), ids)
    am = two_adapters()
    am.set_active(["a", "b"])
    am.delete_adapter("b")
    assert am.active == ["a"]
    assert not isinstance(am.model.model.layers[0].mlp.down_proj, peftlab.AdaptedLayer)
    am.delete_adapter("a")
    assert not any(isinstance(m, peftlab.AdaptedLayer) for m in am.modules())
    assert torch.equal(logits(am, ids), base)


def test_modules_to_save_copies_follow_activation(ids):
    model = tiny_bert()
    base = logits(model, ids)
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(targets=["attn.q", "attn.v"], modules_to_save=["classifier"]))
    am.set_active("a"); am.set_trainable("a")
    assert am.model.classifier.copies["a"].weight.requires_grad
    assert not am.model.classifier.original_module.weight.requires_grad
    heads = sorted(k for k in am.model.state_dict() if k.startswith("classifier."))
    assert heads == ["classifier.copies.a.bias", "classifier.copies.a.weight",
                     "classifier.original_module.bias", "classifier.original_module.weight"]
    with torch.no_grad():
        am.model.classifier.copies["a"].weight.add_(0.5)
    changed = logits(am, ids)
    assert (changed - base).abs().max() > 1e-2
    with am.disabled():
        assert torch.equal(logits(am, ids), base)
    plain = am.merge_and_unload()
    assert type(plain.classifier).__name__ == "Linear"
    assert torch.equal(logits(plain, ids), changed)


def test_generate_passes_through():
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", peftlab.LoraConfig(targets="attn.qkv", init="random"))
    am.set_active("a")
    prompt = torch.tensor([[5, 6, 7]])
    out = am.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = am.model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7) and torch.equal(out, ref)


def test_frozen_head_gets_a_contiguous_input_until_unload():
    """generate hands the head the prompt's last position (a strided view); with the base frozen,
    torch would expand the head's weight per example for it, so adapt() makes that input
    contiguous, the logits staying the same, and unload() takes the hook away again."""
    model = tiny_llama()
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    seen = []

    def record(module, args):
        seen.append(args[0].is_contiguous())

    watch = model.lm_head.register_forward_pre_hook(record)
    with torch.no_grad():
        plain = model.generate(prompt, **settings, output_logits=True, return_dict_in_generate=True)
        assert seen[0] is False                          # the prefill's input as transformers slices it
        seen.clear()
        watch.remove()
        am = peftlab.adapt(model)
        watch = model.lm_head.register_forward_pre_hook(record)     # after adapt's own hook
        adapted = am.generate(prompt, **settings, output_logits=True, return_dict_in_generate=True)
    assert seen and all(seen)
    assert torch.equal(adapted.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(adapted.logits), torch.stack(plain.logits), atol=1e-6, rtol=0)
    watch.remove()
    am.unload()
    assert not model.lm_head._forward_pre_hooks


def test_bad_input_errors():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.TargetNotFoundError, match="close candidates"):
        am.add_adapter("a", peftlab.LoraConfig(targets=["attn.q", "v_prj"]))
    with pytest.raises(peftlab.ConfigError, match="rank r must be a positive integer"):
        am.add_adapter("a", peftlab.LoraConfig(r=0))
    with pytest.raises(peftlab.ConfigError, match="alpha must be > 0"):
        am.add_adapter("a", peftlab.LoraConfig(alpha=0))
    with pytest.raises(peftlab.ConfigError, match="cannot attach to LlamaRMSNorm"):
        am.add_adapter("a", peftlab.LoraConfig(targets="norm"))
    assert not am.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in am.modules())
    am.add_adapter("a", peftlab.LoraConfig())
    with pytest.raises(peftlab.AdapterError, match="already exists"):
        am.add_adapter("a", peftlab.LoraConfig())
    with pytest.raises(peftlab.AdapterError, match=r"no adapter 'b'.*Adapters: \['a'\]"):
        am.set_active(["b"])
    with pytest.raises(peftlab.AdapterError, match="not active"):
        am.merge("a")
    am.set_active("a")
    am.merge("a")
    with pytest.raises(peftlab.AdapterError, match="already merged"):
        am.merge("a")
    with pytest.raises(peftlab.AdapterError, match="merged into the base weights"):
        am.set_active([])
    with pytest.raises(peftlab.AdapterError, match="unmerge"):
        with am.disabled():
            pass


def test_tied_weights_refuse_merge():
    am = peftlab.adapt(tiny_gpt2())          # GPT-2 ties wte to lm_head
    am.add_adapter("e", peftlab.LoraConfig(targets="embed", init="random"))
    am.set_active("e")
    with pytest.raises(peftlab.CapabilityError, match="tied"):
        am.merge("e")


def test_status_and_card():
    am = two_adapters()
    am.set_active(["a"]); am.merge("a")
    rows = {r.path: r for r in am.status()}
    v0 = rows["model.layers.0.self_attn.v_proj"]
    assert v0.role == "attn.v" and v0.adapters == ("a", "b") and v0.merged == ("a",)
    assert "model.layers.1.mlp.down_proj" in am.status_table()
    text = peftlab.card(am, "a")
    n = am.num_parameters("a")
    assert n == 2 * (4 * (32 + 32) + 4 * (32 + 16))   # 2 layers; q: 32→32, v: 32→16 (2 kv heads × 8)
    for needle in ("attn.q ×2", "attn.v ×2", "lowrank", "weight-delta", "mergeable             yes",
                   f"{n:,}", "active, frozen, merged"):
        assert needle in text, needle


def test_an_adapter_added_to_a_model_in_eval_mode_runs_without_dropout():
    """Modules are built in training mode; a delta joining an eval-mode model takes its mode, so
    LoRA dropout does not fire at inference (two forwards agree and match the merged model)."""
    import torch
    from torch import nn

    import peftlab
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    am = peftlab.adapt(model)
    am.add_adapter("a", peftlab.LoraConfig(targets="all-linear", r=4, dropout=0.5, init="random"))
    am.set_active("a")
    x = torch.randn(8, 16)
    first, second = am(x), am(x)
    assert torch.equal(first, second)
    am.merge("a")
    torch.testing.assert_close(am(x), first, rtol=1e-5, atol=1e-5)
    am.unmerge("a")
    am.train()
    assert all(m.training for m in am.modules())
