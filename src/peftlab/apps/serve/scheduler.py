"""Continuous batching: one decode loop on one worker thread, which requests join and leave
between steps.

    scheduler = Scheduler(engine); scheduler.start()
    stream = scheduler.submit(GenerationRequest(prompt_ids, "sentiment", max_tokens=64))
    async for item in stream: ...        # lists of new token ids, then one Finished
    tokens, finished = await stream.collect()

Each loop turn admits waiting requests (one prefill forward for the newcomers, left-padded, at
most `max_prefill_tokens` padded prompt tokens, so that a burst of long prompts does not stall
the running answers for long), then runs one decode step: one forward of the last token of
every running request, each row under its own adapter (`adapter_ids=`, a routed mixed batch),
over one shared KV cache. A request leaves as soon as it is finished (its model's EOS or one of
its stop tokens, its max_tokens, or `cancel`), and its cache row is dropped.

The cache is transformers' DynamicCache with every row right-aligned: row i's real tokens are
the last `length_i` columns, the columns before them padding that the attention mask hides, and
position ids count each row's own tokens, as `generate` does for a left-padded batch. So a greedy
answer is the answer of the request served alone. Joining rows are padded on the left to the
running width (or the running rows to theirs); leaving rows are dropped and the columns that
only padding used are cut.

Requests the decode loop cannot take run as static batches through the `static` callable (the
server's Batcher and `Engine.run`): those of an adapter without a per-example form (prompt /
prefix tuning, ...), and all of them on an engine without mixed batches or a model whose cache
is not a plain DynamicCache (sliding windows, recurrent state).
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ...core.errors import CapabilityError
from ...core.routing import Router
from .engine import Engine, Job, RequestError, Sampling
from .worker import QueueWorker

DEFAULT_MAX_RUNNING = 64
DEFAULT_MAX_PREFILL_TOKENS = 512


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to generate: prompt token ids, the adapter (None: the base model), and
    how to pick tokens (temperature 0: greedy; `seed` fixes a sampled answer)."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()   # besides the model's EOS


@dataclass(frozen=True)
class Finished:
    """The end of a stream: `reason` "stop" (the model's EOS or a stop token, which is the last
    token yielded and counted), "length" (max_tokens reached) or "cancelled"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


_END = object()


class RequestStream:
    """The answer to one submitted request, as it is generated. Iterate it (`async for`) for
    lists of new token ids (at least one each) and then one Finished, or `await collect()`; a
    request that failed raises its error there. Filled by the scheduler's thread, read from
    any event loop (each wait registers a future of the loop that waits)."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._end: Finished | BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.cancelled = False

    # ---- the consumer -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away, a stop string was hit); the
        stream then ends with Finished("cancelled", ...)."""
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[list[int] | Finished]:
        while True:
            with self._lock:
                tokens, self._tokens = self._tokens, []
                end = self._end
                if not tokens and end is None:
                    loop = asyncio.get_running_loop()
                    waiter = loop.create_future()
                    self._waiters.append((loop, waiter))
            if tokens:
                yield tokens
                continue
            if end is None:
                await waiter
                continue
            if isinstance(end, BaseException):
                raise end
            yield end
            return

    async def collect(self) -> tuple[list[int], Finished]:
        """The whole answer: every token id, and how it ended."""
        tokens: list[int] = []
        async for item in self:
            if isinstance(item, Finished):
                return tokens, item
            tokens += item
        raise RuntimeError("a request stream ended without its Finished record")   # not reached

    # ---- the producer (the scheduler's thread) --------------------------------------------------
    def _push(self, tokens: list[int] | None = None, end: Finished | BaseException | None = None) -> None:
        with self._lock:
            if self._end is not None:
                return
            if tokens:
                self._tokens += tokens
            if end is not None:
                self._end = end
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:   # that loop has closed: nobody waits there any more
                pass

    @property
    def done(self) -> bool:
        return self._end is not None


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(eq=False)
class _Row:
    """A running request: its stream, its token generator and where it stands."""

    stream: RequestStream
    generator: torch.Generator | None
    length: int = 0        # its tokens in the cache
    last: int = 0          # the token the next step feeds in
    produced: int = 0
    stops: frozenset[int] = field(default_factory=frozenset)

    @property
    def request(self) -> GenerationRequest:
        return self.stream.request


