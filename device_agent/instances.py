"""Model instances: several interpreters of one model, each run by one request at a time.

Like Triton's instance groups: with ``instances = N`` the agent holds N runners of the serving
model, so N requests run at once on N cores (LiteRT and ONNX Runtime release the GIL while they
compute). LiteRT interpreters are not thread-safe, so a runner is only ever used by the thread
that took it from the pool; a request that finds every instance busy waits for the first one
freed.

What an instance costs is measured, not guessed: the growth of the process's resident memory
while its runner is created, self-tested and warmed up (the first runs allocate arenas and pack
weights). The first instance of the first model a process loads also carries the runtime's own
libraries, so the later instances are the better estimate of what one more costs.
"""
from __future__ import annotations

import queue
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np

from .telemetry.sysstats import rss_bytes


class Instance:
    """One runner of the model and what it did: ``memory_bytes`` (resident memory its creation
    added), ``runs`` (model runs, failed ones too, a merged batch counting once)."""

    def __init__(self, index: int, runner, memory_bytes: int = 0):
        self.index = index
        self.runner = runner
        self.memory_bytes = memory_bytes
        self.runs = 0

    def run(self, feed: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], float]:
        """Run one batch; the outputs and the milliseconds the model took. Only the thread holding
        this instance (``RunnerPool.instance()``) may call it."""
        started = time.perf_counter()
        raw, _ = self.invoke(self.runner.encode(feed))
        return self.runner.decode(raw), (time.perf_counter() - started) * 1000.0

    def invoke(self, args: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], float]:
        """The runtime's call alone (inputs already encoded): what it returned and its seconds.
        Only the thread holding this instance may call it."""
        started = time.perf_counter()
        try:
            return self.runner.invoke(args), time.perf_counter() - started
        finally:
            self.runs += 1  # failed runs too: the instance was busy with them


class RunnerPool:
    """The instances of one model; ``instance()`` lends a free one (waiting while all are busy)."""

    def __init__(self, instances: List[Instance]):
        if not instances:
            raise ValueError("a pool needs at least one instance")
        self.instances = list(instances)
        # last in, first out: under light load one instance stays hot in the caches, the others
        # take requests only when requests overlap
        self._free: "queue.LifoQueue[Instance]" = queue.LifoQueue()
        for inst in reversed(self.instances):
            self._free.put(inst)

    @classmethod
    def build(cls, make: Callable[[int], object], count: int) -> "RunnerPool":
        """``make(i)`` creates (and prepares) the runner of instance i; each one's resident-memory
        growth is measured while it is made, one after the other."""
        instances = []
        for index in range(count):
            before = rss_bytes()
            runner = make(index)
            after = rss_bytes()
            grown = max(0, after - before) if before is not None and after is not None else 0
            instances.append(Instance(index, runner, grown))
        return cls(instances)

    @property
    def size(self) -> int:
        return len(self.instances)

    @property
    def first(self):
        """The first instance's runner: its tensor specs describe the model."""
        return self.instances[0].runner

    @contextmanager
    def instance(self) -> Iterator[Instance]:
        """A free instance for the duration of the block, for this thread only."""
        inst = self._free.get()
        try:
            yield inst
        finally:
            self._free.put(inst)

    def run(self, feed: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], float]:
        """Run ``feed`` on the first free instance: outputs and the model's milliseconds (quantizing
        and dequantizing included, waiting for an instance not).

        An instance is held only while the runtime computes: inputs are quantized before one is
        taken and outputs dequantized after it is back (the specs are every instance's), so
        another request's runtime call never waits on this one's numpy work. Measured on
        MobileNetV2 at 16 clients with one instance: quantizing inside the hold, under contention
        for the interpreter lock, took 0.6 ms of each 4.3 ms the instance was held."""
        runner = self.first
        started = time.perf_counter()
        args = runner.encode(feed)
        spent = time.perf_counter() - started
        with self.instance() as inst:
            raw, seconds = inst.invoke(args)
        spent += seconds
        started = time.perf_counter()
        out = runner.decode(raw)
        return out, (spent + time.perf_counter() - started) * 1000.0

    def busy(self) -> int:
        return self.size - self._free.qsize()

    def stats(self) -> dict:
        return {"instances": self.size,
                "instance_memory_bytes": [i.memory_bytes for i in self.instances],
                "instance_runs": [i.runs for i in self.instances]}

