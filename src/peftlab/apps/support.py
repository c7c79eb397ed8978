"""The support matrix: which model families each main method works on, computed by running it.

`FAMILIES` builds ≥ 30 architectures from transformers configs (2 layers, hidden 32, a 64-token
vocabulary, seeded; nothing is downloaded) plus a plain Conv2d net, each with a tiny input.
`COLUMNS` are LoRA, IA3 and prompt tuning with their default targets, and LoRA and IA3 on
`all-linear`. For every family × column, `check_cell` attaches a fresh adapter to a copy of the
family's model and checks, in order:

1. a fresh adapter is a no-op: the output equals the base's bit for bit (prompt tuning, which
   lengthens the input, instead checks that `disabled()` gives the base's output);
2. after seeded noise on every adapter tensor and one backward, every adapter parameter has a
   nonzero gradient;
3. merged == unmerged within 1e-5 (relative to the output's scale), where the method merges;
4. save → load (the default format, into a temporary directory, loaded on a fresh copy of the
   base): the same tensors and the same output bit for bit;
5. the saved directory, where it holds peft's files, loads in peft (`PeftModel.from_pretrained`)
   with the same output within 1e-5; where it does not, the note says why (the reason the save
   recorded).

A cell is `ok`, `refused: <reason>` (adding the adapter raised a PeftlabError: the method does
not apply, and the reason says why) or `FAIL: <what>` (a check failed, or something raised that
is not a PeftlabError). The text holds no timings, addresses or measured numbers, so
`render_matrix` gives the same document on every run (`peftlab support`, docs/support.md).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import PeftlabError, PeftlabWarning
from ..core.method import Capability, MethodConfig
from ..core.model import AdaptedModel, adapt

VOCAB = 64
BATCH, LENGTH = 2, 7
TOLERANCE = 1e-5          # merged vs unmerged and peft vs peftlab, relative to max(1, |output|)
NOISE = 0.05              # the scale of the seeded noise put on adapter tensors before the backward


# ---- families ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family: how to build its tiny model (seeded by the caller) and its input."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    # targets for the default-target columns where the methods' defaults name roles the family
    # does not have (a plain CNN has no attention or feed-forward): its own layers instead
    targets: tuple[str, ...] | None = None


def _ids(g: torch.Generator, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (BATCH, LENGTH), generator=g)


def _text(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(g)}


def _seq2seq(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(g), "decoder_input_ids": _ids(g)}


def _pixels(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}


def _whisper(g: torch.Generator) -> dict[str, torch.Tensor]:
    # 8 mel bins × 2·max_source_positions frames (the encoder's two convolutions halve them)
    return {"input_features": torch.randn(BATCH, 8, 32, generator=g), "decoder_input_ids": _ids(g)}


def _clip(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_text(g), **_pixels(g)}


# shared config fields of the decoder LMs: 2 layers, hidden 32, 4 heads (2 key/value heads)
_LM = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# special tokens inside the tiny vocabulary (some configs default to ids of their real vocabulary)
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "num_labels": 3}


def _hf(model_class: str, config_class: str, **config: Any) -> Callable[[], nn.Module]:
    """A builder of transformers' `model_class` from `config_class(**config)` (imported on use)."""
    def build() -> nn.Module:
        import transformers
        cfg = getattr(transformers, config_class)(**config)
        return getattr(transformers, model_class)(cfg)
    return build


def _clip_model() -> nn.Module:
    import transformers
    text = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "projection_dim": 16,
            "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8, "projection_dim": 16}
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=16))


