"""Fleet updates on the device: the desired model fetched over the broker (or HTTP), verified,
self-tested, swapped in, watched on live traffic, committed or rolled back by the device itself."""
from __future__ import annotations

from .engine import UpdateEngine, serving_path, update_status
from .health import HealthMonitor, Tee
from .store import UpdateStore

__all__ = ["HealthMonitor", "Tee", "UpdateEngine", "UpdateStore", "serving_path", "update_status"]
