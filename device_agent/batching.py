"""Dynamic batching: concurrent requests merged into one model run, as Triton's dynamic batcher does.

With ``max_batch > 1`` and a model whose inputs have a free batch axis, a request that arrives
while another one waits joins it: its rows are appended along axis 0. A batch goes to the model
when it holds ``max_batch`` rows, or when ``max_delay_ms`` have passed since its first request
arrived (then, if every instance is busy, it keeps taking requests until one is free). Each
caller gets exactly its own rows of every output back, and the batch's run time as its
``run_ms``.

No thread of its own: the first request of a batch leads it (waits, takes a free instance, runs
the merged batch, hands every request its rows); the others wait for their rows. With several
instances, several batches are in flight at once.

Only requests that can share a run are merged: the same input names, dtypes and shapes past the
batch axis, every input with the same number of rows, fewer rows than ``max_batch`` (a request
that big runs by itself). Validation happened before, per request. If the merged run fails, or
its outputs do not have one row per input row, every request of the batch runs again by itself,
so the one that the model cannot take gets its own error and the others their answers.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from edgeml.core.errors import first_line

from .instances import RunnerPool

log = logging.getLogger("edgeml-agent.batching")

Feed = Dict[str, np.ndarray]
Result = Tuple[Dict[str, np.ndarray], float]  # outputs, the model's milliseconds


class _Request:
    __slots__ = ("feed", "rows", "done", "result", "run_ms", "error", "alone")

    def __init__(self, feed: Feed, rows: int):
        self.feed, self.rows = feed, rows
        self.done = threading.Event()
        self.result: Optional[Dict[str, np.ndarray]] = None
        self.run_ms: Optional[float] = None
        self.error: Optional[BaseException] = None
        self.alone = False  # run it by itself: its batch failed, or the outputs could not be split


class _Batch:
    __slots__ = ("key", "requests", "rows", "deadline", "full")

    def __init__(self, key, deadline: float):
        self.key, self.deadline = key, deadline
        self.requests: List[_Request] = []
        self.rows = 0
        self.full = threading.Event()

    def add(self, request: _Request) -> None:
        self.requests.append(request)
        self.rows += request.rows


class DynamicBatcher:
    """Merge concurrent requests for ``pool``'s instances. ``refuse(exc, feed)`` turns a model's
    failure on one request into the exception its caller gets."""

    def __init__(self, pool: RunnerPool, refuse: Callable[[Exception, Feed], Exception], max_batch: int,
                 max_delay_ms: float):
        if max_batch < 2:
            raise ValueError("dynamic batching needs max_batch of 2 or more")
        self.pool, self.refuse = pool, refuse
        self.max_batch = int(max_batch)
        self.max_delay_s = max(0.0, float(max_delay_ms)) / 1000.0
        self._lock = threading.Lock()
        self._open: Dict[tuple, _Batch] = {}  # by what requests must share to be merged
        self.batches = self.requests = self.rows = 0  # batches run, the requests and rows they held
        self._warned_split = False

    def infer(self, feed: Feed) -> Result:
        """Run ``feed`` (validated) in a batch with whatever arrives meanwhile; raise its own error."""
        rows = self._rows(feed)
        if rows is None:
            return self.run_alone(feed)
        request = _Request(feed, rows)
        batch = self._join(request)
        if batch is not None:
            self._lead(batch)
        else:
            request.done.wait()
        if request.error is not None:
            raise request.error
        if request.alone:
            return self.run_alone(feed)
        return request.result, request.run_ms

    def run_alone(self, feed: Feed) -> Result:
        try:
            return self.pool.run(feed)
        except Exception as exc:  # the runtimes raise their own untyped errors
            raise self.refuse(exc, feed) from exc

    def stats(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "batch_requests": self.requests, "batch_rows": self.rows}

    # -- forming batches --------------------------------------------------------------------------

    def _rows(self, feed: Feed) -> Optional[int]:
        """The rows of a request that may be merged; None for one that runs by itself."""
        counts = {x.shape[0] if x.ndim else -1 for x in feed.values()}
        if len(counts) != 1:
            return None
        rows = counts.pop()
        return rows if 0 < rows < self.max_batch else None

    def _join(self, request: _Request) -> Optional[_Batch]:
        """Add ``request`` to the open batch it fits in; else open a new one: that batch, which
        this request leads, is returned."""
        key = tuple((name, x.dtype.str, x.shape[1:]) for name, x in request.feed.items())
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.rows + request.rows <= self.max_batch:
                batch.add(request)
                if batch.rows >= self.max_batch:
                    self._close(batch)
                return None
            if batch is not None:  # it cannot take these rows: it goes as it is, in arrival order
                self._close(batch)
            batch = _Batch(key, time.monotonic() + self.max_delay_s)
            batch.add(request)
            self._open[key] = batch
            return batch

    def _close(self, batch: _Batch) -> None:
        """No more requests join ``batch`` (call with the lock held)."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.full.set()

    # -- running them ---------------------------------------------------------------------------

    def _lead(self, batch: _Batch) -> None:
        """Wait until the batch is full or its delay has passed, run it on a free instance and hand
        every request its outcome."""
        try:
            batch.full.wait(max(0.0, batch.deadline - time.monotonic()))
            with self.pool.instance() as inst:  # while every instance is busy, the batch still grows
                with self._lock:
                    self._close(batch)
                    requests = list(batch.requests)
                    self.batches += 1
                    self.requests += len(requests)
                    self.rows += batch.rows
                if len(requests) == 1:
                    request = requests[0]
                    try:
                        request.result, request.run_ms = inst.run(request.feed)
                    except Exception as exc:
                        request.error = self.refuse(exc, request.feed)
                        request.error.__cause__ = exc
                    return
                merged = {name: np.concatenate([r.feed[name] for r in requests]) for name in requests[0].feed}
                try:
                    result, run_ms = inst.run(merged)
                except Exception as exc:
                    log.info("a batch of %d requests failed (%s); running each by itself",
                             len(requests), first_line(exc, 200))
                    return  # every request runs alone (finally)
            if any(np.ndim(v) == 0 or v.shape[0] != batch.rows for v in result.values()):
                if not self._warned_split:
                    self._warned_split = True
                    log.warning("the model's outputs do not have one row per input row; batches run again "
                                "request by request (turn dynamic batching off for this model)")
                return
            start = 0
            for r in requests:
                r.result = {name: v[start:start + r.rows] for name, v in result.items()}
                r.run_ms = run_ms
                start += r.rows
        finally:
            with self._lock:
                self._close(batch)
            for r in batch.requests:  # final once closed
                if r.result is None and r.error is None:
                    r.alone = True
                r.done.set()