class SmallConvNet(nn.Module):
    """A plain CNN (no transformers): two 3×3 convolutions, pooling, a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.classifier = nn.Linear(8, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(pixel_values))
        h = torch.relu(self.conv2(h))
        return self.classifier(h.mean(dim=(2, 3)))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_LM), _text),
    Family("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_LM), _text),
    Family("qwen3", _hf("Qwen3ForCausalLM", "Qwen3Config", **_LM, head_dim=8), _text),
    Family("mistral", _hf("MistralForCausalLM", "MistralConfig", **_LM), _text),
    Family("mixtral", _hf("MixtralForCausalLM", "MixtralConfig", **_LM, num_local_experts=4,
                          num_experts_per_tok=2), _text),
    Family("qwen3-moe", _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_LM, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1),
           _text),
    Family("phi", _hf("PhiForCausalLM", "PhiConfig", **_LM), _text),
    Family("phi3", _hf("Phi3ForCausalLM", "Phi3Config", **_LM, **_TOKENS), _text),
    Family("gemma", _hf("GemmaForCausalLM", "GemmaConfig", **_LM, head_dim=8), _text),
    Family("gemma2", _hf("Gemma2ForCausalLM", "Gemma2Config", **_LM, head_dim=8), _text),
    Family("gemma3", _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **_LM, head_dim=8), _text),
    Family("olmo2", _hf("Olmo2ForCausalLM", "Olmo2Config", **_LM, **_TOKENS), _text),
    Family("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                       n_positions=64, **_TOKENS), _text),
    Family("gpt-neox", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=32,
                           intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64), _text),
    Family("gpt-j", _hf("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                        n_positions=64, rotary_dim=4), _text),
    Family("falcon", _hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4), _text),
    Family("bloom", _hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                        n_head=4), _text),
    Family("opt", _hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32, ffn_dim=48,
                      num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                      max_position_embeddings=64), _text),
    Family("t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8,
                     d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0), _seq2seq),
    Family("bart", _hf("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=32,
                       encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                       max_position_embeddings=64), _seq2seq),
    Family("whisper", _hf("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=VOCAB, d_model=32,
                          encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                          num_mel_bins=8, max_source_positions=16, max_target_positions=64,
                          decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          suppress_tokens=[], begin_suppress_tokens=[]), _whisper),
    Family("bert", _hf("BertForSequenceClassification", "BertConfig", **_ENCODER), _text),
    Family("roberta", _hf("RobertaForSequenceClassification", "RobertaConfig", **_ENCODER, pad_token_id=1),
           _text),
    Family("distilbert", _hf("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB,
                             dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64,
                             num_labels=3), _text),
    Family("deberta-v2", _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", **_ENCODER), _text),
    Family("vit", _hf("ViTForImageClassification", "ViTConfig", hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8,
                      num_labels=3), _pixels),
    Family("clip", _clip_model, _clip),
    Family("mamba", _hf("MambaForCausalLM", "MambaConfig", vocab_size=VOCAB, hidden_size=32, state_size=4,
                        num_hidden_layers=2, expand=2, use_mambapy=False), _text),
    Family("mamba2", _hf("Mamba2ForCausalLM", "Mamba2Config", vocab_size=VOCAB, hidden_size=32,
                         state_size=4, num_hidden_layers=2, expand=2, num_heads=8, head_dim=8, n_groups=1,
                         chunk_size=8), _text),
    # beyond issue 22's list: more layouts seen in the wild (fused Linear qkv with multi-query
    # attention, Wqkv / Wi / Wo naming, a shared expert beside the routed ones)
    Family("gpt-bigcode", _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_embd=32,
                              n_layer=2, n_head=4, n_positions=64, **_TOKENS), _text),
    Family("starcoder2", _hf("Starcoder2ForCausalLM", "Starcoder2Config", **_LM, **_TOKENS), _text),
    Family("stablelm", _hf("StableLmForCausalLM", "StableLmConfig", **_LM, **_TOKENS), _text),
    Family("granite", _hf("GraniteForCausalLM", "GraniteConfig", **_LM, **_TOKENS), _text),
    Family("cohere", _hf("CohereForCausalLM", "CohereConfig", **_LM, **_TOKENS), _text),
    Family("qwen2-moe", _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_LM, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16), _text),
    Family("mpt", _hf("MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2,
                      max_seq_len=64), _text),
    Family("codegen", _hf("CodeGenForCausalLM", "CodeGenConfig", vocab_size=VOCAB, n_embd=32, n_layer=2,
                          n_head=4, n_positions=64, rotary_dim=4, **_TOKENS), _text),
    Family("electra", _hf("ElectraForSequenceClassification", "ElectraConfig", **_ENCODER,
                          embedding_size=32), _text),
    Family("modernbert", _hf("ModernBertForSequenceClassification", "ModernBertConfig", **_ENCODER,
                             **_TOKENS, cls_token_id=1, sep_token_id=2), _text),
    Family("conv2d-net", SmallConvNet, _pixels, targets=("conv1", "conv2")),
)}


# ---- columns -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of the matrix: a method's config with its default targets (or the family's
    own, `Family.targets`) or `all-linear`."""

    name: str
    config_class: type[MethodConfig]
    all_linear: bool = False
    fields: tuple[tuple[str, Any], ...] = ()

    def config(self, family: Family) -> MethodConfig:
        targets = ("all-linear" if self.all_linear else
                   list(family.targets) if family.targets and self.config_class.method != "prompt"
                   else None)
        return self.config_class(**dict(self.fields), **({"targets": targets} if targets else {}))


