"""The agent's local HTTP API (Open Inference Protocol / KServe v2) and its Prometheus metrics."""
from __future__ import annotations

from .server import ApiServer

__all__ = ["ApiServer"]