class Scheduler(QueueWorker):
    """The decode loop of a causal-LM Engine (see the module docstring).

    `max_running`: requests decoded together at most; `max_prefill_tokens`: the padded prompt
    tokens one admission forward takes at most (a longer prompt still goes, alone);
    `static(job)`: where requests the loop cannot take go (a Batcher's `submit`), None: they
    fail with the reason; `continuous=False` sends every request there (static batches only).
    The running requests need at most `engine.bank.max_adapters` adapters at a time; a
    newcomer whose adapter does not fit waits.
    """

    thread_name = "peftlab-scheduler"

    def __init__(self, engine: Engine, *, max_running: int = DEFAULT_MAX_RUNNING,
                 max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
                 static: Callable[[Job], Future] | None = None, continuous: bool = True) -> None:
        if max_running < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_running and max_prefill_tokens must be >= 1, got {max_running} "
                             f"and {max_prefill_tokens}")
        super().__init__()
        self.engine, self.bank = engine, engine.bank
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self._static = static
        # The loop re-pads and drops rows of plain per-layer key/value tensors: other caches
        # (sliding windows, recurrent state) go through static batches.
        self.continuous = (continuous and engine.kind == "causal-lm" and engine.mixed and
                           all(type(layer) is DynamicLayer
                               for layer in DynamicCache(config=engine.am.model.config).layers))
        self._waiting: deque[RequestStream] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None   # (rows, cache width): 1 where a row has a token
        self.admitted: Counter[int] = Counter()   # requests prefilled together -> times
        self.steps = 0                            # decode steps run
        self.step_rows = 0                        # rows decoded over all steps

    # ---- the API ------------------------------------------------------------------------------
    def stop(self, timeout: float = 60.0) -> None:
        """Finish every request already submitted, then end the worker thread."""
        super().stop(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request (thread-safe); RequestError 503 when the scheduler is not running."""
        stream = RequestStream(request)
        with self._state:   # so that no request lands behind the stop marker
            if not self.running:
                raise RequestError(503, "the server is not running (starting up or shutting down); retry")
            if self.continuous:
                self._queue.put(stream)
                return stream
        self._run_static(stream)
        return stream

    def pending(self) -> int:
        """Requests waiting to join (approximate: read without a lock)."""
        return self._queue.qsize() + len(self._waiting)

    def decoding(self) -> int:
        """Requests in the running batch now."""
        return len(self._rows)

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        closing = False
        # no_grad, not inference_mode: adapters the bank loads inside the loop must stay
        # ordinary tensors (routing reads their version counters).
        with torch.no_grad():
            while True:
                block = not self._rows and not self._waiting
                if block and closing:
                    return
                closing = self._drain(block) or closing
                try:
                    self._turn()
                except Exception as e:   # a fault of the loop itself: the running requests
                    self._abandon(e)     # get it, and the loop goes on with a fresh batch

    def _turn(self) -> None:
        """One turn of the loop: drop the cancelled, admit newcomers, one decode step."""
        self._drop_cancelled()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers)
        if self._rows:
            self._step()

    def _abandon(self, error: Exception) -> None:
        for row in self._rows:
            row.stream._push(end=error)
        self._rows, self._cache, self._mask = [], None, None

    def _drain(self, block: bool) -> bool:
        """Move queued requests to the waiting ones (waiting for the first when `block`);
        whether the stop marker came."""
        while True:
            try:
                stream = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return False
            block = False
            if stream is None:
                return True
            self._waiting.append(stream)

    def _drop_cancelled(self) -> None:
        for stream in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(stream)
            stream._push(end=Finished("cancelled", len(stream.request.prompt_ids), 0))
        gone = [r for r in self._rows if r.stream.cancelled]
        for row in gone:
            row.stream._push(end=Finished("cancelled", len(row.request.prompt_ids), row.produced))
        if gone:
            self._leave(gone)

    def _admit(self) -> list[RequestStream]:
        """The waiting requests that join now, in arrival order: while rows are free, their
        padded prompts fit `max_prefill_tokens` (the first always goes) and the adapters of the
        running and joining requests fit the bank."""
        adapters = {r.request.adapter for r in self._rows} - {None}
        chosen: list[RequestStream] = []
        width = 0
        for stream in list(self._waiting):
            if len(self._rows) + len(chosen) >= self.max_running:
                break
            request = stream.request
            wider = max(width, len(request.prompt_ids))
            if chosen and wider * (len(chosen) + 1) > self.max_prefill_tokens:
                break
            more = {request.adapter} - {None} - adapters
            if len(adapters) + len(more) > self.bank.max_adapters:
                continue
            adapters |= more
            width = wider
            chosen.append(stream)
            self._waiting.remove(stream)
        return chosen

    # ---- prefill ------------------------------------------------------------------------------
    def _prefill(self, streams: list[RequestStream]) -> None:
        """Run the newcomers' prompts and add them to the running batch. A newcomer whose
        adapter cannot be loaded fails alone; one without a per-example form goes to the static
        batches; when the forward fails, each newcomer is tried alone."""
        streams = self._check_adapters(streams)
        if not streams:
            return
        try:
            self._prefill_batch(streams)
        except Exception as e:   # the worker must outlive any request
            if len(streams) == 1:
                streams[0]._push(end=e)
                return
            for stream in streams:
                self._prefill([stream])
            return
        self.admitted[len(streams)] += 1

    def _check_adapters(self, streams: list[RequestStream]) -> list[RequestStream]:
        """The newcomers whose adapter loads and routes per example; the others are failed
        with their adapter's error or handed to the static batches."""
        running = self._running_adapters()
        # the running rows' adapters pinned, so that loading a newcomer's evicts none of them
        verdict = {name: self._adapter_error(name, running)
                   for name in {s.request.adapter for s in streams} - {None}}
        verdict[None] = None
        kept = []
        for stream in streams:
            error = verdict[stream.request.adapter]
            if error is None:
                kept.append(stream)
            elif isinstance(error, CapabilityError) and self._static is not None:
                self._run_static(stream)
            else:
                stream._push(end=error)
        return kept

    def _adapter_error(self, name: str, keep: Sequence[str | None] = ()) -> Exception | None:
        """Why adapter `name` cannot join a routed batch (with `keep` loaded too), or None: it
        does not load, or has no per-example form (CapabilityError). Tried alone before it is
        blamed, so that an error of one of `keep` is not taken for its own."""
        for pinned in ([*keep, name], [name]) if keep else ([name],):
            try:
                with self.bank.using(pinned):
                    Router.slots(self.engine.am.adapters, [name], torch.device("cpu"))
                return None
            except Exception as e:
                error = e
        return error

    def _prefill_batch(self, streams: list[RequestStream]) -> None:
        prompts = [s.request.prompt_ids for s in streams]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        cache = DynamicCache(config=self.engine.am.model.config)
        adapters = [s.request.adapter for s in streams]
        with self.bank.using([*self._running_adapters(), *adapters]):
            logits = self.engine.step(ids, mask, _positions(mask), cache, adapters)
        rows = [_Row(s, _generator(s.request), length=len(s.request.prompt_ids),
                     stops=s.request.stop_token_ids | self.engine.eos_ids) for s in streams]
        self._join(rows, cache, mask)
        self._advance(rows, logits)

    def _running_adapters(self) -> list[str | None]:
        return list(dict.fromkeys(r.request.adapter for r in self._rows))

    # ---- decode -------------------------------------------------------------------------------
    def _step(self) -> None:
        """One token for every running request: one forward over all rows."""
        rows, cache = self._rows, self._cache
        width = self._mask.shape[1]
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long)
        adapters = [r.request.adapter for r in rows]
        try:
            with self.bank.using(adapters):
                logits = self.engine.step(ids, mask, positions, cache, adapters)
        except Exception as e:
            self._crop(width)   # layers the failed forward reached hold one column more
            self._fail_step(e)
            return
        self._mask = mask
        for r in rows:
            r.length += 1
        self.steps += 1
        self.step_rows += len(rows)
        self._advance(list(rows), logits)

    def _fail_step(self, error: Exception) -> None:
        """A decode step failed: the requests whose adapter fails on its own get their
        adapter's error; when no adapter is to blame, every running request gets the error."""
        found = {name: self._adapter_error(name) for name in {r.request.adapter for r in self._rows} - {None}}
        blamed = {name: e for name, e in found.items() if e is not None}
        failed = [r for r in self._rows if not blamed or r.request.adapter in blamed]
        for row in failed:
            row.stream._push(end=blamed.get(row.request.adapter, error))
        self._leave(failed)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits, hand it to its stream, and let the rows
        that finished leave."""
        finished = []
        for row, scores in zip(rows, logits, strict=True):
            token = _pick(scores, row.request, row.generator)
            row.produced += 1
            row.last = token
            end = None
            if token in row.stops:
                end = "stop"
            elif row.produced >= row.request.max_tokens:
                end = "length"
            if end is None:
                row.stream._push([token])
            else:
                prompt = len(row.request.prompt_ids)
                row.stream._push([token], Finished(end, prompt, row.produced))
                finished.append(row)
        if finished:
            self._leave(finished)

    # ---- the cache ----------------------------------------------------------------------------
    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the newcomers' rows (their prefill cache and mask) to the running batch,
        padding on the left whichever side is narrower."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad(mine.keys, width, -2), _pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad(mine.values, width, -2), _pad(theirs.values, width, -2)])
        self._mask = torch.cat([_pad(self._mask, width, -1), _pad(mask, width, -1)])
        self._rows += rows

    def _leave(self, gone: list[_Row]) -> None:
        """Drop these rows from the batch and the cache columns that only padding uses now."""
        gone_ids = {id(r) for r in gone}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone_ids]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[index]
        start = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _crop(self, width: int) -> None:
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, :width]
            layer.values = layer.values[:, :, :width]

    # ---- requests the loop does not take --------------------------------------------------------
    def _run_static(self, stream: RequestStream) -> None:
        """Hand the request to the static batches; its answer arrives whole."""
        request = stream.request
        if self._static is None:
            stream._push(end=CapabilityError(
                "this server's decode loop cannot run this request and it has no static batches"))
            return
        job = Job("generate", list(request.prompt_ids), request.adapter, request.max_tokens,
                  Sampling(request.temperature, request.top_p, request.seed))
        stops = request.stop_token_ids | self.engine.eos_ids

        def answered(future: Future) -> None:
            error = future.exception()
            if error is not None:
                stream._push(end=error)
                return
            tokens = future.result()["ids"]
            cut = next((i for i, t in enumerate(tokens) if t in stops), None)
            if cut is not None:
                tokens = tokens[: cut + 1]
            reason = "stop" if cut is not None else "length"
            stream._push(tokens, Finished(reason, len(request.prompt_ids), len(tokens)))

        try:
            self._static(job).add_done_callback(answered)
        except Exception as e:
            stream._push(end=e)


def _pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`x` padded with zeros on the left of dimension `dim` (-2 or -1) to `width`."""
    more = width - x.shape[dim]
    if more == 0:
        return x
    return F.pad(x, (0, 0, more, 0) if dim == -2 else (more, 0))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as `generate` makes them: each row counts its own
    tokens from 0 (padding gets 1; the mask hides it)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _generator(request: GenerationRequest) -> torch.Generator | None:
    """The request's own random numbers: its seed fixes its sample whatever else runs."""
    if request.temperature == 0.0:
        return None
    seed = request.seed if request.seed is not None else random.randrange(2**63)
    return torch.Generator().manual_seed(seed)


def _pick(scores: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """The next token from one row's last logits: argmax when greedy, else a sample at the
    request's temperature from its top-p nucleus (as `generate`'s warpers shape it)."""
    if generator is None:
        return int(scores.argmax())
    scores = warp(scores, request.temperature, request.top_p)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def warp(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One row's logits divided by `temperature`, -inf outside the smallest set of most likely
    tokens whose probabilities sum to more than `top_p` (transformers' temperature and top-p
    warpers, as `generate` applies them)."""
    scores = scores.float() / temperature
    if top_p < 1.0:
        ordered, order = scores.sort()
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[-1] = False   # the most likely token always stays
        scores = scores.masked_fill(torch.zeros_like(tail).scatter(0, order, tail), float("-inf"))
    return scores


