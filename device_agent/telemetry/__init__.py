"""Telemetry on the device: what serving reports (``sink``), the recorder that turns it into records,
the durable on-disk queue they wait in for the broker, and system statistics."""
from __future__ import annotations

from .queue import TelemetryQueue
from .recorder import Recorder

__all__ = ["Recorder", "TelemetryQueue"]
