"""The host side of a device fleet: collect MQTT telemetry into SQLite or PostgreSQL, list devices."""
from __future__ import annotations

from .store import Store, open_store


def __getattr__(name):
    # paho-mqtt loads only for collecting, not for reading the store.
    if name in ("Collector", "serve"):
        from . import collector

        return getattr(collector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Collector", "Store", "open_store", "serve"]
