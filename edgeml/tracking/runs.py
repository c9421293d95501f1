"""An optimize run recorded in MLflow: opened before the build (its parameters, so a long build
is visible while it runs), closed after it (one set of metrics per candidate and per training
stage, the chosen candidate as tags, the artifact, plot and report as artifacts, and the artifact
registered as a new model version when asked).

A tracking server that is down or refuses never costs the build: the artifact is written first,
and what could not be recorded comes back as one ``TrackingError`` (exit 10)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

from edgeml.core.artifact import read_artifact

from .client import TrackingError, client, describe, stdout_to_stderr, tracking_uri

log = logging.getLogger("edgeml.tracking")

DEFAULT_EXPERIMENT = "edgeml"
MAX_PARAM = 6000  # MLflow's limit on a parameter's value


def candidate_metrics(result: dict) -> dict:
    """``{recipe}.bytes``, ``{recipe}.zstd_bytes``, ``{recipe}.drop``, ``{recipe}.latency_p50_ms``, ...
    for each candidate built, ``stage.{name}.…`` for each training stage."""
    metrics = {}
    for prefix, rows in (("", result.get("candidates") or []), ("stage.", result.get("stages") or [])):
        for row in rows:
            if row.get("failed"):
                continue
            key = prefix + (row.get("stage") or row["recipe"])
            values = {"bytes": row.get("bytes"), "zstd_bytes": row.get("zstd_bytes"),
                      "latency_p50_ms": (row.get("latency_ms") or {}).get("median_ms"),
                      "latency_p95_ms": (row.get("latency_ms") or {}).get("p95_ms"),
                      **{k: v for k, v in (row.get("quality") or {}).items() if k != "drop_kind"},
                      **{f"ratio_{k}": v for k, v in (row.get("ratio_to_fp32") or {}).items()}}
            if prefix:
                values.update(drop_vs_input=row.get("drop_vs_input"), params=row.get("params"),
                              nonzero_params=row.get("nonzero_params"))
            metrics.update({f"{key}.{k}": float(v) for k, v in values.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v})
    for k in ("artifact_bytes", "float_accuracy"):
        if isinstance(result.get(k), (int, float)):
            metrics[k] = float(result[k])
    return metrics


class OptimizeRun:
    """One optimize run in MLflow. ``start`` never raises (the build goes on); ``finish`` raises
    ``TrackingError`` when anything could not be recorded."""

    def __init__(self, params: dict, run_name: str, experiment: Optional[str] = None,
                 register: Optional[str] = None, parent_run_id: Optional[str] = None):
        self.params, self.run_name = params, run_name
        self.experiment, self.register, self.parent_run_id = experiment, register, parent_run_id
        self.run_id: Optional[str] = None
        self.uri = tracking_uri()
        self._client = client()
        self.start_error: Optional[str] = None

    def start(self) -> None:
        try:
            with stdout_to_stderr():
                self._open()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the build must go on
            self.start_error = describe(exc)
            log.warning("MLflow at %s: %s; building anyway, and trying again at the end", self.uri, self.start_error)

    def _open(self) -> None:
        c = self._client
        experiment_id = None
        if self.experiment is None and self.parent_run_id:
            experiment_id = c.get_run(self.parent_run_id).info.experiment_id  # nested where the source was logged
        if experiment_id is None:
            name = self.experiment or DEFAULT_EXPERIMENT
            found = c.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else c.create_experiment(name)
        tags = {"mlflow.runName": self.run_name, "edgeml.tool": "edgeml optimize"}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = c.create_run(experiment_id, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        c.log_batch(self.run_id, params=[Param(k, _param(v)) for k, v in sorted(self.params.items())])

    def finish(self, result: dict, artifact: Path, files: Iterable[Path], goal_met: bool) -> dict:
        """Record the outcome; what was recorded (run id, registered version) as a dict."""
        with stdout_to_stderr():
            return self._finish(result, artifact, files, goal_met)

    def _finish(self, result: dict, artifact: Path, files: Iterable[Path], goal_met: bool) -> dict:
        from mlflow.entities import Metric, RunTag

        c = self._client
        out = {"tracking_uri": self.uri}
        try:
            if self.run_id is None:
                self._open()
            out["run_id"] = self.run_id
            art = read_artifact(artifact)
            tags = {"edgeml.chosen": result.get("chosen"), "edgeml.goal_met": str(bool(goal_met)).lower(),
                    "edgeml.artifact_sha256": art.sha256, "edgeml.key_id": art.key_id,
                    "edgeml.name": art.manifest["name"], "edgeml.version": str(art.manifest["version"])}
            metrics = candidate_metrics(result)
            now = int(time.time() * 1000)
            c.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())],
                        tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])
            c.log_artifact(self.run_id, str(artifact), "edgeml")
            for f in files:
                c.log_artifact(self.run_id, str(f), "report")
            if self.register:
                if goal_met:
                    out["registered"] = self._register(art)
                else:
                    out["registered"] = None
                    log.warning("not registered as %s: the artifact missed its accuracy goal", self.register)
            c.set_terminated(self.run_id, "FINISHED")
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail_quietly()
            where = f"run {self.run_id}" if self.run_id else "a run"
            raise TrackingError(f"wrote {artifact}, but recording {where} in MLflow at {self.uri} failed: "
                                f"{describe(exc)}; the artifact is fine to use, and a run with --mlflow once the "
                                "server is back records it") from exc
        return out

    def _register(self, art) -> dict:
        from mlflow.exceptions import MlflowException

        c = self._client
        try:
            c.create_registered_model(self.register, description="Signed edgeml artifacts (.edgeml)")
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{c.get_run(self.run_id).info.artifact_uri}/edgeml"
        from edgeml.core import __version__

        mv = c.create_model_version(self.register, source=source, run_id=self.run_id, tags={
            "edgeml_version": __version__, "key_id": art.key_id, "sha256": art.sha256,
            "edgeml.name": art.manifest["name"], "edgeml.version": str(art.manifest["version"])})
        return {"name": self.register, "version": int(mv.version), "uri": f"models:/{self.register}/{mv.version}"}

    def _fail_quietly(self) -> None:
        if self.run_id is None:
            return
        try:
            self._client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the server is the problem already reported
            pass


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 3] + "..."
