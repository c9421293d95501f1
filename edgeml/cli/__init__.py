"""The ``edgeml`` command: thin commands over the library, one module per command group."""
from __future__ import annotations

from .main import cli, main

__all__ = ["cli", "main"]
