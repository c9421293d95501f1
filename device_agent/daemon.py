"""``edgeml-agent run``: serve a verified artifact offline, keep telemetry until a broker takes it.

Start order: verify and warm up the model (refuse to start otherwise) → open the durable
telemetry queue → local API → MQTT link (optional: without a broker the agent serves and
queues). SIGTERM or SIGINT stop it cleanly: the API stops taking requests, telemetry is flushed
to disk and, if a broker is reachable, published; presence goes offline. SIGHUP re-reads the
config file (flags given at start still win) and applies what changed: a new artifact is
verified and warmed up before it replaces the old one, which serves until then.

With a broker, the agent also takes fleet updates (``device_agent.updates``): the host's desired
model is fetched, verified, self-tested, swapped in beside the serving one, watched on live
traffic and committed or rolled back. At start the agent serves what the update state on disk
says (``serving_path``): the committed model, or the one an interrupted update was at.

``Agent`` is also the in-process API for apps that embed the agent: ``Agent(config).start()``,
then ``agent.infer({...})``.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import replace
from typing import Dict, Optional

import numpy as np

from .config import AgentConfig, load_config

log = logging.getLogger("edgeml-agent")
QUEUE_FILE = "telemetry.db"
MODEL_KEYS = ("artifact", "public_key", "threads", "instances", "max_batch", "max_delay_ms", "cache_bytes")
LINK_KEYS = ("broker", "username", "password_file", "ca_file", "cert_file", "key_file", "fleet", "device_id",
             "ack_timeout_s", "fetch_timeout_s", "fetch_attempts")
API_KEYS = ("api", "max_body_bytes", "token_file", "open_health", "tls_cert_file", "tls_key_file", "tls_client_ca_file",
            "backlog", "max_connections", "workers", "request_timeout_s")


class Agent:
    def __init__(self, config: AgentConfig, flags: Optional[dict] = None):
        self.config = config
        self.flags = dict(flags or {})  # what the command line set, re-applied on reload
        self.service = None
        self.queue = None
        self.recorder = None
        self.drift = None  # drift of the serving model's inputs and predictions (None: off)
        self.feedback = None  # ground truth for earlier requests and its reservoir (None: off)
        self.shadow = None  # a candidate run beside the serving model on sampled requests (None: none)
        self._chores = None  # the thread that hands feedback windows to telemetry and saves the reservoir
        self.monitor = None  # live health of the serving model, for updates
        self.sink = None  # what serving reports to: the recorder and the monitor
        self.api = None
        self.link = None
        self.updates = None
        self._stop_requested = self._reload_requested = None  # signal flags, set by catch_signals()
        self.update_store = None
        self.started = None
        self._stopped = threading.Event()
        self._swap_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Agent":
        from .telemetry.queue import TelemetryQueue
        from .updates import HealthMonitor, UpdateStore, serving_path

        c = self.config
        self.started = time.monotonic()
        c.data_dir.mkdir(parents=True, exist_ok=True)
        self.update_store = UpdateStore(c.data_dir)
        path = serving_path(self.update_store, c.artifact)
        self.service = self.load(path)
        if self.update_store.state["state"] in ("idle", "failed"):  # not in the middle of an update
            self.update_store.adopt(self.service.artifact, path)
        self.monitor = HealthMonitor()
        self.monitor.version = self.service.version
        self.queue = TelemetryQueue(c.data_dir / QUEUE_FILE, c.queue_max_bytes)
        self.recorder = self._recorder(c)
        self.drift = self._drift(c)
        self.feedback = self._feedback(c)
        self.sink = self._sink()
        self.api = self._api(c)
        self.link = self._link(c)
        self.updates = self._updates(c)
        if self.feedback is not None:
            self._chores = threading.Thread(target=self._feedback_chores, name="edgeml-feedback", daemon=True)
            self._chores.start()
        log.info("serving %s v%s (%s) as %s/%s; api %s; broker %s", self.service.name, self.service.version,
                 self.service.format, c.fleet, c.device_id, self.api_url or "off", c.broker or "none (offline)")
        return self

    def stop(self, flush_timeout: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.updates is not None:
            self.updates.stop()
        if self.api is not None:
            self.api.stop()
        if self.shadow is not None:
            self.shadow.close()  # its last window goes to the recorder before that closes
        if self.drift is not None:
            self.drift.close()  # its last window goes to the recorder before that closes
        if self._chores is not None:
            self._chores.join(5)
        if self.feedback is not None:
            self._feedback_window()
            self.feedback.save()
        if self.recorder is not None:
            self.recorder.close()
        if self.link is not None:
            self.link.stop(flush_timeout=flush_timeout)
        if self.queue is not None:
            self.queue.close()
        log.info("stopped")

    def reload(self) -> None:
        """Re-read the config file; keep running on the old settings if the new ones are bad."""
        try:
            new = load_config(self.config.source, self.flags)
        except Exception as exc:  # any bad config: say so, keep serving
            log.error("reload refused, still running on the previous config: %s", exc)
            return
        old, self.config = self.config, new
        logging.getLogger().setLevel(new.log_level.upper())
        if _changed(old, new, MODEL_KEYS):
            try:
                service = self.load(new.artifact)
            except Exception as exc:
                log.error("reload: the new artifact was refused (%s); still serving %s v%s",
                          exc, self.service.name, self.service.version)
                self.config = replace(new, **{k: getattr(old, k) for k in MODEL_KEYS})
            else:
                self.swap(service)
                self.update_store.adopt(service.artifact, new.artifact)  # installed by hand: the active model now
                log.info("reload: now serving %s v%s", service.name, service.version)
        if _changed(old, new, API_KEYS):
            if self.api is not None:
                self.api.stop()
            try:
                self.api = self._api(new)
            except Exception as exc:  # a bad certificate or token file: say so, serve as before
                log.error("reload: the API settings were refused (%s); the API runs on the previous ones", exc)
                self.config = replace(self.config, **{k: getattr(old, k) for k in API_KEYS})
                self.api = self._api(old)
        elif self.api is not None and self.api.tokens is not None:
            self.api.tokens.reload()  # rotated tokens take effect without a restart
        if _changed(old, new, LINK_KEYS):
            if self.updates is not None:
                self.updates.stop()
            if self.link is not None:
                self.link.stop(flush_timeout=2.0)
            self.link = self._link(new)
            self.updates = self._updates(new)
        log.info("reloaded %s", new.source)

    def catch_signals(self) -> "Agent":
        """SIGTERM/SIGINT stop, SIGHUP reloads. Call from the main thread before ``start()``: the
        API answers ready as soon as it listens, and a stop sent then must stop the agent
        cleanly (telemetry flushed, offline announced), not kill it."""
        self._reload_requested, self._stop_requested = threading.Event(), threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: self._stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.set())
        return self

    def run_forever(self) -> None:
        """Block until SIGTERM/SIGINT; SIGHUP reloads. Call from the main thread."""
        if self._stop_requested is None:
            self.catch_signals()
        reload_requested, stop_requested = self._reload_requested, self._stop_requested
        while not stop_requested.wait(0.2):
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
        self.stop()

    # -- the in-process API --------------------------------------------------------------------

    def infer(self, inputs: Dict[str, np.ndarray], outputs=None) -> Dict[str, np.ndarray]:
        """What the HTTP API does, without HTTP: validated, served, counted in telemetry."""
        from .serving import LocalClient

        return LocalClient(self.service, self.sink).infer(inputs, outputs)

    @property
    def api_url(self) -> Optional[str]:
        return None if self.api is None else f"{'https' if self.api.tls else 'http'}://{self.api.host}:{self.api.port}"

    def status(self) -> dict:
        return {
            "model": self.service.name if self.service else None,
            "version": self.service.version if self.service else None,
            "ready": bool(self.service and self.service.ready),
            "api": self.api_url,
            "queue": self.queue.stats() if self.queue else None,
            "mqtt": self.link.status() if self.link else None,
            "update": self.updates.status() if self.updates else None,
            "shadow": self.shadow.status() if self.shadow else None,
        }

    # -- what the update engine asks of the agent ---------------------------------------------------

    def load(self, path):
        """Verify (in a child), load, self-test and warm up an artifact; the service, or raise."""
        from .serving import ModelService

        c = self.config
        return ModelService.load(path, c.public_key, num_threads=c.threads, instances=c.instances,
                                 max_batch=c.max_batch, max_delay_ms=c.max_delay_ms, cache_bytes=c.cache_bytes)

    def swap(self, service) -> None:
        """Serve ``service`` from the next request on. The one in use finishes the requests it has;
        telemetry gets a recorder for the new model (the old one flushes its window)."""
        with self._swap_lock:
            old_recorder, old_drift = self.recorder, self.drift
            self.recorder = self._recorder(self.config, service)
            self.drift = self._drift(self.config, service)
            self.sink = self._sink()
            self.service = service
            if self.feedback is not None:  # labels for the old model's requests still count, as its version
                self._feedback_window()
                self.feedback.model, self.feedback.version = service.name, service.version
            if self.api is not None:
                self.api.service, self.api.sink = service, self.sink
        if old_drift is not None:
            old_drift.close()
        old_recorder.close()
        self.report()

    def start_shadow(self, service, sample: float, rollout: str) -> None:
        """Run ``service`` (loaded and self-tested) beside the serving model on ``sample`` of the
        requests, off the response path (``device_agent.shadow``)."""
        from .shadow import ShadowRunner

        runner = ShadowRunner(service, sample=sample, rollout=rollout, emit=self._shadow_record,
                              window_s=self.config.stats_window_s, active=self.service, threads=self.config.threads)
        self._set_shadow(runner)

    def stop_shadow(self):
        """Stop the shadow; the candidate it ran (None if none), still loaded, for a promotion."""
        runner = self._set_shadow(None)
        return runner.candidate if runner is not None else None

    def _set_shadow(self, runner):
        with self._swap_lock:
            old, self.shadow = self.shadow, runner
            self.sink = self._sink()
            if self.api is not None:
                self.api.sink = self.sink
        if old is not None:
            old.close()
        return old

    def _shadow_record(self, record: dict) -> None:
        self.recorder.record(record)

    def report(self) -> None:
        """Publish the retained state again (model, update progress)."""
        if self.link is not None:
            self.link.publish_state()

    # -- parts ---------------------------------------------------------------------------------

    def _recorder(self, c: AgentConfig, service=None):
        from .telemetry.recorder import Recorder

        service = service or self.service
        return Recorder(self.queue, service.name, service.version, stats_window_s=c.stats_window_s,
                        system_interval_s=c.system_interval_s, data_dir=c.data_dir, stats=service.telemetry_stats)

    def _sink(self):
        from .updates import Tee

        # the recorder's record is durable and goes before a response; the others keep memory only
        return Tee(self.recorder, later=(s for s in (self.monitor, self.drift, self.shadow) if s is not None))

    def _drift(self, c: AgentConfig, service=None):
        if not c.drift:
            return None
        from .monitoring.drift import DriftMonitor, DriftSettings

        service = service or self.service
        settings = DriftSettings(window_s=c.drift_window_s, windows=c.drift_windows, min_samples=c.drift_min_samples,
                                 js_threshold=c.js_threshold, psi_threshold=c.psi_threshold,
                                 confidence_drop=c.confidence_drop, clear_ratio=c.clear_ratio)
        return DriftMonitor(service.artifact.baseline, service.name, service.version, service.sha256, settings,
                            emit=self._drift_record)

    def _feedback(self, c: AgentConfig):
        if not c.feedback:
            return None
        from .monitoring.feedback import Feedback, FeedbackSettings

        settings = FeedbackSettings(enabled=True, sample=c.feedback_sample, pending=c.feedback_pending,
                                    max_bytes=c.feedback_max_bytes)
        return Feedback(c.data_dir / "feedback", self.service.name, self.service.version, settings)

    def _feedback_chores(self) -> None:
        """Every stats window: the labels' live accuracy into telemetry, the reservoir to disk."""
        while not self._stopped.wait(self.config.stats_window_s):
            self._feedback_window()
            self.feedback.save()

    def _feedback_window(self) -> None:
        record = self.feedback.take_window()
        if record is not None:
            self.recorder.record(record)

    def _send_reservoir(self, payload: bytes, properties) -> None:
        """The host asked for the feedback reservoir (``fleet feedback pull``): send it, zstd-compressed."""
        from edgeml.core import transfer

        try:
            request = str(json.loads(payload).get("request", ""))[:64]
        except (ValueError, AttributeError):
            log.warning("feedback: a request for the reservoir that is not JSON was ignored")
            return
        data = transfer.compress(self.feedback.npz_bytes(), level=3) if self.feedback is not None else b""
        sent = self.link.publish("feedback", data, UserProperty=[("request", request),
                                                                  ("samples", str(len(self.feedback.samples) if self.feedback else 0))])
        log.info("feedback: reservoir %s for request %s (%d bytes)", "sent" if sent else "NOT sent", request, len(data))

    def _drift_record(self, record: dict) -> None:
        """A drift window or an alert: into the durable telemetry queue (the host's record of it),
        and an alert also on the events topic at once when the broker is reachable."""
        self.recorder.record(record)
        if record["kind"] == "alert" and self.link is not None:
            from edgeml.core.update_contract import encode_event

            self.link.publish("events", encode_event(ts=record["ts"], device=self.config.device_id, event="alert",
                                                     alert={k: v for k, v in record.items() if k not in ("kind", "ts")}))

    def _api(self, c: AgentConfig):
        address = c.api_address
        if address is None:
            return None
        from .api.server import ApiServer

        from .api.security import Tokens, server_context

        tokens = Tokens(c.token_file) if c.token_file is not None else None
        tls = server_context(c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file) if c.tls_cert_file else None
        api = ApiServer(self.service, self.sink, host=address[0], port=address[1], max_body_bytes=c.max_body_bytes,
                        tokens=tokens, open_health=c.open_health, tls=tls, backlog=c.backlog,
                        max_connections=c.max_connections, workers=c.workers, request_timeout=c.request_timeout_s)
        api.feedback = self.feedback
        # read at scrape time, so /metrics is never staler than the queue
        api.metrics.gauge_function("edgeml_telemetry_queue_records", "Telemetry records waiting for the broker",
                                   lambda: [({}, self.queue.stats()["records"])])
        api.metrics.gauge_function("edgeml_telemetry_dropped_total", "Telemetry records dropped (queue full)",
                                   lambda: [({}, self.queue.stats()["dropped_total"])])
        from .api.serving_metrics import register_serving_metrics

        register_serving_metrics(api.metrics, lambda: self.service)  # instances, batching, cache
        api.start()
        return api

    def _link(self, c: AgentConfig):
        if c.broker is None:
            return None
        from .mqtt_link import MqttLink

        link = MqttLink(c.broker, c.fleet, c.device_id, self.queue, username=c.username, password=c.password(),
                        ca_file=c.ca_file, cert_file=c.cert_file, key_file=c.key_file, state=self._state,
                        ack_timeout=c.ack_timeout_s)
        # answered with an empty reservoir when feedback is off, so the host hears from every device
        link.subscribe("feedback/req", lambda payload, props: threading.Thread(
            target=self._send_reservoir, args=(payload, props), daemon=True).start())
        link.start()
        return link

    def _updates(self, c: AgentConfig):
        if self.link is None:
            return None
        from .updates import UpdateEngine
        from .verifier import verify_in_child, verify_order_in_child

        return UpdateEngine(self.update_store, self.link, self, self.monitor, fleet=c.fleet, device=c.device_id,
                            verify_file=lambda path: verify_in_child(path, c.public_key),
                            verify_order=lambda order: verify_order_in_child(order, c.public_key),
                            ca_file=c.ca_file, fetch_timeout=c.fetch_timeout_s,
                            fetch_attempts=c.fetch_attempts).start()

    def _state(self) -> dict:
        stats = self.queue.stats()
        state = {"model": self.service.name, "version": self.service.version, "sha256": self.service.sha256,
                 "content_sha256": self.service.artifact.content_sha256, "ready": self.service.ready,
                 "ts": time.time(), "dropped_total": stats["dropped_total"], "queue_records": stats["records"]}
        if self.updates is not None:
            state["update"] = self.updates.status()
        elif self.update_store is not None:  # the link is up before the engine (start, SIGHUP)
            from .updates import update_status

            state["update"] = update_status(self.update_store.state)
        return state


def _changed(old: AgentConfig, new: AgentConfig, keys) -> bool:
    return any(getattr(old, k) != getattr(new, k) for k in keys)
