"""``edgeml-agent run``: serve a verified artifact offline, keep telemetry until a broker takes it.

Start order: verify and warm up the model (refuse to start otherwise) → open the durable
telemetry queue → local API → MQTT link (optional: without a broker the agent serves and
queues). SIGTERM or SIGINT stop it cleanly: the API stops taking requests, telemetry is flushed
to disk and, if a broker is reachable, published; presence goes offline. SIGHUP re-reads the
config file (flags given at start still win) and applies what changed: a new artifact is
verified and warmed up before it replaces the old one, which serves until then.

``Agent`` is also the in-process API for apps that embed the agent: ``Agent(config).start()``,
then ``agent.infer({...})``.
"""
from __future__ import annotations

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
MODEL_KEYS = ("artifact", "public_key", "threads")
LINK_KEYS = ("broker", "username", "password_file", "ca_file", "cert_file", "key_file", "fleet", "device_id")
API_KEYS = ("api", "max_body_bytes")


class Agent:
    def __init__(self, config: AgentConfig, flags: Optional[dict] = None):
        self.config = config
        self.flags = dict(flags or {})  # what the command line set, re-applied on reload
        self.service = None
        self.queue = None
        self.recorder = None
        self.api = None
        self.link = None
        self.started = None
        self._stopped = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Agent":
        from .telemetry.queue import TelemetryQueue

        c = self.config
        self.started = time.monotonic()
        c.data_dir.mkdir(parents=True, exist_ok=True)
        self.service = self._load_service(c)
        self.queue = TelemetryQueue(c.data_dir / QUEUE_FILE, c.queue_max_bytes)
        self.recorder = self._recorder(c)
        self.api = self._api(c)
        self.link = self._link(c)
        log.info("serving %s v%s (%s) as %s/%s; api %s; broker %s", self.service.name, self.service.version,
                 self.service.format, c.fleet, c.device_id, self.api_url or "off", c.broker or "none (offline)")
        return self

    def stop(self, flush_timeout: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.api is not None:
            self.api.stop()
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
                service = self._load_service(new)
            except Exception as exc:
                log.error("reload: the new artifact was refused (%s); still serving %s v%s",
                          exc, self.service.name, self.service.version)
                self.config = replace(new, **{k: getattr(old, k) for k in MODEL_KEYS})
            else:
                self.service = service
                self.recorder.close()
                self.recorder = self._recorder(new)
                if self.api is not None:
                    self.api.service, self.api.sink = service, self.recorder
                log.info("reload: now serving %s v%s", service.name, service.version)
        if _changed(old, new, API_KEYS):
            if self.api is not None:
                self.api.stop()
            self.api = self._api(new)
        if _changed(old, new, LINK_KEYS):
            if self.link is not None:
                self.link.stop(flush_timeout=2.0)
            self.link = self._link(new)
        log.info("reloaded %s", new.source)

    def run_forever(self) -> None:
        """Block until SIGTERM/SIGINT; SIGHUP reloads. Call from the main thread."""
        reload_requested = threading.Event()
        stop_requested = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        while not stop_requested.wait(0.2):
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
        self.stop()

    # -- the in-process API --------------------------------------------------------------------

    def infer(self, inputs: Dict[str, np.ndarray], outputs=None) -> Dict[str, np.ndarray]:
        """What the HTTP API does, without HTTP: validated, served, counted in telemetry."""
        from .serving import LocalClient

        return LocalClient(self.service, self.recorder).infer(inputs, outputs)

    @property
    def api_url(self) -> Optional[str]:
        return None if self.api is None else f"http://{self.api.host}:{self.api.port}"

    def status(self) -> dict:
        return {
            "model": self.service.name if self.service else None,
            "version": self.service.version if self.service else None,
            "ready": bool(self.service and self.service.ready),
            "api": self.api_url,
            "queue": self.queue.stats() if self.queue else None,
            "mqtt": self.link.status() if self.link else None,
        }

    # -- parts ---------------------------------------------------------------------------------

    def _load_service(self, c: AgentConfig):
        from .serving import ModelService

        return ModelService.load(c.artifact, c.public_key, num_threads=c.threads)

    def _recorder(self, c: AgentConfig):
        from .telemetry.recorder import Recorder

        return Recorder(self.queue, self.service.name, self.service.version, stats_window_s=c.stats_window_s,
                        system_interval_s=c.system_interval_s, data_dir=c.data_dir)

    def _api(self, c: AgentConfig):
        address = c.api_address
        if address is None:
            return None
        from .api.server import ApiServer

        api = ApiServer(self.service, self.recorder, host=address[0], port=address[1], max_body_bytes=c.max_body_bytes)
        # read at scrape time, so /metrics is never staler than the queue
        api.metrics.gauge_function("edgeml_telemetry_queue_records", "Telemetry records waiting for the broker",
                                   lambda: [({}, self.queue.stats()["records"])])
        api.metrics.gauge_function("edgeml_telemetry_dropped_total", "Telemetry records dropped (queue full)",
                                   lambda: [({}, self.queue.stats()["dropped_total"])])
        api.start()
        return api

    def _link(self, c: AgentConfig):
        if c.broker is None:
            return None
        from .mqtt_link import MqttLink

        link = MqttLink(c.broker, c.fleet, c.device_id, self.queue, username=c.username, password=c.password(),
                        ca_file=c.ca_file, cert_file=c.cert_file, key_file=c.key_file, state=self._state)
        link.start()
        return link

    def _state(self) -> dict:
        stats = self.queue.stats()
        return {"model": self.service.name, "version": self.service.version, "sha256": self.service.sha256,
                "ready": self.service.ready, "ts": time.time(), "dropped_total": stats["dropped_total"],
                "queue_records": stats["records"]}


def _changed(old: AgentConfig, new: AgentConfig, keys) -> bool:
    return any(getattr(old, k) != getattr(new, k) for k in keys)
