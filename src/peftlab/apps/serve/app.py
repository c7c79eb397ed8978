"""The HTTP side of the server: FastAPI routes, request schemas and error answers.

Every error answer is JSON with a `detail` string that names the problem and the fix: 404 for
an unknown adapter (with `close` look-alike names), 422 for a malformed body (with `errors`,
one per field) or a parameter above a limit, 413 for a body above `max_body_bytes` or an input
above the token limits, 400 for other requests peftlab refuses (e.g. loading a path that is not
an adapter: one message for every such path, the reason in the server log), 403 for a path
outside the adapter roots (one message), 401 without the API key when the server has one
(guard.py), 503 while the server starts or shuts down, and 500 with the reason when the server
itself failed.

Nothing a request sends can stall the others: the body is refused past its size limit before
it is read (`BodyLimit`), and tokenizing, like all other blocking work, runs in a worker thread,
never on the event loop that answers `/health`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...core.bank import UnknownAdapterError
from ...core.errors import CapabilityError, CheckpointError, PeftlabError
from .batcher import Batcher, ServerClosing
from .engine import Engine, Job, RequestError
from .guard import ApiKeyAuth, LoadRoots, check_adapter_name, check_api_key, check_bind
from .openai_api import OPENAI_PATHS, OpenAIError, add_openai_routes
from .scheduler import (
    DEFAULT_MAX_PREFILL_TOKENS,
    DEFAULT_MAX_RUNNING,
    GenerationRequest,
    Scheduler,
)

DEFAULT_MAX_TOKENS = 16
# The largest request body read, in bytes: a prompt of ~1M characters, whose tokenizing takes
# about a second (in a worker thread); larger bodies are refused before they are read.
DEFAULT_MAX_BODY_BYTES = 2**20

log = logging.getLogger(__name__)

# The one answer to POST /v1/adapters for every path the server will not load, whatever the
# reason (missing, not a directory, unreadable, too large, broken, made for another model), so
# that the answers tell a client nothing about the server's files; the reason goes to the log.
NOT_LOADABLE = ("the server cannot load an adapter from this path: give a readable adapter "
                "directory (peftlab.json and its files, or a peft adapter), written by "
                "am.save_adapter, peftlab train (RUN or RUN/last) or peft for this server's model; "
                "the server log says why this one was refused")


class _Body(BaseModel):
    # strict: "16" is not an integer and "true" not a boolean; unknown fields (typos such as
    # "max_token") are errors rather than silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Body):
    prompt: str = Field(min_length=1)
    adapter: str | None = None
    max_tokens: int | None = Field(None, ge=1)   # None: DEFAULT_MAX_TOKENS, within the limit
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)


class ClassifyRequest(_Body):
    text: str = Field(min_length=1)
    adapter: str | None = None


class LoadRequest(_Body):
    name: str
    path: str = Field(min_length=1)
    replace: bool = False

    # A bad name is a malformed request (422), refused before the path is looked at.
    _name_is_usable = field_validator("name")(check_adapter_name)


class BodyLimit:
    """ASGI middleware: a request whose body is over `limit` bytes is answered 413 before the
    app sees it. A declared Content-Length is judged before a byte of the body is read; a
    chunked body is counted as it arrives and refused as soon as the count passes the limit.
    A body within the limit is handed on whole (the app would read it whole anyway)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(f"{int(declared):,} bytes", scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":   # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(f"more than {self.limit:,} bytes", scope, receive, send)
                return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()   # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        # The connection stays open: uvicorn discards the rest of the body as it arrives (it
        # stores none of it), and the client, which reads the answer once it has sent its
        # body, gets the 413. Closing instead resets a connection still sending, and the
        # client sees a connection error in place of the answer.
        message = (f"the request body is {size}; this server takes at most {self.limit:,} bytes "
                   "(--max-body-bytes)")
        answer = OpenAIError(413, message).response() if scope["path"] in OPENAI_PATHS \
            else _error(413, message)   # the OpenAI routes answer in OpenAI's error shape
        await answer(scope, receive, send)


def _error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


def error_response(e: Exception) -> JSONResponse:
    """The answer for an exception raised while serving a request."""
    if isinstance(e, UnknownAdapterError):
        return _error(404, str(e), close=e.close)
    if isinstance(e, RequestError):
        return _error(e.status, str(e))
    if isinstance(e, PeftlabError):
        return _error(400, str(e))
    return _error(500, f"the server failed on this request: {type(e).__name__}: {e}")


def _describe(errors: list[dict[str, Any]]) -> list[str]:
    """One line per pydantic error: the field, then what is wrong."""
    lines = []
    for err in errors:
        if err["type"] == "json_invalid":
            lines.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            continue
        field = ".".join(str(p) for p in err["loc"] if p != "body") or "the body"
        got = "" if "input" not in err or err["type"] == "missing" else f" (got {_short(err['input'])})"
        lines.append(f"{field}: {err['msg']}{got}")
    return lines


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error message need not echo a huge input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _answer(future: Future) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except Exception as e:   # the worker's error for this request: answered, never re-raised
        return error_response(e)


def create_app(engine: Engine, *, max_batch_size: int = 16, max_wait_ms: float = 10.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: str | None = None,
               allow_load_from: Sequence[str | Path] = (), continuous: bool = True,
               max_running: int = DEFAULT_MAX_RUNNING,
               max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> FastAPI:
    """The FastAPI app serving `engine`; its workers run while the app does (use
    `with TestClient(app)` in tests, so that start-up and shut-down run). Request bodies over
    `max_body_bytes` are answered 413 unread. With `api_key`, every route but /health needs
    `Authorization: Bearer <api_key>` (guard.ApiKeyAuth). `POST /v1/adapters` loads only from
    under the bank's folder and the `allow_load_from` folders (guard.LoadRoots).

    Generation runs on the Scheduler's decode loop (continuous batching: at most `max_running`
    requests decoded together, at most `max_prefill_tokens` prompt tokens joining per step);
    classification, and generation with `continuous=False` or with adapters the loop cannot
    route, on the Batcher's static batches (`max_batch_size`, `max_wait_ms`)."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise PeftlabError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    api_key = check_api_key(api_key)
    roots = LoadRoots([*([engine.bank.directory] if engine.bank.directory is not None else []),
                       *allow_load_from])
    batcher = Batcher(engine.run, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      max_adapters=engine.bank.max_adapters)
    scheduler = Scheduler(engine, max_running=max_running, max_prefill_tokens=max_prefill_tokens,
                          static=batcher.submit, continuous=continuous)
    bank = engine.bank

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        scheduler.start()
        try:
            yield
        finally:   # the scheduler first: it may still hand requests to the batcher
            await asyncio.to_thread(scheduler.stop)
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="peftlab", summary="PEFT adapters served from one base model",
                  lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.scheduler = engine, batcher, scheduler
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_key is not None:   # added last, so outermost: a request without the key is never read
        app.add_middleware(ApiKeyAuth, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        lines = _describe(list(exc.errors()))
        return _error(422, "invalid request: " + "; ".join(lines),
                      errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                              for e in exc.errors()])

    @app.exception_handler(PeftlabError)
    async def refused(_: Request, exc: PeftlabError) -> JSONResponse:
        return error_response(exc)

    def submit(job: Job) -> Future:
        try:
            return batcher.submit(job)
        except ServerClosing as e:
            raise RequestError(503, str(e)) from None

    def require(kind: str, route: str) -> None:
        if engine.kind != kind:
            other = "/v1/classify" if kind == "causal-lm" else "/v1/generate"
            raise RequestError(400, f"{route} needs a {kind} model; this server serves "
                                    f"{engine.model_name!r}, a {engine.kind} model: use {other}")

    def prepare(adapter: str | None, encode: Callable[[str], list[int]], text: str,
                max_tokens: int = 0) -> list[int]:
        """The token ids of a request's text, after its adapter is known to exist (a 404 now,
        not an error from the worker), within the token limits. In a worker thread: looking
        the adapter up may list the adapter folder, and tokenizing a long text takes a while."""
        if adapter is not None:
            bank.path_of(adapter)
        ids = encode(text)
        engine.check_input(len(ids), max_tokens)
        return ids

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load: the model, loaded adapters, queue depth, requests decoding and
        batch sizes run (`batch_sizes`: requests per static batch or per group that joined the
        decode loop together -> how many times)."""
        sizes = batcher.batch_sizes + scheduler.admitted
        return {"status": "ok" if batcher.running and scheduler.running else "stopping",
                "model": engine.model_name, "kind": engine.kind, "mixed_batches": engine.mixed,
                "continuous_batching": scheduler.continuous, "loaded": bank.loaded(),
                "max_adapters": bank.max_adapters, "loads": bank.loads, "evictions": bank.evictions,
                "pending": batcher.pending() + scheduler.pending(), "decoding": scheduler.decoding(),
                "decode_steps": scheduler.steps, "batch_sizes": dict(sorted(sizes.items()))}

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        """The loaded adapters (least recently used first) and every one that can be served."""
        return {"loaded": bank.loaded(), "max_adapters": bank.max_adapters,
                "available": {name: str(path) for name, path in bank.available().items()}}

    @app.post("/v1/adapters")
    def load(req: LoadRequest) -> Any:
        """Load (or with `replace`, swap) adapter `name` from `path`; waits for the running batch.
        A path (or a file in it) outside the adapter roots gets one 403 (guard.OUTSIDE_ROOTS);
        every other path it will not load the same 400 (NOT_LOADABLE); the log says why."""
        try:
            path = bank.load(req.name, roots.confine(req.path), replace=req.replace,
                             check_path=roots.check)
        except (CheckpointError, CapabilityError, OSError) as e:
            log.warning("POST /v1/adapters refused %r for adapter %r: %s", req.path, req.name, e)
            return _error(400, NOT_LOADABLE)
        except RequestError as e:   # outside the adapter roots (403): the operator sees the attempt
            log.warning("POST /v1/adapters refused %r for adapter %r: %s", req.path, req.name, e)
            raise
        except PeftlabError:
            raise
        except Exception as e:
            return error_response(e)
        return {"name": req.name, "path": str(path), "loaded": bank.loaded()}

    @app.delete("/v1/adapters/{name}")
    def unload(name: str) -> Any:
        """Free a loaded adapter; one on disk stays available and loads again when asked for."""
        return _sync(lambda: {"name": name, "unloaded": bank.unload(name), "loaded": bank.loaded()})

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> Any:
        """`{"text", "adapter", "tokens"}`: the completion of `prompt` under `adapter`."""
        require("causal-lm", "/v1/generate")
        max_tokens = min(DEFAULT_MAX_TOKENS, engine.max_new_tokens) if req.max_tokens is None \
            else req.max_tokens
        if max_tokens > engine.max_new_tokens:
            raise RequestError(422, f"max_tokens {max_tokens} is above this server's limit of "
                                    f"{engine.max_new_tokens} (--max-new-tokens-limit)")
        ids = await asyncio.to_thread(prepare, req.adapter, engine.encode_prompt, req.prompt, max_tokens)
        stream = scheduler.submit(GenerationRequest(ids, req.adapter, max_tokens, req.temperature,
                                                    req.top_p, req.seed))
        try:
            tokens, finished = await stream.collect()
        except Exception as e:   # the worker's error for this request: answered, never re-raised
            return error_response(e)
        finally:   # the client went away (the handler was cancelled): its row is freed
            stream.cancel()
        return {"text": engine.decode(tokens), "adapter": req.adapter,
                "tokens": finished.completion_tokens}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> Any:
        """`{"label", "probs", "adapter"}` (a regression head: `{"score", "adapter"}`)."""
        require("classification", "/v1/classify")
        ids = await asyncio.to_thread(prepare, req.adapter, engine.encode_text, req.text)
        return await _answer(submit(Job("classify", ids, req.adapter)))

    add_openai_routes(app, engine, scheduler)   # /v1/models, /v1/completions, /v1/chat/completions
    return app


def _sync(action: Callable[[], dict[str, Any]]) -> Any:
    """`action()`, with any exception but a refusal answered as a 500 with its reason."""
    try:
        return action()
    except PeftlabError:
        raise
    except Exception as e:
        return error_response(e)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          max_wait_ms: float = 10.0, max_body_bytes: int | None = None,
          log_level: str = "info", api_key: str | None = None, insecure: bool = False,
          allow_load_from: Sequence[str | Path] = (), continuous: bool = True,
          max_running: int = DEFAULT_MAX_RUNNING, max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS) -> None:
    """Serve `engine` over HTTP with uvicorn until interrupted (`max_body_bytes` None:
    DEFAULT_MAX_BODY_BYTES; the other settings: `create_app`). Without `api_key` only on a
    loopback `host`, unless `insecure` (ConfigError otherwise, before the server starts)."""
    import uvicorn
    check_bind(host, api_key=check_api_key(api_key), insecure=insecure)
    uvicorn.run(create_app(engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                           max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                           api_key=api_key, allow_load_from=allow_load_from,
                           continuous=continuous, max_running=max_running,
                           max_prefill_tokens=max_prefill_tokens),
                host=host, port=port, log_level=log_level)
