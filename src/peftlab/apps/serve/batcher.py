"""Batcher: one worker thread that gathers the requests arriving together into batches."""

from __future__ import annotations

import queue
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from .engine import Job
from .worker import QueueWorker


class ServerClosing(RuntimeError):
    """The server is shutting down and takes no new requests."""


class Batcher(QueueWorker):
    """Runs queued jobs in batches on one worker thread.

    A batch starts with the oldest waiting job and takes the later jobs of its group (same
    kind and sampling settings), in arrival order, until it holds `max_batch_size` jobs or
    `max_wait_ms` have passed since that oldest job arrived, and while it needs at most
    `max_adapters` distinct adapters (the bank must hold them all at once). Jobs left out wait
    for the next batch, ahead of newer arrivals. `run(jobs)` returns one answer per job; when it
    raises, each job of the batch runs alone, so an error reaches only the requests that cause it.
    """

    thread_name = "peftlab-batcher"

    def __init__(self, run: Callable[[Sequence[Job]], list[Any]], *, max_batch_size: int = 16,
                 max_wait_ms: float = 10.0, max_adapters: int = 8) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_adapters < 1:
            raise ValueError("max_batch_size and max_adapters must be >= 1 and max_wait_ms >= 0, got "
                             f"{max_batch_size}, {max_adapters} and {max_wait_ms}")
        super().__init__()
        self._run = run
        self.max_batch_size, self.max_adapters = max_batch_size, max_adapters
        self.max_wait = max_wait_ms / 1000
        self._waiting: deque[Job] = deque()     # taken from the queue, not yet batched (worker only)
        self.batch_sizes: Counter[int] = Counter()   # batch size -> batches run at that size

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gets the answer (or the exception that stopped it)."""
        with self._state:   # so that no job lands behind the stop marker
            if not self.running:
                raise ServerClosing("the server is not running (starting up or shutting down); retry")
            self._queue.put(job)
        return job.future

    def pending(self) -> int:
        """Jobs queued or waiting for a batch (approximate: read without a lock)."""
        return self._queue.qsize() + len(self._waiting)

    # ---- worker -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        closing = False
        while True:
            if not self._waiting:
                if closing:
                    return
                job = self._queue.get()
                if job is None:
                    closing = True
                    continue
                self._waiting.append(job)
            batch, closing = self._collect(closing)
            # From here a job cannot be cancelled; one cancelled while it waited is dropped.
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if batch:
                self._execute(batch)

    def _collect(self, closing: bool) -> tuple[list[Job], bool]:
        """The next batch, after waiting out the window of its oldest job (not when closing),
        and whether the stop marker arrived meanwhile."""
        closing = self._drain() or closing   # jobs that queued up while the last batch ran
        first = self._waiting[0]
        deadline = first.arrived + self.max_wait
        while not closing and len(self._select(first)) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                closing = True
            else:
                self._waiting.append(job)
        chosen = self._select(first)
        batch = [self._waiting[i] for i in chosen]
        taken = set(chosen)
        self._waiting = deque(j for i, j in enumerate(self._waiting) if i not in taken)
        return batch, closing

    def _drain(self) -> bool:
        """Move every queued job to the waiting ones without blocking; whether the stop marker
        was among them."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            self._waiting.append(job)

    def _select(self, first: Job) -> list[int]:
        """Indices into the waiting jobs of the batch that `first` starts."""
        chosen: list[int] = []
        adapters: set[str] = set()
        for i, job in enumerate(self._waiting):
            if len(chosen) == self.max_batch_size:
                break
            if job.group != first.group:
                continue
            more = {job.adapter} - {None} - adapters
            if len(adapters) + len(more) > self.max_adapters:
                continue
            adapters |= more
            chosen.append(i)
        return chosen

    def _execute(self, batch: list[Job]) -> None:
        try:
            answered = list(zip(batch, self._run(batch), strict=True))
        except Exception as e:   # the worker must outlive any batch
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:
                for job in batch:
                    self._execute([job])
            return
        self.batch_sizes[len(batch)] += 1
        for job, answer in answered:
            job.future.set_result(answer)
