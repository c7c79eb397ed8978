"""Role maps and default targets of encoder-decoders, speech, DeBERTa-v2 and state-space models
(issue 22, items 6 and 7): with the methods' default targets, a fresh adapter is a no-op,
gradients reach every adapter tensor, merged equals unmerged; Whisper's `all-linear` leaves its
tied output projection out; Mamba's roles show in `describe_sites` and the adapter's card."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import transformers as tf
from method_checks import QUIET, perturb

import peftlab
from peftlab.core.probe import DeadSiteWarning
from peftlab.core.sites import describe_sites

pytestmark = QUIET
VOCAB = 64


def whisper() -> tf.WhisperForConditionalGeneration:
    torch.manual_seed(0)
    return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[]))


def deberta_v2() -> tf.DebertaV2ForSequenceClassification:
    torch.manual_seed(0)
    return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, num_labels=3))


def t5() -> tf.T5ForConditionalGeneration:
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0))


def bart() -> tf.BartForConditionalGeneration:
    torch.manual_seed(0)
    return tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None))


def mamba() -> tf.MambaForCausalLM:
    torch.manual_seed(0)
    return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                              state_size=4, expand=2))


def mamba2() -> tf.Mamba2ForCausalLM:
    torch.manual_seed(0)
    return tf.Mamba2ForCausalLM(tf.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                state_size=4, expand=2, num_heads=8, head_dim=8,
                                                n_groups=1, chunk_size=4))


def falcon_mamba() -> tf.FalconMambaForCausalLM:
    torch.manual_seed(0)
    return tf.FalconMambaForCausalLM(tf.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32,
                                                          num_hidden_layers=2, state_size=4, expand=2))


def inputs_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    if model.config.model_type == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": ids[:, :4]}
    if model.config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "whisper": whisper, "deberta-v2": deberta_v2, "t5": t5, "bart": bart, "mamba": mamba, "mamba2": mamba2,
    "falcon_mamba": falcon_mamba}
CONFIGS = {"lora": lambda: peftlab.LoraConfig(r=4), "ia3": lambda: peftlab.IA3Config()}
PERTURB = {"lora": dict(scale=0.2), "ia3": dict(scale=0.2, offset=1.0)}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits and the last hidden state, flat (a classifier's logits are tiny at init)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    last = (out.decoder_hidden_states if "decoder_hidden_states" in out else out.hidden_states)[-1]
    return torch.cat([out.logits.flatten(), last.flatten()])


def check_adapter(build: Callable[[], torch.nn.Module], config, perturbation: dict) -> peftlab.AdaptedModel:
    """Fresh adapter: the base's outputs bit for bit. Perturbed: outputs move, every adapter tensor
    gets a nonzero gradient after one backward, merged and unmerged agree within 1e-5."""
    model = build().eval()
    inputs = inputs_for(model)
    base = outputs(model, inputs)
    am = peftlab.adapt(model)
    am.add_adapter("a", config)
    am.set_active("a")
    assert torch.equal(outputs(am, inputs), base)
    perturb(am, "a", scale=perturbation["scale"], offset=perturbation.get("offset", 0.0))
    adapted = outputs(am, inputs)
    assert (adapted - base).abs().max() > 1e-3
    am.set_trainable("a")
    am.train()
    am(**inputs).logits.pow(2).mean().backward()
    am.eval()
    for key, p in zip(am.adapter_tensors("a"), am.adapter_parameters("a"), strict=True):
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reached {key}"
    am.merge("a")
    torch.testing.assert_close(outputs(am, inputs), adapted, rtol=0, atol=1e-5)
    am.unmerge("a")
    torch.testing.assert_close(outputs(am, inputs), adapted, rtol=0, atol=1e-5)
    return am


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_default_targets_work(family: str, method: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadSiteWarning)     # the defaults name only live layers
        am = check_adapter(BUILDERS[family], CONFIGS[method](), PERTURB[method])
    assert am.adapter("a").sites


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba"])
def test_ssm_defaults_are_the_families_own(family: str) -> None:
    am = peftlab.adapt(BUILDERS[family]())
    lora = am.add_adapter("l", peftlab.LoraConfig())
    ia3 = am.add_adapter("i", peftlab.IA3Config())
    assert {s.role for s in lora.sites} == {s.role for s in ia3.sites} == {"ssm.in", "ssm.out"}
    assert lora.config.targets == ["ssm.in", "ssm.out"]       # the adapter records what it used
    assert {s.role for s in ia3.sites if ia3.config.scales_input(s)} == {"ssm.out"}
    # a user's own targets are kept as given (Mamba2 has no x_proj: its dt, B, C come from in_proj)
    own = peftlab.LoraConfig(targets=["ssm.in"] if family == "mamba2" else ["ssm.x"])
    assert [s.role for s in am.add_adapter("x", own).sites] == own.targets * 2
    assert "ssm.in" in am.card("l") and "ssm.out" in am.card("l")


def test_mamba_roles_are_described() -> None:
    roles = describe_sites(mamba())
    for role, leaf in {"ssm.in": "in_proj", "ssm.x": "x_proj", "ssm.dt": "dt_proj",
                       "ssm.out": "out_proj", "ssm.conv": "conv1d"}.items():
        assert roles[role] == [f"backbone.layers.{i}.mixer.{leaf}" for i in range(2)]
    assert "attn.o" not in roles


def test_deberta_v2_roles() -> None:
    roles = describe_sites(deberta_v2())
    assert roles["attn.q"] == [f"deberta.encoder.layer.{i}.attention.self.query_proj" for i in range(2)]
    assert roles["attn.v"] == [f"deberta.encoder.layer.{i}.attention.self.value_proj" for i in range(2)]
    assert roles["ffn.down"] == [f"deberta.encoder.layer.{i}.output.dense" for i in range(2)]


def test_whisper_all_linear_leaves_the_tied_output_projection_out() -> None:
    am = peftlab.adapt(whisper())
    paths = {s.path for s in am.add_adapter("a", peftlab.LoraConfig(targets="all-linear")).sites}
    assert "proj_out" not in paths and len(paths) == 32       # 2 × (4 + 2) enc + 2 × (8 + 2) dec
    am.set_active("a")
    perturb(am, "a", scale=0.2)
    inputs = inputs_for(am.model)
    adapted = outputs(am, inputs)
    am.merge("a")                                             # nothing tied among the sites
    torch.testing.assert_close(outputs(am, inputs), adapted, rtol=0, atol=1e-5)
    am.unmerge("a")
    # asked explicitly, the output projection is a site
    assert [s.path for s in am.add_adapter("b", peftlab.LoraConfig(targets=["proj_out"])).sites] == ["proj_out"]


def test_all_linear_leaves_out_an_untied_output_embedding_too() -> None:
    """get_output_embeddings() is left out whatever its role: a Llama whose head is not tied."""
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               tie_word_embeddings=False))
    am = peftlab.adapt(model)
    assert "lm_head" not in {s.path for s in am.add_adapter("a", peftlab.LoraConfig(targets="all-linear")).sites}


def test_inspect_prints_the_ssm_roles(tmp_path, capsys) -> None:
    from peftlab.apps.cli import main
    mamba().save_pretrained(tmp_path / "mamba")
    assert main(["inspect", "--model", str(tmp_path / "mamba")]) == 0
    out = capsys.readouterr().out
    assert "MambaForCausalLM" in out and "architecture map: mamba" in out
    for role, leaf in {"ssm.in": "in_proj", "ssm.dt": "dt_proj", "ssm.conv": "conv1d"}.items():
        assert f"backbone.layers.{{0-1}}.mixer.{leaf}" in out
        assert any(line.split()[:2] == [role, "2"] for line in out.splitlines())


def test_mamba_lora_on_what_peft_bars_is_saved_without_peft_files(tmp_path):
    """peft refuses LoRA on a Mamba's out_proj / conv1d: such an adapter is saved in peftlab's
    format only (a peft directory would fail to load there), export says why, and the same
    adapter without out_proj is a peft directory that peft loads with equal logits."""
    from peft import PeftModel

    from peftlab.core.errors import CapabilityError
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    am = peftlab.adapt(mamba())
    am.add_adapter("both", peftlab.LoraConfig(r=2, init="random"))          # ssm.in + ssm.out
    am.add_adapter("inner", peftlab.LoraConfig(r=2, init="random", targets=["ssm.in"]))
    with pytest.raises(CapabilityError, match=r"peft refuses LoRA on conv1d, out_proj of mamba models"):
        peftlab.export_peft(am, "both", tmp_path / "peft")
    am.save_adapter(tmp_path / "both", "both")
    assert not (tmp_path / "both" / "adapter_config.json").exists()
    again = peftlab.adapt(mamba())
    again.load_adapter(tmp_path / "both", "both")
    am.set_active("both")
    again.set_active("both")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, am(input_ids=ids).logits)
    am.save_adapter(tmp_path / "inner", "inner")
    am.set_active("inner")
    peft_model = PeftModel.from_pretrained(mamba(), str(tmp_path / "inner")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, am(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
