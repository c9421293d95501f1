"""One MLflow client with bounded waits, and MLflow's errors as one line."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from edgeml.core.errors import EdgemlError, UsageError, first_line

URI_RE = re.compile(r"^(models|runs):/")

# MLflow retries a failed request 7 times with a backoff factor of 2 and waits up to 120 s for
# each: minutes of silence for a server that is down. These bound it, unless the user set them.
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(EdgemlError):
    """The artifact was written, but recording it in MLflow (run, metrics, registry) failed."""

    exit_code = 10

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


def is_mlflow_uri(value) -> bool:
    """``models:/name/version``, ``models:/name@alias`` or ``runs:/run_id/path``."""
    return bool(URI_RE.match(str(value)))


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise UsageError("MLflow needs MLFLOW_TRACKING_URI (say http://mlflow.example:5000); "
                         "set it to the tracking server that holds your models and runs")
    return uri


def client():
    """An ``MlflowClient`` on MLFLOW_TRACKING_URI whose requests give up within about a minute."""
    for name, value in BOUNDED_HTTP.items():
        os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each retry is not news; the outcome is
    uri = tracking_uri()
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise UsageError("MLflow support needs the mlflow extra: pip install 'edgeml[mlflow]'") from exc
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def describe(exc: BaseException) -> str:
    """MLflow's error, one line, without the retry library's wrapping."""
    text = first_line(exc, 400)
    m = re.search(r"Max retries exceeded with url: (\S+) \(Caused by (\w+)", text)
    if m:
        return f"the server did not answer ({m.group(2)} for {m.group(1)})"
    return text


def stdout_to_stderr():
    """MLflow prints ("View run ... at ...") on stdout, where ``--json`` keeps one JSON object."""
    return contextlib.redirect_stdout(sys.stderr)
