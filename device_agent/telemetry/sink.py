"""What the serving side tells telemetry: one call per request, success or failure.

The HTTP API and the in-process API call a ``TelemetrySink``; ``device_agent.telemetry.recorder`` turns
the calls into durable records (see ``edgeml.core.mqtt_contract`` for the record kinds).
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol

import numpy as np


class TelemetrySink(Protocol):
    def inference(self, model: str, version: int, latency_ms: float,
                  inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray], run_ms: Optional[float] = None) -> None:
        """A request that was served: ``latency_ms`` from request to response, ``run_ms`` of it in the model."""

    def error(self, model: Optional[str], status: int, message: str, latency_ms: float) -> None:
        """A request that was refused (4xx) or failed (5xx)."""


class NullSink:
    """For embedding without telemetry, and for tests of the API alone."""

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None) -> None:
        pass

    def error(self, model, status, message, latency_ms) -> None:
        pass
