"""/metrics for how the model is served: its instances, dynamic batching and the response cache.

Read from the serving ``ModelService`` at scrape time (``get_service()``: the daemon swaps the
service on updates and reloads). The counters add up across swaps, so they only go up; the
gauges describe the model serving now.

    edgeml_model_instances                        interpreters of the serving model
    edgeml_model_instances_busy                   of them, running a request now
    edgeml_model_instance_memory_bytes{instance}  resident memory each one's creation added
    edgeml_model_instance_runs_total{instance}    model runs on each (a merged batch counts once)
    edgeml_batches_total                          batches the dynamic batcher ran
    edgeml_batch_requests_total                   requests they held (/ batches: the mean batch)
    edgeml_batch_rows_total                       rows they held
    edgeml_cache_hits_total, edgeml_cache_misses_total, edgeml_cache_evictions_total
    edgeml_cache_bytes, edgeml_cache_entries      what the response cache holds now (0 when off)
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Optional, Tuple

from . import metrics as m

Key = Tuple[str, Optional[str]]  # (count, instance)


def register_serving_metrics(registry: m.Registry, get_service: Callable[[], object]) -> None:
    """Add the serving metrics to ``registry``; ``get_service()`` returns the ModelService serving now."""
    totals = _Totals(get_service)

    def stats() -> Optional[dict]:
        service = get_service()
        return service.serving_stats() if service is not None else None

    def instances():
        s = stats()
        return [] if s is None else [({}, s["instances"])]

    def busy():
        service = get_service()
        return [] if service is None else [({}, service.pool.busy())]

    def memory():
        s = stats()
        return [] if s is None else [({"instance": i}, b) for i, b in enumerate(s["instance_memory_bytes"])]

    def runs():
        return [({"instance": inst}, n) for (count, inst), n in sorted(totals.read().items(), key=_order)
                if count == "runs"]

    def total(count: str):
        return lambda: [({}, totals.read().get((count, None), 0))]

    def cache(field: str):
        def read():
            s = stats()
            return [] if s is None else [({}, (s["cache"] or {}).get(field, 0))]
        return read

    registry.gauge_function("edgeml_model_instances", "Interpreters of the serving model", instances)
    registry.gauge_function("edgeml_model_instances_busy", "Interpreters running a request now", busy)
    registry.gauge_function("edgeml_model_instance_memory_bytes",
                            "Resident memory each interpreter's creation, self-test and warm-up added", memory)
    registry.counter_function("edgeml_model_instance_runs_total",
                              "Model runs on each interpreter (a merged batch counts once)", runs)
    registry.counter_function("edgeml_batches_total", "Batches the dynamic batcher ran", total("batches"))
    registry.counter_function("edgeml_batch_requests_total", "Requests the dynamic batcher's batches held",
                              total("batch_requests"))
    registry.counter_function("edgeml_batch_rows_total", "Rows the dynamic batcher's batches held",
                              total("batch_rows"))
    registry.counter_function("edgeml_cache_hits_total", "Requests answered from the response cache",
                              total("cache_hits"))
    registry.counter_function("edgeml_cache_misses_total", "Requests the response cache did not hold",
                              total("cache_misses"))
    registry.counter_function("edgeml_cache_evictions_total", "Answers the response cache dropped for room",
                              total("cache_evictions"))
    registry.gauge_function("edgeml_cache_bytes", "Bytes the response cache holds", cache("cache_bytes"))
    registry.gauge_function("edgeml_cache_entries", "Answers the response cache holds", cache("cache_entries"))


class _Totals:
    """The counts of every service that served, added up: a swap does not reset the counters."""

    def __init__(self, get_service):
        self.get_service = get_service
        self._lock = threading.Lock()
        self._ref = None  # weak: an old model's interpreters must not outlive its swap for a metric
        self._last: Dict[Key, float] = {}  # its counts at the last read
        self._base: Dict[Key, float] = {}  # the counts of the services before it

    def read(self) -> Dict[Key, float]:
        service = self.get_service()
        with self._lock:
            previous = self._ref() if self._ref is not None else None
            if previous is not service:
                final = _counts(previous) if previous is not None else self._last
                for key, n in final.items():
                    self._base[key] = self._base.get(key, 0) + n
                self._ref = weakref.ref(service) if service is not None else None
            self._last = _counts(service) if service is not None else {}
            return {key: self._base.get(key, 0) + self._last.get(key, 0) for key in set(self._base) | set(self._last)}


def _counts(service) -> Dict[Key, float]:
    s = service.serving_stats()
    counts: Dict[Key, float] = {("runs", str(i)): n for i, n in enumerate(s["instance_runs"])}
    for name in ("batches", "batch_requests", "batch_rows"):
        counts[(name, None)] = s[name]
    for name in ("cache_hits", "cache_misses", "cache_evictions"):
        counts[(name, None)] = (s["cache"] or {}).get(name, 0)
    return counts


def _order(item) -> tuple:
    (count, instance), _ = item
    return count, int(instance) if instance is not None else -1