def _columns() -> tuple[Column, ...]:
    from ..methods.ia3 import IA3Config
    from ..methods.lora import LoraConfig
    from ..methods.prompt_tuning import PromptTuningConfig
    return (Column("lora", LoraConfig), Column("lora all-linear", LoraConfig, all_linear=True),
            Column("ia3", IA3Config), Column("ia3 all-linear", IA3Config, all_linear=True),
            Column("prompt", PromptTuningConfig, fields=(("num_virtual_tokens", 4),)))


COLUMN_NAMES = ("lora", "lora all-linear", "ia3", "ia3 all-linear", "prompt")


# ---- cells ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One family × column result: status "ok", "refused" or "FAIL", with why (`detail`), the
    sites and trainable parameters of the adapter and notes (peft export not written, warnings)."""

    status: str
    detail: str = ""
    sites: int = 0
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


class CheckFailed(Exception):
    """A check of a cell failed; the message says which and how."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_STRING_SET = re.compile(r"\{'[^'{}]*'(?:, '[^'{}]*')+\}")     # a printed set of strings: {'a', 'b'}


def _clean(message: object, limit: int = 240) -> str:
    """One line of an error message without memory addresses and with printed sets of strings
    sorted (their order changes from run to run): the document must not change."""
    line = _ADDRESS.sub("", " ".join(str(message).split()))
    line = _STRING_SET.sub(lambda m: "{" + ", ".join(sorted(m.group()[1:-1].split(", "))) + "}", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a family's forward is judged by: the logits (CLIP: logits per image) or the
    tensor a plain module returns."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "logits_per_image"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise CheckFailed(f"the forward returned {type(out).__name__} without logits")


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor], grad: bool = False) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return output_tensor(model(**inputs))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.detach().abs().max()))
    return bool((a.detach() - b.detach()).abs().max() <= TOLERANCE * scale)


@dataclass
class FamilyModel:
    """A family's base model, built once (seeded) and copied for each check, with its input and
    the base output."""

    family: Family
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    base: torch.Tensor

    @classmethod
    def build(cls, family: Family, seed: int = 0) -> FamilyModel:
        torch.manual_seed(seed)
        model = family.build().eval()
        inputs = family.inputs(torch.Generator().manual_seed(seed + 1))
        return cls(family, model, inputs, _forward(model, inputs))

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)


