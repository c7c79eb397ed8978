"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, streamed or not, on the continuous-batching scheduler.

As in vLLM's OpenAI server, the base model and every adapter the bank can serve are models:
`model` names the adapter (or the base model's name for no adapter), and `/v1/models` lists the
adapters with `parent` = the base. Chat messages are formatted as training formats them (the
tokenizer's chat template with the assistant header, `conversation_prompt_ids`); a completion
prompt is tokenized as it is (with the tokenizer's special tokens, as vLLM does).

Errors on these routes have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 for a request that cannot be served as sent (the `param` names the field), 404 for an
unknown `model`, 413 for an input over the token limits, 503 while the server starts or shuts
down, 500 when the server itself failed. Fields this server cannot honour (`logprobs`, `echo`,
penalties, ...) are refused with a 400 naming the field, never ignored; fields it does not know
are ignored, as OpenAI's server does.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...core.bank import UnknownAdapterError
from ...core.errors import PeftlabError
from .engine import Engine, RequestError

DEFAULT_COMPLETION_TOKENS = 16     # OpenAI's default max_tokens for /v1/completions
OWNER = "peftlab"
OPENAI_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions"})   # POST bodies
# Fields of OpenAI's schema that change the answer and that this server cannot honour, with the
# value that means "not used": any other value is refused rather than silently ignored.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None,), "best_of": (None, 1), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"})}


class OpenAIError(Exception):
    """A request refused in OpenAI's error shape: `status` is the HTTP status, `param` the
    field at fault (if one is), `code` OpenAI's machine-readable reason (if one applies)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"message": str(self), "type": kind, "param": self.param, "code": self.code}


def as_openai_error(e: Exception) -> OpenAIError:
    """The OpenAI-shaped error for an exception raised while serving a request."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, UnknownAdapterError):
        return OpenAIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, RequestError):
        return OpenAIError(e.status, str(e), code="context_length_exceeded" if e.status == 413 else None)
    if isinstance(e, PeftlabError):
        return OpenAIError(400, str(e))
    return OpenAIError(500, f"the server failed on this request: {type(e).__name__}: {e}")


# ---- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "16" is not an integer; unknown fields are ignored, as OpenAI's server does
    # (clients send fields of newer API versions). Known fields we cannot honour: UNSUPPORTED.
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)   # OpenAI's default 1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    max_tokens: int | None = Field(None, ge=1)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise OpenAIError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        for field, unused in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(field)
            # compared with their types: logprobs 0 (log-probabilities asked for) is not False
            if not any(type(value) is type(u) and value == u for u in unused):
                raise OpenAIError(400, f"{field} is not supported by this server (got "
                                       f"{json.dumps(value)[:60]}); leave it out", param=field)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_turn(self) -> dict[str, str]:
        """{role, content} with the content's text parts joined (what chat templates read)."""
        content = self.content if isinstance(self.content, str) else \
            "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


_Body.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()


def parse(model: type[_Body], raw: bytes) -> _Body:
    """The request body validated; OpenAIError 400 naming the first field at fault."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            raise OpenAIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})") from None
        field = ".".join(str(p) for p in first["loc"]) or None
        lines = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'the body'}: {err['msg']}"
                          for err in errors[:5])
        raise OpenAIError(400, f"invalid request: {lines}", param=field) from None
    body.refuse_unsupported()
    return body


# ---- text from token ids, as they come --------------------------------------------------------------
class IncrementalText:
    """The text of a growing list of token ids, handed out as it becomes stable: never half of
    a multi-byte character, never part of a stop string (text that could be the start of one
    waits for the next token). The text handed out, joined, is `text`: the non-streamed answer.

    Each new piece is the decode of a short window of the last ids minus the decode of the same
    window without the new ones (as vLLM and TGI detokenize), so the work per token stays
    constant and word-start spaces (SentencePiece's "▁", byte-level BPE's "Ġ") come out as the
    whole decode has them; a window ending in U+FFFD (an unfinished UTF-8 character) waits."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode, self.stops = decode, list(stops)
        self.ids: list[int] = []
        self._prefix = self._read = 0   # ids[_prefix:_read]: the window's already decoded part
        self.text = ""                  # the text decoded so far, cut before a stop string
        self.sent = 0                   # characters of `text` handed out
        self.stopped = False            # a stop string was found: the text is complete

    def add(self, ids: list[int]) -> str:
        """Take new token ids; the text that can be handed out now."""
        self.ids += ids
        return self._advance(final=False)

    def finish(self) -> str:
        """The rest of the text once no more ids come."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        before = self.decode(self.ids[self._prefix:self._read])
        window = self.decode(self.ids[self._prefix:])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            searched = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            hits = [i for i in (self.text.find(s, searched) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        ready = len(self.text) if final or self.stopped else len(self.text) - self._held()
        piece = self.text[self.sent:ready]
        self.sent = max(self.sent, ready)
        return piece

    def _held(self) -> int:
        """Length of the longest end of `text` that is the start of a stop string."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)


# ---- the routes -------------------------------------------------------------------------------------
def add_openai_routes(app: FastAPI, engine: Engine, scheduler: Any) -> None:
    """Add the OpenAI-compatible routes to `app`, generating with `scheduler` (the
    continuous-batching Scheduler: `submit(GenerationRequest) -> RequestStream`)."""
    from .scheduler import Finished, GenerationRequest

    bank = engine.bank
    started = int(time.time())
    # The event loop decodes with its own copy: a fast tokenizer refuses use from two threads
    # at once, and the handlers' copy is busy encoding in worker threads.
    decoder = copy.deepcopy(engine.tokenizer)
    # the ids the model can read (its embedding may have more rows than the tokenizer has ids)
    embedding = engine.am.model.get_input_embeddings()
    vocab = getattr(embedding, "num_embeddings", None) or len(engine.tokenizer)

    def decode(ids: list[int]) -> str:
        return decoder.decode(ids, skip_special_tokens=True)

    def card(name: str, parent: str | None, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER,
                "root": name if parent else engine.model_name, "parent": parent,
                "max_model_len": engine.max_positions}

    def models() -> list[dict[str, Any]]:
        cards = [card(engine.model_name, None, started)]
        for name, path in bank.available().items():
            if name != engine.model_name:
                try:
                    created = int(path.stat().st_mtime)
                except OSError:
                    created = started
                cards.append(card(name, engine.model_name, created))
        return cards

    def adapter_of(model: str) -> str | None:
        """The adapter that `model` names (None: the base model); 404 when none."""
        if model == engine.model_name:
            return None
        try:
            bank.path_of(model)
        except UnknownAdapterError as e:
            raise OpenAIError(404, f"the model {model!r} does not exist on this server; it serves "
                                   f"{engine.model_name!r} (the base model) and the adapters "
                                   f"{sorted(bank.available())}" + (f" (did you mean {e.close}?)"
                                   if e.close else "") + ": see GET /v1/models",
                              param="model", code="model_not_found") from None
        return model

    def max_tokens_of(body: _Body, n_prompt: int, default: int | None) -> int:
        """The request's max_tokens within this server's limit, the default when not given."""
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if asked is None:
            room = engine.max_positions - n_prompt if engine.max_positions else engine.max_new_tokens
            asked = min(default or engine.max_new_tokens, engine.max_new_tokens, max(room, 1))
        elif asked > engine.max_new_tokens:
            raise OpenAIError(400, f"{field} {asked} is above this server's limit of "
                                   f"{engine.max_new_tokens} (--max-new-tokens-limit)", param=field)
        engine.check_input(n_prompt, asked)
        return asked

    def prompts_of(body: CompletionRequest) -> list[list[int]]:
        """Token ids of every prompt (in a worker thread: tokenizing takes a while)."""
        p = body.prompt
        if isinstance(p, str):
            texts, token_lists = [p], []
        elif p and all(isinstance(x, str) for x in p):
            texts, token_lists = list(p), []
        elif p and all(isinstance(x, int) for x in p):
            texts, token_lists = [], [list(p)]
        else:
            texts, token_lists = [], [list(x) for x in p]
        out = [engine.encode_text(t) for t in texts] + token_lists
        if not out:
            raise OpenAIError(400, "prompt is an empty list; send a string, a list of strings or "
                                   "token ids", param="prompt")
        for ids in out:
            if not ids:
                raise OpenAIError(400, "a prompt is empty (no tokens); send some text", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise OpenAIError(400, f"a token id of the prompt is outside the vocabulary "
                                       f"(0 to {vocab - 1})", param="prompt")
        return out

    def submit(req: Any) -> Any:
        try:
            return scheduler.submit(req)
        except RequestError as e:   # 503 while closing
            raise as_openai_error(e) from None

    def choices_for(body: _Body, prompts: list[list[int]], adapter: str | None,
                    default: int | None) -> list[Any]:
        """One submitted RequestStream per (prompt, n): choice index = prompt index * n + j.
        A seed gives choice j the seed + j, so that n sampled choices differ yet repeat."""
        requests = []
        for ids in prompts:
            max_tokens = max_tokens_of(body, len(ids), default)
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + j) % 2**63
                requests.append(GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=max_tokens,
                                                  temperature=body.temperature, top_p=body.top_p,
                                                  seed=seed))
        streams: list[Any] = []
        try:
            for r in requests:
                streams.append(submit(r))
        except Exception:
            for s in streams:
                s.cancel()
            raise
        return streams

    async def drive(stream: Any, text: IncrementalText,
                    emit: Callable[[str], Any] | None) -> tuple[str, int]:
        """Run one choice to its end: (finish_reason, completion tokens). `emit` gets each
        piece of stable text as it comes (streaming)."""
        reason, used = "length", 0
        try:
            async for item in stream:
                if isinstance(item, Finished):
                    reason = item.reason
                    break
                # token by token: an item holds every token made since the last one was read, and
                # the answer (and its usage) ends at the token that completes a stop string
                pieces = []
                for token in item:
                    used += 1
                    pieces.append(text.add([token]))
                    if text.stopped:
                        break
                piece = "".join(pieces)
                if piece and emit is not None:
                    await emit(piece)
                if text.stopped:
                    stream.cancel()
                    reason = "stop"
                    break
        except BaseException:
            stream.cancel()
            raise
        rest = text.finish()
        if rest and emit is not None:
            await emit(rest)
        return ("stop" if reason != "length" else "length"), used

    async def answer(body: _Body, prompts: list[list[int]], adapter: str | None, chat: bool,
                     default: int | None) -> Any:
        stops = body.stops()   # refused before anything is submitted
        streams = choices_for(body, prompts, adapter, default)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": body.model}
        n_prompt = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(events(head, streams, stops, chat, n_prompt, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = [IncrementalText(decode, stops) for _ in streams]
        try:
            results = await asyncio.gather(*(drive(s, t, None) for s, t in zip(streams, texts, strict=True)))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        choices = []
        for i, ((reason, _), t) in enumerate(zip(results, texts, strict=True)):
            content: dict[str, Any] = ({"message": {"role": "assistant", "content": t.text}} if chat
                                       else {"text": t.text})
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": reason})
        used = sum(u for _, u in results)
        return {**head, "object": kind, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": used,
                          "total_tokens": n_prompt + used}}

    async def events(head: dict[str, Any], streams: list[Any], stops: list[str], chat: bool,
                     n_prompt: int, include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: each choice's text as it comes, its finish_reason, the usage
        (if asked), then [DONE]. An error after the first event is sent as an error event."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if include_usage:
            head["usage"] = None
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def chunk(index: int, piece: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                    ({} if piece is None else {"content": piece})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": reason}
            return _sse({**head, "choices": [choice]})

        async def run(index: int, stream: Any) -> int:
            async def emit(piece: str) -> None:
                await queue.put(chunk(index, piece, None))
            reason, used = await drive(stream, IncrementalText(decode, stops), emit)
            await queue.put(chunk(index, None, reason))
            return used

        if chat:
            for i in range(len(streams)):
                yield chunk(i, None, None, first=True)
        tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(streams)]
        gathered = asyncio.gather(*tasks)
        gathered.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            used = sum(await gathered)
        except asyncio.CancelledError:
            raise
        except Exception as e:   # a choice failed mid-stream: the status is sent already
            yield _sse({"error": as_openai_error(e).body()})
            yield "data: [DONE]\n\n"
            return
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.cancel()
        if include_usage:
            yield _sse({**head, "choices": [], "usage": {
                "prompt_tokens": n_prompt, "completion_tokens": used, "total_tokens": n_prompt + used}})
        yield "data: [DONE]\n\n"

    async def guarded(work: Callable[[], Any]) -> Any:
        try:
            return await work()
        except Exception as e:
            return as_openai_error(e).response()

    def require_causal() -> None:
        if engine.kind != "causal-lm":
            raise OpenAIError(400, f"this server serves {engine.model_name!r}, a {engine.kind} "
                                   "model, which does not generate text: use /v1/classify")

    @app.get("/v1/models")
    async def list_models() -> Any:
        """The base model and every adapter the bank can serve (`parent` = the base)."""
        async def work() -> Any:
            return {"object": "list", "data": await asyncio.to_thread(models)}
        return await guarded(work)

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Any:
        async def work() -> Any:
            for c in await asyncio.to_thread(models):
                if c["id"] == model:
                    return c
            adapter_of(model)   # 404 with the names served
            raise OpenAIError(404, f"the model {model!r} does not exist", param="model",
                              code="model_not_found")
        return await guarded(work)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        """OpenAI's completions: `prompt` continued under the adapter `model` names."""
        async def work() -> Any:
            body = parse(CompletionRequest, await request.body())
            require_causal()
            adapter = await asyncio.to_thread(adapter_of, body.model)
            prompts = await asyncio.to_thread(prompts_of, body)
            return await answer(body, prompts, adapter, False, DEFAULT_COMPLETION_TOKENS)
        return await guarded(work)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        """OpenAI's chat completions: the next assistant turn of `messages`."""
        async def work() -> Any:
            body = parse(ChatCompletionRequest, await request.body())
            require_causal()
            adapter = await asyncio.to_thread(adapter_of, body.model)
            turns = [m.as_turn() for m in body.messages]
            ids = await asyncio.to_thread(engine.encode_chat, turns)
            return await answer(body, [ids], adapter, True, None)
        return await guarded(work)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
