"""What a device may import: the artifact format, signing, transfer, runtimes, self-test, data,
statistics, the MQTT contract and the exception tree.

Standard library, numpy, cryptography, zstandard and the runtimes (LiteRT, ONNX Runtime) only;
the import-linter contracts in pyproject.toml keep it so. Nothing here imports the optimizer,
the fleet back end, the command line or the device agent.
"""
from __future__ import annotations

__version__ = "0.1.0"