def _noise(am: AdaptedModel, name: str, seed: int = 0) -> None:
    """Seeded noise on every adapter tensor, so that no factor is zero (LoRA's B starts at zero,
    which would leave A without gradient) and the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in am.adapter_tensors(name).values():
            if t.is_floating_point():
                t.add_(NOISE * torch.randn(t.shape, generator=g, dtype=t.dtype))


def _check_gradients(am: AdaptedModel, fm: FamilyModel) -> None:
    am.set_trainable("a")
    loss = _forward(am, fm.inputs, grad=True).float().square().mean()
    loss.backward()
    dead = [f"{path}.{pname}" for path, part in am.adapter("a").parts().items()
            for pname, p in part.named_parameters()
            if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    if dead:
        more = f" (+{len(dead) - 3} more)" if len(dead) > 3 else ""
        raise CheckFailed(f"no gradient reaches {len(dead)} adapter tensor(s): "
                          f"{', '.join(dead[:3])}{more}")
    am.zero_grad(set_to_none=True)
    am.set_trainable(None)


def _check_merge(am: AdaptedModel, fm: FamilyModel) -> None:
    unmerged = _forward(am, fm.inputs)
    try:
        am.merge("a")
    except PeftlabError as e:
        raise CheckFailed(f"merge refused: {_clean(e)}") from None
    if not _close(_forward(am, fm.inputs), unmerged):
        raise CheckFailed("merged output differs from unmerged (> 1e-5)")
    am.unmerge("a")
    if not _close(_forward(am, fm.inputs), unmerged):
        raise CheckFailed("output after unmerge differs from before merge (> 1e-5)")


def _check_save_load(am: AdaptedModel, fm: FamilyModel, directory: Path) -> None:
    expected = _forward(am, fm.inputs)
    am.save_adapter(directory, "a")
    fresh = adapt(fm.fresh())
    fresh.load_adapter(directory, "a")
    fresh.set_active("a")
    saved, loaded = am.adapter_tensors("a"), fresh.adapter_tensors("a")
    if saved.keys() != loaded.keys() or not all(torch.equal(saved[k], loaded[k]) for k in saved):
        raise CheckFailed("reloaded adapter tensors differ from the saved ones")
    if not torch.equal(_forward(fresh, fm.inputs), expected):
        raise CheckFailed("output after save → load differs (not bit-exact)")


def _check_peft(am: AdaptedModel, fm: FamilyModel, directory: Path, cell: Cell) -> None:
    """peft loads the saved directory with the same output; where the save wrote no peft files,
    a note gives the reason it recorded."""
    if not (directory / "adapter_config.json").exists():
        record = json.loads((directory / "peftlab.json").read_text())
        why = record.get("interchange", {}).get("peft", {}).get("why_not", "no peft files written")
        cell.notes.append(f"no peft export: {_clean(why)}")
        return
    import peft
    ours = _forward(am, fm.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(fm.fresh(), str(directory)).eval()
        theirs = _forward(peft_model, fm.inputs)
    extra = theirs.shape[1] - ours.shape[1] if theirs.ndim >= 2 and ours.ndim >= 2 else 0
    if extra > 0 and theirs.shape[0] == ours.shape[0]:
        theirs = theirs[:, extra:]     # peft keeps the virtual tokens' logits; ours drops them
    if not _close(theirs, ours):
        raise CheckFailed("peft's output from the exported adapter differs (> 1e-5)"
                          if theirs.shape == ours.shape else
                          f"peft's output is {list(theirs.shape)}, ours {list(ours.shape)}")


def check_cell(fm: FamilyModel, column: Column) -> Cell:
    """Run the checks of the module docstring for one family × column."""
    am = adapt(fm.fresh())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            am.add_adapter("a", column.config(fm.family))
    except PeftlabError as e:
        return Cell("refused", _clean(e))
    except Exception as e:  # noqa: BLE001 - any other exception is the finding this cell reports
        return Cell("FAIL", f"add_adapter raised {type(e).__name__}: {_clean(e)}")
    adapter = am.adapter("a")
    cell = Cell("ok", sites=len(adapter.sites),
                trainable=sum(p.numel() for p in adapter.parameters()))
    cell.notes.extend(sorted({f"warning: {_clean(w.message)}" for w in caught
                              if issubclass(w.category, PeftlabWarning)}))
    try:
        _run_checks(am, fm, adapter.method.supports(Capability.MERGE), cell)
    except CheckFailed as e:
        cell.status, cell.detail = "FAIL", str(e)
    except Exception as e:  # noqa: BLE001 - any other exception is the finding this cell reports
        cell.status, cell.detail = "FAIL", f"{type(e).__name__}: {_clean(e)}"
    return cell


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """Any exception but a CheckFailed inside becomes one naming the check it broke."""
    try:
        yield
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any other exception is the finding this cell reports
        raise CheckFailed(f"{name} raised {type(e).__name__}: {_clean(e)}") from None


def _run_checks(am: AdaptedModel, fm: FamilyModel, merges: bool, cell: Cell) -> None:
    am.set_active("a")
    lengthens = am.adapter("a").hook is not None      # prompt-style: a new sequence, not a no-op
    with _stage("the forward"):
        if lengthens:
            with am.disabled():
                if not torch.equal(_forward(am, fm.inputs), fm.base):
                    raise CheckFailed("disabled() output differs from the base model's")
        elif not torch.equal(_forward(am, fm.inputs), fm.base):
            raise CheckFailed("a fresh adapter changes the output (not a no-op)")
    _noise(am, "a")
    with _stage("the backward"):
        _check_gradients(am, fm)
    if merges:
        with _stage("merge / unmerge"):
            _check_merge(am, fm)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "a"
        with _stage("save → load"):
            _check_save_load(am, fm, directory)
        with _stage("loading the saved adapter in peft"):
            _check_peft(am, fm, directory, cell)


def family_row(name: str) -> dict[str, Cell]:
    """Column name -> Cell for family `name` (its model built once, copied per check)."""
    family = FAMILIES[name]
    with warnings.catch_warnings():
        # transformers' and torch's own warnings on the tiny models are not findings here
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            fm = FamilyModel.build(family)
        except Exception as e:  # noqa: BLE001 - a family that does not build is a finding
            failed = Cell("FAIL", f"building the model raised {type(e).__name__}: {_clean(e)}")
            return {c: failed for c in COLUMN_NAMES}
        return {c.name: check_cell(fm, c) for c in _columns()}


def support_matrix(names: Iterable[str] | None = None) -> dict[str, dict[str, Cell]]:
    """Family -> column -> Cell for `names` (default: every family)."""
    return {n: family_row(n) for n in (FAMILIES if names is None else names)}


# ---- rendering -----------------------------------------------------------------------------------
_HEADER = """# Model support

