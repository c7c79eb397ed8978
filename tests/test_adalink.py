"""AdaLink: low-rank residual modules on the input embedding, routed by token group."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab.methods.adalink import AdaLinkConfig

from conftest import BUILDERS, VOCAB, logits, tiny_bert, tiny_gpt2, tiny_llama
from method_checks import (adapter_and_other, assert_fresh_adapter_is_base, assert_save_load_bit_exact,
                           assert_trainable_is_exactly, check_training, labels_for, with_adapter)

EMBED = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "bert": "bert.embeddings.word_embeddings"}
GROUPS = {"text": list(range(1, 40)), "image": list(range(60, 80))}   # the rest: "default"


def delta_of(am, arch, name):
    return am.model.get_submodule(EMBED[arch]).deltas[name]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("groups", [{}, GROUPS])
def test_fresh_adapter_is_bit_identical_to_base(arch, groups, ids):
    assert_fresh_adapter_is_base(BUILDERS[arch], AdaLinkConfig(r=3, groups=groups, activation="gelu"), ids)


BLOCK0 = {"llama": "model.layers.0", "gpt2": "transformer.h.0", "bert": "bert.encoder.layer.0"}


def block0_input(model, arch, ids):
    """What the first transformer block receives (its hidden_states argument)."""
    seen = []
    block = (model.model if isinstance(model, peftlab.AdaptedModel) else model).get_submodule(BLOCK0[arch])
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("groups", [{}, GROUPS])
def test_acts_on_the_input_of_block_0(arch, groups, ids):
    """The paper's AdaLink: block 0 receives h + φ(h D_g) U_g, h what it receives without the
    adapter (BERT: after position/type embeddings and the embedding LayerNorm; GPT-2: wte + wpe)."""
    model = BUILDERS[arch]()
    h = block0_input(model, arch, ids)
    e = F.embedding(ids, model.get_input_embeddings().weight.detach())
    assert (h - e).abs().max() > 1e-3 if arch != "llama" else torch.equal(h, e)
    am = peftlab.adapt(model)
    am.add_adapter("a", AdaLinkConfig(r=3, activation="tanh", init="random", groups=groups))
    am.set_active("a")
    d = delta_of(am, arch, "a")
    names = am.adapters["a"].config.group_names()
    g = torch.zeros_like(ids)
    for k, name in enumerate(names[1:], start=1):
        g[torch.isin(ids, torch.tensor(GROUPS[name]))] = k
    expected = h + torch.einsum("btr,btrd->btd", torch.tanh(torch.einsum("btd,btdr->btr", h, d.D[g])), d.U[g])
    got = block0_input(am, arch, ids)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert (got - h).abs().max() > 1e-3
    if arch != "llama":      # the token embedding's own output is left as it was
        with torch.no_grad():
            assert torch.equal(am.get_input_embeddings()(ids), e)
    with am.disabled():
        assert torch.equal(block0_input(am, arch, ids), h)
    am.set_active([])
    assert torch.equal(block0_input(am, arch, ids), h)


def test_bert_placement_embed_is_the_token_embedding_and_differs(ids):
    """placement='embed' (the placement before embed.out) acts before the position embeddings
    and the LayerNorm: a different block-0 input from the default's."""
    model = tiny_bert()
    am = peftlab.adapt(model)
    am.add_adapter("new", AdaLinkConfig(r=3, init="random"))
    am.add_adapter("old", AdaLinkConfig(r=3, init="random", placement="embed"))
    d_new, d_old = delta_of(am, "bert", "new"), delta_of(am, "bert", "old")
    with torch.no_grad():
        d_old.D.copy_(d_new.D)
        d_old.U.copy_(d_new.U)
    am.set_active("new")
    at_block = block0_input(am, "bert", ids)
    am.set_active("old")
    at_embedding = block0_input(am, "bert", ids)
    assert (at_block - at_embedding).abs().max() > 1e-3
    assert AdaLinkConfig.from_dict({"r": 3}).placement == "embed"    # adapters saved before embed.out
    assert AdaLinkConfig().placement == "embed.out"


