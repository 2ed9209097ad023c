"""Several readers' requests served as one batch by one worker thread: the chat app's scheduler.

A request is one or more rows (the rows of one answer pane each). Requests wait in a queue; the
worker, the only thread that runs the model, takes the first one and whatever arrives within
`wait_s` of it — up to `max_rows` rows whose requests have equal settings — and hands them to
`run` together. Each reader iterates its own request's updates; a reader that goes away marks
its request cancelled (`run` stops its rows), not the others'.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from medqa.errors import PipelineError

Row = TypeVar("Row")


@dataclass(eq=False)
class Request(Generic[Row]):
    """One reader's rows and settings, and the queue their updates come back on."""

    rows: Sequence[Row]
    settings: Any  # requests share a batch only when their settings are equal
    updates: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, update: Any) -> None:
        if not self.cancelled.is_set():
            self.updates.put(update)


class Batcher(Generic[Row]):
    """Runs `run(requests)` in one worker thread on batches of waiting requests; `run` sends each
    request its updates (`Request.send`), the last with `done` true."""

    def __init__(self, run: Callable[[list[Request[Row]]], None], max_rows: int, wait_s: float):
        if max_rows < 1:
            raise PipelineError(f"a batch needs room for at least one row, got max_rows={max_rows}")
        self.run, self.max_rows, self.wait_s = run, max_rows, wait_s
        self.batch_sizes: list[int] = []  # rows per batch served, in order (what the tests and the bench read)
        self._pending: list[Request[Row]] = []
        self._arrived = threading.Condition()
        threading.Thread(target=self._serve, name="medqa-batcher", daemon=True).start()

    def submit(self, rows: Sequence[Row], settings: Any) -> Iterator[Any]:
        """Queues `rows` at once and returns the iterator of their updates, ending with the one whose
        `done` is true; closing it early cancels the request."""
        if len(rows) > self.max_rows:
            raise PipelineError(f"{len(rows)} rows do not fit a batch of {self.max_rows}")
        request = Request(list(rows), settings)
        with self._arrived:
            self._pending.append(request)
            self._arrived.notify_all()
        return self._updates(request)

    @staticmethod
    def _updates(request: Request[Row]) -> Iterator[Any]:
        try:
            while True:
                update = request.updates.get()
                if isinstance(update, BaseException):  # raised in the worker, surfaced to its reader
                    raise PipelineError(f"generation failed: {update}") from update
                yield update
                if update.done:
                    return
        finally:
            request.cancelled.set()

    def _joinable(self, first: Request[Row]) -> list[Request[Row]]:
        """The waiting requests that can share `first`'s batch, in arrival order, within `max_rows`."""
        batch, rows = [], 0
        for request in self._pending:
            if request.settings == first.settings and rows + len(request.rows) <= self.max_rows:
                batch.append(request)
                rows += len(request.rows)
        return batch

    def _next_batch(self) -> list[Request[Row]]:
        with self._arrived:
            while not self._pending:
                self._arrived.wait()
            # Readers who ask at nearly the same moment share a batch: wait a little for them.
            deadline = time.monotonic() + self.wait_s
            while sum(len(r.rows) for r in self._joinable(self._pending[0])) < self.max_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.wait(left)
            batch = self._joinable(self._pending[0])
            self._pending = [r for r in self._pending if r not in batch]
        return [r for r in batch if not r.cancelled.is_set()]

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(sum(len(r.rows) for r in batch))
            try:
                self.run(batch)
            except BaseException as exc:  # every reader of the batch hears of it; the worker goes on
                for request in batch:
                    request.send(exc)
