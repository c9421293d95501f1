"""A tiny Prometheus registry: counters, gauges and histograms rendered in the text format 0.0.4.

Standard library only: the agent runs on devices where every dependency costs. Metrics are
created on first use (``registry.gauge(name, help)`` returns the same gauge every time), take
their labels as keyword arguments, and are safe to update from any thread.
"""
from __future__ import annotations

import math
import os
import re
import threading
from typing import Callable, Dict, Iterable, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Inference on a small CPU: sub-millisecond for tiny models up to seconds for big ones.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = Tuple[Tuple[str, str], ...]
Sample = Tuple[Dict[str, str], float]


_VALID_LABELS = set()  # names already checked: every request updates metrics, the names are few


def _labels(labels: Dict[str, object]) -> Labels:
    for key in labels:
        if key not in _VALID_LABELS:
            if not _LABEL_RE.match(key) or key.startswith("__"):
                raise ValueError(f"{key!r} is not a valid Prometheus label name")
            _VALID_LABELS.add(key)
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, lock: threading.Lock):
        self.name, self.help, self._lock = name, help, lock
        self._values: Dict[Labels, float] = {}

    def get(self, **labels) -> float:
        """The current value (0 if never set): for tests and for code that reads its own metrics."""
        with self._lock:
            return self._values.get(_labels(labels), 0.0)

    def samples(self) -> List[Tuple[str, Labels, float]]:
        return [(self.name, key, value) for key, value in sorted(self._values.items())]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = float(value)


class GaugeFunction(_Metric):
    """A gauge read when the registry is rendered: ``fn`` returns ``[(labels, value), ...]``."""

    kind = "gauge"

    def __init__(self, name, help, lock, fn: Callable[[], Iterable[Sample]]):
        super().__init__(name, help, lock)
        self.fn = fn

    def samples(self):
        return [(self.name, _labels(labels), float(value)) for labels, value in self.fn()]


class CounterFunction(GaugeFunction):
    """A counter read when the registry is rendered (``fn`` as for ``GaugeFunction``): for counts
    kept by the code that counts them, such as the serving model's instances and cache."""

    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, lock, buckets=LATENCY_BUCKETS):
        super().__init__(name, help, lock)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._series: Dict[Labels, List[float]] = {}  # per-bucket counts (not cumulative), sum, count

    def observe(self, value: float, **labels) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
                    break
            series[-2] += value
            series[-1] += 1

    def count(self, **labels) -> float:
        with self._lock:
            series = self._series.get(_labels(labels))
            return series[-1] if series else 0.0

    def samples(self):
        out = []
        for key, series in sorted(self._series.items()):
            cumulative = 0.0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                out.append((f"{self.name}_bucket", key + (("le", _number(bound)),), cumulative))
            out.append((f"{self.name}_bucket", key + (("le", "+Inf"),), series[-1]))
            out.append((f"{self.name}_sum", key, series[-2]))
            out.append((f"{self.name}_count", key, series[-1]))
        return out


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: Dict[str, _Metric] = {}

    def counter(self, name: str, help: str) -> Counter:
        return self._get(Counter, name, help)

    def gauge(self, name: str, help: str) -> Gauge:
        return self._get(Gauge, name, help)

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help, buckets)

    def gauge_function(self, name: str, help: str, fn: Callable[[], Iterable[Sample]]) -> GaugeFunction:
        """Registering the name again replaces ``fn``: the registry may outlive what fn reads."""
        metric = self._get(GaugeFunction, name, help, fn)
        metric.fn = fn
        return metric

    def counter_function(self, name: str, help: str, fn: Callable[[], Iterable[Sample]]) -> CounterFunction:
        """As ``gauge_function``, for a value that only goes up (``fn`` must keep it so)."""
        metric = self._get(CounterFunction, name, help, fn)
        metric.fn = fn
        return metric

    def render(self) -> str:
        """The exposition text: HELP and TYPE for every metric, then its samples."""
        with self._lock:
            metrics = list(self._metrics.values())
            lines = []
            for metric in metrics:
                lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
                for name, labels, value in metric.samples():
                    lines.append(f"{name}{_format_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"

    def _get(self, cls, name, help, *args):
        if not _NAME_RE.match(name):
            raise ValueError(f"{name!r} is not a valid Prometheus metric name")
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = cls(name, help, self._lock, *args)
            elif type(metric) is not cls:
                raise ValueError(f"metric {name} is already registered as a {type(metric).__name__}")
            return metric


def resident_memory() -> List[Sample]:
    """This process's resident set size from /proc (Linux, which is what devices run); none elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return []
    return [({}, pages * os.sysconf("SC_PAGE_SIZE"))]


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