def test_block_input_placement_refuses_merge_and_unknown_families():
    am = peftlab.adapt(tiny_bert())
    am.add_adapter("a", AdaLinkConfig(init="random"))
    am.set_active("a")
    E = am.model.bert.embeddings.word_embeddings.base_layer.weight.detach().clone()
    with pytest.raises(peftlab.CapabilityError, match="placement='embed'"):
        am.merge("a")
    assert torch.equal(am.model.bert.embeddings.word_embeddings.base_layer.weight, E)
    # Granite multiplies the embeddings inside its forward: no module outputs block 0's input
    from transformers import GraniteConfig, GraniteForCausalLM
    granite = peftlab.adapt(GraniteForCausalLM(GraniteConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, embedding_multiplier=3.0)))
    with pytest.raises(peftlab.ConfigError, match="placement='embed'"):
        granite.add_adapter("a", AdaLinkConfig())
    assert not granite.adapters and not any(isinstance(m, peftlab.AdaptedLayer) for m in granite.model.modules())
    granite.add_adapter("a", AdaLinkConfig(placement="embed"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_matches_hand_computation_and_disable_gives_base(arch, ids):
    model = BUILDERS[arch]()
    base = logits(model, ids)
    E = model.get_input_embeddings().weight.detach().clone()
    am = peftlab.adapt(model)
    am.add_adapter("a", AdaLinkConfig(r=3, activation="tanh", init="random", placement="embed"))
    am.set_active("a")
    d = delta_of(am, arch, "a")
    assert tuple(d.D.shape) == (1, 32, 3) and tuple(d.U.shape) == (1, 3, 32)
    e = F.embedding(ids, E)
    expected = e + torch.tanh(e @ d.D[0]) @ d.U[0]
    with torch.no_grad():
        torch.testing.assert_close(am.get_input_embeddings()(ids), expected)
    assert (logits(am, ids) - base).abs().max() > 1e-4
    with am.disabled():
        assert torch.equal(logits(am, ids), base)


def test_groups_route_tokens_to_their_own_module():
    model = tiny_llama()
    E = model.model.embed_tokens.weight.detach().clone()
    am = peftlab.adapt(model)
    am.add_adapter("g", AdaLinkConfig(r=2, activation="relu", groups=GROUPS))
    am.set_active("g")
    d = delta_of(am, "llama", "g")
    names = am.adapters["g"].config.group_names()
    assert names == ["default", "image", "text"]
    assert tuple(d.D.shape) == (3, 32, 2) and tuple(d.U.shape) == (3, 2, 32)
    text, image, default = torch.tensor([1, 5, 39]), torch.tensor([60, 70, 79]), torch.tensor([0, 40, 95])
    ids = torch.cat([text, image, default])[None]
    emb = am.get_input_embeddings()
    with torch.no_grad():
        assert torch.equal(emb(ids), F.embedding(ids, E))
        d.U[names.index("image")].uniform_(-1, 1)     # only the image module is non-zero
        out = emb(ids)[0]
    e = E[ids[0]]
    assert torch.equal(out[:3], e[:3]) and torch.equal(out[6:], e[6:])   # text, default: unaffected
    g = names.index("image")
    torch.testing.assert_close(out[3:6], e[3:6] + F.relu(e[3:6] @ d.D[g]) @ d.U[g])
    assert (out[3:6] - e[3:6]).abs().max() > 1e-3
    # every group non-zero: each token uses its own group's module
    with torch.no_grad():
        d.U.uniform_(-1, 1)
        out = emb(ids)[0]
    for rows, name in ((slice(0, 3), "text"), (slice(3, 6), "image"), (slice(6, 9), "default")):
        k = names.index(name)
        torch.testing.assert_close(out[rows], e[rows] + F.relu(e[rows] @ d.D[k]) @ d.U[k])


def untied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [untied_llama, tiny_bert])
def test_merge_equals_unmerged(build, ids):
    model = build()
    E = model.get_input_embeddings().weight.detach().clone()
    am = peftlab.adapt(model)
    # BERT's block-0 input is past the LayerNorm: only its token-embedding placement merges
    am.add_adapter("a", AdaLinkConfig(r=4, init="random", placement="embed" if build is tiny_bert else "embed.out"))
    am.set_active("a")
    unmerged = logits(am, ids)
    am.merge("a")
    assert not torch.equal(model.get_input_embeddings().base_layer.weight, E)
    torch.testing.assert_close(logits(am, ids), unmerged, atol=1e-5, rtol=0)
    am.unmerge("a")
    torch.testing.assert_close(model.get_input_embeddings().base_layer.weight, E, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(am, ids), unmerged, atol=1e-5, rtol=0)
    plain = am.merge_and_unload()
    torch.testing.assert_close(logits(plain, ids), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields,match", [({"activation": "gelu"}, "not the identity"),
                                          ({"groups": {"x": [3]}}, "token-group")])