Generated by `peftlab support --format markdown` (`peftlab.apps.support`); `tests/test_support_matrix.py`
regenerates it and compares. Each family is built from its transformers config (2 layers, hidden 32,
a {vocab}-token vocabulary; nothing downloaded). Each cell checks: a fresh adapter is a no-op
(prompt tuning: `disabled()` is the base), every adapter tensor gets a gradient, merged == unmerged
(1e-5, where the method merges), save → load is bit-exact, and peft loads the saved directory with
the same output (1e-5). **ok**: passed all; **refused**: adding the adapter raised a
PeftlabError, whose reason is in the notes (the test accepts it only where the method does not
apply); **FAIL**: the note names the check that failed. The number after the status is the
adapter's trainable parameters; numbers in brackets refer to the notes. Default targets are the
method's (LoRA: attn.q, attn.v; IA3: attn.k, attn.v, ffn.down; prompt tuning: the input
embedding, 4 virtual tokens), except where a family lacks those roles and names its own
(conv2d-net: conv1, conv2).
"""


def render_matrix(matrix: dict[str, dict[str, Cell]], fmt: str = "markdown") -> str:
    """The matrix as "markdown" (a table and numbered notes), "json" or "table" (plain text)."""
    if fmt == "json":
        return json.dumps({f: {c: asdict(cell) for c, cell in row.items()} for f, row in matrix.items()},
                          indent=1)
    notes: dict[str, int] = {}

    def shown(cell: Cell) -> str:
        texts = ([cell.text()] if cell.status != "ok" else []) + cell.notes
        marks = [notes.setdefault(t, len(notes) + 1) for t in texts]
        count = f" {cell.trainable:,}" if cell.trainable else ""
        return cell.status + count + (" [" + ",".join(str(m) for m in marks) + "]" if marks else "")

    rows = [[family, *(shown(row[c]) for c in COLUMN_NAMES)] for family, row in matrix.items()]
    head = ["family", *COLUMN_NAMES]
    if fmt == "table":
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
        lines += ["", *(f"[{n}] {t}" for t, n in notes.items())]
        return "\n".join(lines) + "\n"
    counts = {s: sum(cell.status == s for row in matrix.values() for cell in row.values())
              for s in ("ok", "refused", "FAIL")}
    lines = [_HEADER.format(vocab=VOCAB),
             f"{len(matrix)} families × {len(COLUMN_NAMES)} columns: " +
             ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Notes:", ""] + [f"{n}. {t}" for t, n in notes.items()]
    return "\n".join(lines) + "\n"
