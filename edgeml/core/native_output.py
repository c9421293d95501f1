"""Keep native libraries' chatter (TensorFlow, the TFLite converter, LiteRT's delegate notes)
off the user's terminal: it is written from C++ to file descriptor 2, past ``sys.stderr``."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile

log = logging.getLogger(__name__)


@contextlib.contextmanager
def captured_stderr():
    """Send file descriptor 2 to a temp file for the duration; log the text at DEBUG afterwards.

    Not thread-safe (the descriptor is process-wide): use it around loading and converting,
    not around serving.
    """
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("captured native output:\n%s", text)
