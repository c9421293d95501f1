"""The worker's environment: the errors it reports, stand-ins for what INC imports and static int8
tuning never uses, and the versions it runs with. Standard library only at import time."""
from __future__ import annotations

import importlib.util
import logging
import sys
import types

ERROR_PREFIX = "inc_worker error: "
EXIT_ERROR, EXIT_MISSING, EXIT_DATA = 1, 3, 4

log = logging.getLogger("inc_worker")


class WorkerError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


# --- importing INC without its heavy, unused dependencies -----------------------------------------------


def _install_stand_ins() -> list:
    """onnx-neural-compressor 1.0 imports two big packages at module level that static int8
    tuning does not need, and its metadata declares one and forgets the other:

    - ``transformers`` (126 MB with its own dependencies) only reads a Hugging Face config.json
      lying next to the model file; this worker's model never has one.
    - ``scipy`` (140 MB, not declared) only provides ``scipy.stats.entropy`` for Entropy
      calibration; ONNX Runtime ships the same function for exactly this reason.

    A real package, when installed, always wins over the stand-in."""
    installed = []
    if importlib.util.find_spec("transformers") is None:
        module = types.ModuleType("transformers")

        class PretrainedConfig:  # noqa: D401 - a stand-in
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                raise RuntimeError("transformers is not installed in the INC environment; "
                                   "remove config.json from beside the model")

        module.PretrainedConfig = PretrainedConfig
        sys.modules["transformers"] = module
        installed.append("transformers")
    if importlib.util.find_spec("scipy") is None:
        from onnxruntime.quantization.calibrate import entropy

        scipy = types.ModuleType("scipy")
        stats = types.ModuleType("scipy.stats")
        stats.entropy = entropy
        scipy.stats = stats
        sys.modules["scipy"], sys.modules["scipy.stats"] = scipy, stats
        installed.append("scipy")
    return installed


def import_inc():
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        stand_ins = _install_stand_ins()
        import onnx_neural_compressor  # noqa: F401
        from onnx_neural_compressor import data_reader, quantization  # noqa: F401
        from onnx_neural_compressor.quantization import config, tuning  # noqa: F401
    except ImportError as exc:
        name = getattr(exc, "name", None) or first_line(exc)
        raise WorkerError(f"{sys.executable} cannot import {name} ({first_line(exc)}); "
                          "install requirements-inc.txt into this environment", EXIT_MISSING) from exc
    if stand_ins:
        log.debug("using stand-ins for %s (not needed by static int8 tuning)", ", ".join(stand_ins))


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    from onnx_neural_compressor import version

    return {"onnx_neural_compressor": version.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": numpy.__version__,
            "python": ".".join(map(str, sys.version_info[:3]))}