def test_merge_refused_when_not_linear_or_grouped(fields, match):
    model = untied_llama()
    E = model.model.embed_tokens.weight.detach().clone()
    am = peftlab.adapt(model)
    am.add_adapter("a", AdaLinkConfig(init="random", **fields))
    am.set_active("a")
    with pytest.raises(peftlab.CapabilityError, match=match):
        am.merge("a")
    assert torch.equal(am.model.model.embed_tokens.base_layer.weight, E)
    assert not am.adapters["a"].merged


def test_tied_embedding_refuses_merge():
    am = peftlab.adapt(tiny_gpt2())
    am.add_adapter("a", AdaLinkConfig(init="random"))
    am.set_active("a")
    with pytest.raises(peftlab.CapabilityError, match="tied"):
        am.merge("a")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_changes_only_adapter_and_lowers_loss(arch, ids):
    am = adapter_and_other(BUILDERS[arch], AdaLinkConfig(r=4, groups={"g": [1, 2, 3]}),
                           AdaLinkConfig(r=2, init="random"))
    assert_trainable_is_exactly(am, "a")
    # eval mode: no dropout, so the losses compare exactly
    check_training(am, "a", ids, labels_for(am, ids), others=["other"], steps=4, lr=2e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_save_load_is_bit_exact(arch, tmp_path, ids):
    am = with_adapter(BUILDERS[arch], "a",
                      AdaLinkConfig(r=3, activation="gelu", groups=GROUPS, init="random"))
    saved, _ = assert_save_load_bit_exact(am, "a", BUILDERS[arch], tmp_path, ids)
    assert saved.keys() == {(EMBED[arch], "D"), (EMBED[arch], "U")}


@pytest.mark.parametrize("fields,match", [
    ({"r": 0}, "rank"),
    ({"r": True}, "rank"),
    ({"activation": "swish"}, "activation"),
    ({"init": "ones"}, "init"),
    ({"groups": [1, 2]}, "dict"),
    ({"groups": {"default": [1]}}, "reserved"),
    ({"groups": {"a": []}}, "at least one"),
    ({"groups": {"a": [1, -2]}}, "integers"),
    ({"groups": {"a": [1, 2], "b": [2]}}, "one group"),
    ({"targets": []}, "targets"),
])
def test_config_errors(fields, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        AdaLinkConfig(**fields).validate()


def test_site_errors_leave_model_unchanged():
    am = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.ConfigError, match="outside the vocabulary"):
        am.add_adapter("a", AdaLinkConfig(groups={"a": [VOCAB]}))
    with pytest.raises(peftlab.ConfigError, match="cannot attach"):
        am.add_adapter("a", AdaLinkConfig(targets=["attn.q"]))
    assert not am.adapters
    assert not any(isinstance(m, peftlab.AdaptedLayer) for m in am.model.modules())
