"""The worker-thread lifecycle the batcher and the scheduler share: one daemon thread draining a
queue until a stop marker, and submissions refused once it stops."""

from __future__ import annotations

import queue
import threading
from typing import Any


class QueueWorker:
    """One daemon thread running `_loop`, which takes items from `_queue` until it gets None
    (the stop marker `stop` queues). Subclasses set `thread_name` and implement `_loop`."""

    thread_name = "peftlab-worker"

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()   # None: stop
        self._state = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        """Start the worker thread."""
        with self._state:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the worker finish what was submitted before, then end its thread."""
        with self._state:
            if self._thread is None or self._stopping:
                return
            self._stopping = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError
