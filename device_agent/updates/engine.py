"""The device's update state machine (DESIGN.md): a model is good only once it has served live
traffic well.

    idle -> downloading -> verifying -> staged -> self_testing -> activating -> observing
         -> committed | rolling_back -> idle                    (any step may end in failed -> idle)

Every state is persisted (``UpdateStore.enter``: fsync + rename) before its step runs, and each
has a resume rule, so SIGKILL or a power cut anywhere resumes or cleans up:

    downloading   resume from the blocks on disk            verifying     verify again
    staged        self-test it                              self_testing  self-test again
    activating    the old model serves; activate again      observing     the new model serves; the window restarts
    rolling_back  the previous model serves; finish         committed     finish (report, clean up)

A shadow update (the desired message carries ``shadow``) stops after its self-test, in a steady
state: ``self_testing -> shadowing``. The candidate runs beside the active model on sampled
requests (``device_agent.shadow``) and never serves. It ends when the host wants
something else (``ended``; the candidate's file goes) or becomes a normal update when the host
promotes it: a desired message for the same model without ``shadow``, which goes on from
``staged`` with the file already here and the candidate already loaded.

    shadowing     the active model serves; load the candidate again and go on shadowing

A step entered ``MAX_ATTEMPTS`` times for one update (a crash loop) fails the update; a crash loop
while observing rolls back. The old model serves until the new one is loaded, self-tested and
warmed up beside it; the swap is one assignment, so no request sees a gap.

What a device accepts (``judge``): a version above the highest it ever committed (kept outside
the slots, never lowered); the committed model itself; or a lower version that a signed rollback
order allows. A model that failed here (self-test, health window, verification) is never
installed again, so a replayed desired message cannot start a loop.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from edgeml.core import update_contract as uc
from edgeml.core.artifact import read_artifact
from edgeml.core.artifact.reader import unpacked
from edgeml.core.atomic import write_atomic
from edgeml.core.delta import apply_patch
from edgeml.core.errors import EdgemlError, first_line
from edgeml.core.orders import refusal

from .fetch import Cancelled, Download, DownloadFailed, HttpFetch, MqttFetch
from .health import HealthMonitor, evidence, reference_figures
from .store import MAX_ATTEMPTS, UpdateStore

log = logging.getLogger("edgeml-agent.updates")

# Tests set this to widen the moments between steps, so that a real SIGKILL can land in each state.
STEP_DELAY_S = float(os.environ.get("EDGEML_UPDATE_STEP_DELAY", "0") or 0)
EARLY_VERDICT = 20  # requests after which a broken rule rolls back before the window closes
LATENCY_RUNS = 30  # self-test inputs timed on the old and the new model
IN_PROGRESS = (uc.DOWNLOADING, uc.VERIFYING, uc.STAGED, uc.SELF_TESTING, uc.ACTIVATING)


class UpdateFailed(Exception):
    """The update cannot go on; ``mark`` says the model itself is bad (never try it again here)."""

    def __init__(self, message: str, mark: bool = False, result: str = "failed"):
        super().__init__(message)
        self.mark, self.result = mark, result


def update_status(s: dict, progress: Optional[dict] = None) -> dict:
    """What the host sees of the update state ``s`` (also before the engine runs: an agent that
    restarts mid-update must never look, even for one message, like a device with no update)."""
    target = s.get("target") or {}
    return {k: v for k, v in {
        "rollout": s.get("rollout"), "state": s["state"], "result": s.get("result"),
        "target_version": target.get("version"), "content_sha256": target.get("content_sha256"),
        "progress": progress if s["state"] == uc.DOWNLOADING else None,
        "error": s.get("error"), "evidence": s.get("evidence"), "updated": s.get("updated"),
    }.items() if v is not None}


class UpdateEngine:
    """Runs on its own thread. ``host`` is the agent: ``service`` (the model serving now),
    ``load(path)`` (verify in a child, load, self-test, warm up), ``swap(service)`` and
    ``report()`` (republish the retained state). ``link`` is the device's MQTT link."""

    def __init__(self, store: UpdateStore, link, host, monitor: HealthMonitor, *, fleet: str, device: str,
                 verify_file: Callable, verify_order: Callable, ca_file=None, fetch_timeout: float = 5.0,
                 fetch_attempts: int = 6, tick_s: float = 0.2):
        self.store, self.link, self.host, self.monitor = store, link, host, monitor
        self.fleet, self.device = fleet, device
        self.verify_file, self.verify_order = verify_file, verify_order
        self.ca_file, self.fetch_timeout, self.fetch_attempts, self.tick_s = ca_file, fetch_timeout, fetch_attempts, tick_s
        self._desired: Optional[uc.Desired] = None
        self._desired_heard = False  # a desired message (or its clearing) arrived since the start
        self._desired_seen = threading.Event()
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._fetch: Optional[MqttFetch] = None
        self._loaded = None  # the staged model, loaded and warmed by the self-test
        self._shadowing: Optional[str] = None  # content_sha256 of the candidate this process runs as a shadow
        self._window_start = 0.0  # monotonic start of the health window
        self._progress = None
        self._progress_sent = 0.0
        self.stats = {"desired_bytes": 0, "request_bytes": 0, "blocks": 0, "block_bytes": 0, "requests": 0}
        self._thread: Optional[threading.Thread] = None

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> "UpdateEngine":
        self.link.subscribe("desired", self._on_desired)
        self.link.subscribe("chunks", self._on_chunk)
        self._thread = threading.Thread(target=self._run, name="edgeml-updates", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_desired(self, payload: bytes, properties) -> None:
        self.stats["desired_bytes"] += len(payload)
        try:
            desired = uc.decode_desired(payload)
        except ValueError as exc:
            log.warning("updates: ignoring a desired message: %s", exc)
            return
        if desired is not None and (desired.fleet, desired.device) != (self.fleet, self.device):
            log.warning("updates: ignoring a desired message for %s/%s", desired.fleet, desired.device)
            return
        self._desired = desired
        self._desired_heard = True
        busy = self.store.state.get("target") if self.store.state["state"] in IN_PROGRESS else None
        if busy and (desired is None or desired.content_sha256 != busy["content_sha256"]):
            self._cancel.set()  # the host wants something else now: stop the download or step
        self._desired_seen.set()

    def _on_chunk(self, payload: bytes, properties) -> None:
        fetch = self._fetch
        if fetch is not None:
            fetch.receive(payload, properties)

    # -- what the host sees -------------------------------------------------------------------

    def status(self) -> dict:
        return update_status(self.store.state, self._progress)

    def _event(self, **extra) -> None:
        status = self.status()
        status.update(extra)
        self.link.publish("events", uc.encode_event(ts=time.time(), device=self.device, **status))
        self.host.report()

    def _enter(self, state: str, **changes) -> None:
        if self.store.attempts(state) >= MAX_ATTEMPTS:
            raise UpdateFailed(f"the {state} step was started {MAX_ATTEMPTS} times without finishing "
                               "(the agent keeps crashing there)", mark=state in (uc.SELF_TESTING, uc.ACTIVATING))
        self.store.enter(state, **changes)
        log.info("updates: %s %s v%s", state, (self.store.state.get("target") or {}).get("name"),
                 (self.store.state.get("target") or {}).get("version"))
        self._event()
        _pause()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug must not end updates for good; the state on disk says where to resume
                log.exception("updates: unexpected error")
                self._stop.wait(5.0)
            self._desired_seen.wait(self.tick_s)
            self._desired_seen.clear()

    def tick(self) -> None:
        state = self.store.state["state"]
        if state == uc.OBSERVING:
            self._observe()
        elif state == uc.SHADOWING:
            self._shadow()
        elif state == uc.ROLLING_BACK:
            self._roll_back(self.store.state.get("error") or "resumed after a restart",
                            mark=self.store.state.get("mark_failed", True))
        elif state == uc.COMMITTED:
            self._finish(self.store.state.get("result") or "committed")
        elif state in IN_PROGRESS:
            self._advance()
        else:
            desired = self._desired
            if desired is not None and self._is_new(desired):
                self._begin(desired)

    def _is_new(self, desired: uc.Desired) -> bool:
        s = self.store.state
        last = s.get("last") or {}
        if (last.get("rollout"), last.get("content_sha256")) == (desired.rollout, desired.content_sha256):
            return False  # this very request was handled already (a retained message seen again)
        active = s.get("active") or {}
        if active.get("content_sha256") == desired.content_sha256:
            self.store.save(last={"rollout": desired.rollout, "content_sha256": desired.content_sha256})
            if s.get("rollout") != desired.rollout:
                self.store.save(rollout=desired.rollout, result="committed" if s.get("result") is None
                                else s.get("result"), target=active)
                self.host.report()
            return False
        return True

    # -- starting ------------------------------------------------------------------------------

    def _begin(self, desired: uc.Desired) -> None:
        self._cancel.clear()
        target = dict(desired.target)
        self.store.save(rollout=desired.rollout, desired=_plain(desired), target=target, result=None,
                        error=None, evidence=None, attempts={}, transfer=None, order_issued=None,
                        last={"rollout": desired.rollout, "content_sha256": desired.content_sha256})
        reason = self.judge(desired)
        if reason:
            log.warning("updates: refused %s v%s: %s", target["name"], target["version"], reason)
            self.store.save(state=uc.IDLE, result="refused", error=reason)
            self._event()
            return
        self._advance()

    def judge(self, desired: uc.Desired) -> Optional[str]:
        """Why this device must not install the desired model, or None."""
        t = desired.target
        if self.store.failed(t["content_sha256"]):
            return f"{t['name']} v{t['version']} failed on this device before; build a new version"
        highest = self.store.highest(t["name"])
        if highest is None or t["version"] > highest["version"]:
            return None
        if t["version"] == highest["version"] and t["content_sha256"] == highest["content_sha256"]:
            return None  # the committed model itself (e.g. back to it from an uncommitted update)
        if desired.order is None:
            return (f"v{t['version']} is not above v{highest['version']}, the highest this device committed; "
                    "a lower version needs a signed rollback order (edgeml fleet rollback)")
        try:
            order = self.verify_order(desired.order)
        except EdgemlError as exc:
            return f"the rollback order does not verify: {first_line(exc)}"
        why = refusal(order, fleet=self.fleet, device=self.device, name=t["name"], version=t["version"],
                      content_sha256=t["content_sha256"], last_issued=self.store.trust["last_order_issued"])
        if why:
            return why
        self.store.save(order_issued=order["issued"])
        return None

    # -- the steps -------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Run the steps from the persisted state to activation (or failure)."""
        desired = _desired_of(self.store.state)
        try:
            state = self.store.state["state"]
            if state in (uc.IDLE, uc.FAILED, uc.DOWNLOADING) or state not in IN_PROGRESS:
                self._obtain(desired)
                state = uc.VERIFYING
            if state == uc.VERIFYING:
                self._verify(desired)
                state = uc.STAGED
            if state in (uc.STAGED, uc.SELF_TESTING):
                self._self_test(desired)
                if desired.shadow is not None:
                    self._start_shadow(desired)
                    return
                state = uc.ACTIVATING
            if state == uc.ACTIVATING:
                self._activate(desired)
        except Cancelled:
            self._finish_early("cancelled", "the host asked for another model before this one was ready")
        except UpdateFailed as exc:
            self._finish_early(exc.result, str(exc), mark=exc.mark)
        except DownloadFailed as exc:
            self._finish_early("failed", f"download failed: {exc}")

    def _obtain(self, desired: uc.Desired) -> None:
        target = desired.target
        slot = self.store.slot(target["content_sha256"])
        if slot.exists():  # the previous model, or one staged before a restart
            self.store.save(target={**target, "path": str(slot)})
            return
        delta = desired.delta
        if delta is not None and self.store.slot(delta.base).exists():
            try:
                self._download(delta)
                return
            except DownloadFailed as exc:
                log.warning("updates: the delta did not work out (%s); fetching the whole artifact", exc)
        if desired.full is None:
            raise UpdateFailed("the host offers no way to fetch this model (no full transfer)")
        self._download(desired.full)

    def _download(self, transfer: uc.Transfer) -> None:
        self._enter(uc.DOWNLOADING, transfer={"id": transfer.id, "kind": transfer.kind})
        download = Download(self.store.downloads, transfer)
        self._progress = download.progress()

        def progress(p):
            self._progress = p
            if time.monotonic() - self._progress_sent >= 1.0 or p["blocks_done"] == p["blocks"]:
                self._progress_sent = time.monotonic()
                self._event()

        if not download.complete:
            if transfer.url:
                try:
                    HttpFetch(transfer.url, download, ca_file=self.ca_file, on_progress=progress).run(self._cancel)
                except DownloadFailed as exc:
                    log.warning("updates: %s; asking the host over the broker instead", exc)
            if not download.complete:
                fetch = MqttFetch(self.link, download, timeout=self.fetch_timeout, max_attempts=self.fetch_attempts,
                                  on_progress=progress)
                self._fetch = fetch
                try:
                    fetch.run(self._cancel)
                finally:
                    self._fetch = None
                    for key in ("request_bytes", "blocks", "block_bytes", "requests"):
                        self.stats[key] += fetch.stats[key]
        data = download.read()
        if uc.sha256(data) != transfer.id:
            download.remove()
            raise DownloadFailed(f"the downloaded {transfer.kind} does not match its sha256; fetching it again")
        content = data
        if transfer.kind == "delta":
            base = read_artifact(self.store.slot(transfer.base))
            try:
                content = apply_patch(unpacked(base.path.read_bytes()), data, max_size=2 << 30)
            except ValueError as exc:
                download.remove()
                raise DownloadFailed(str(exc)) from exc
            if uc.sha256(content) != _desired_of(self.store.state).content_sha256:
                download.remove()
                raise DownloadFailed("the rebuilt artifact does not match the announced content")
        slot = self.store.slot(_desired_of(self.store.state).content_sha256)
        try:
            write_atomic(slot, content, 0o644)
        except OSError as exc:
            raise DownloadFailed(f"cannot store the model ({exc.strerror or exc}); free space in the data_dir") from exc
        download.remove()
        self.store.save(target={**self.store.state["target"], "path": str(slot)})

    def _verify(self, desired: uc.Desired) -> None:
        self._enter(uc.VERIFYING)
        path = Path(self.store.state["target"]["path"])
        try:
            self.verify_file(path)  # the signature, in a child process
            art = read_artifact(path)
        except EdgemlError as exc:
            path.unlink(missing_ok=True)
            raise UpdateFailed(f"verification failed: {first_line(exc)}", mark=True) from exc
        t, m = desired.target, art.manifest
        if (m["name"], m["version"], art.content_sha256) != (t["name"], t["version"], t["content_sha256"]):
            path.unlink(missing_ok=True)
            raise UpdateFailed(f"the artifact is {m['name']} v{m['version']} ({art.content_sha256[:12]}), not the "
                               f"announced {t['name']} v{t['version']}", mark=True)
        if self.store.state.get("order_issued"):
            self.store.accept_order(self.store.state["order_issued"])  # the ratchet moves once it is used
        self._enter(uc.STAGED, target=self.store.model(art, path))

    def _self_test(self, desired: uc.Desired) -> None:
        self._enter(uc.SELF_TESTING)
        path = self.store.state["target"]["path"]
        new = self._loaded  # a promoted shadow: loaded, self-tested and run beside the active model already
        self._loaded = None
        if new is None or new.artifact.content_sha256 != desired.content_sha256:
            try:
                new = self.host.load(path)  # verify, load, reference outputs, warm up
            except EdgemlError as exc:
                raise UpdateFailed(f"self-test failed: {first_line(exc)}", mark=True) from exc
        old = self.host.service
        new_ms, old_ms = _selftest_latencies(new, old)
        budget = desired.health.latency_budget
        if old_ms and new_ms > budget * old_ms:
            raise UpdateFailed(f"self-test: {new_ms:.3f} ms per reference input, {new_ms / old_ms:.1f}x the "
                               f"{old_ms:.3f} ms of the model it would replace (budget {budget:g}x)", mark=True)
        self._loaded = new
        self.store.save(selftest_ms={"new": new_ms, "old": old_ms})

    def _activate(self, desired: uc.Desired) -> None:
        old = self.host.service
        old_model = self.store.state.get("active")
        reference = self.store.state.get("reference") if self.store.state["state"] == uc.ACTIVATING else None
        if reference is None:  # resumed: keep the figures measured before the restart, this process has none
            reference = reference_figures(self.monitor, old.version,
                                          (self.store.state.get("selftest_ms") or {}).get("old"))
        self._enter(uc.ACTIVATING, previous=old_model, reference=reference)
        new = self._loaded if self._loaded is not None else self._reload_target()
        self._loaded = None
        self.monitor.version = new.version
        self.host.swap(new)  # from here on requests go to the new model
        self._window_start = time.monotonic()
        self._enter(uc.OBSERVING, window_started=time.time())

    def _reload_target(self):
        try:
            return self.host.load(self.store.state["target"]["path"])
        except EdgemlError as exc:
            raise UpdateFailed(f"self-test failed: {first_line(exc)}", mark=True) from exc

    # -- shadowing -------------------------------------------------------------------------------

    def _start_shadow(self, desired: uc.Desired) -> None:
        self._enter(uc.SHADOWING)
        new, self._loaded = self._loaded, None
        self.host.start_shadow(new, desired.shadow["sample"], desired.rollout)
        self._shadowing = desired.content_sha256

    def _shadow(self) -> None:
        s = self.store.state
        desired, target = self._desired, s["target"]
        if self._desired_heard and (desired is None or desired.content_sha256 != target["content_sha256"]):
            self._end_shadow("the host asked for another model")
            return
        if desired is not None and desired.content_sha256 == target["content_sha256"] and desired.shadow is None:
            self._promote(desired)
            return
        if self._shadowing != target["content_sha256"]:  # resumed after a restart: load it again
            if self.store.attempts(uc.SHADOWING) >= MAX_ATTEMPTS:
                self._end_shadow(f"the agent restarted {MAX_ATTEMPTS} times while shadowing the candidate",
                                 result="failed", mark=True)
                return
            self.store.enter(uc.SHADOWING)
            try:
                candidate = self.host.load(target["path"])
            except EdgemlError as exc:
                self._end_shadow(f"self-test failed: {first_line(exc)}", result="failed", mark=True)
                return
            plan = _desired_of(s)
            self.host.start_shadow(candidate, plan.shadow["sample"] if plan.shadow else 1.0, s.get("rollout"))
            self._shadowing = target["content_sha256"]
            self._event()
        elif desired is not None and desired.shadow is not None and (
                desired.rollout != s.get("rollout") or desired.shadow != _desired_of(s).shadow):
            # the same candidate, pushed again (another sample): go on with the new settings
            self.store.save(rollout=desired.rollout, desired=_plain(desired),
                            last={"rollout": desired.rollout, "content_sha256": desired.content_sha256})
            self.host.start_shadow(self.host.stop_shadow(), desired.shadow["sample"], desired.rollout)
            self._event()

    def _end_shadow(self, reason: str, result: str = "ended", mark: bool = False) -> None:
        self.host.stop_shadow()
        self._shadowing = None
        self._finish_early(result, reason, mark=mark)

    def _promote(self, desired: uc.Desired) -> None:
        """The host promoted the shadow: the same file, a normal update from ``staged`` on."""
        candidate = self.host.stop_shadow()
        self._shadowing = None
        self.store.save(rollout=desired.rollout, desired=_plain(desired), result=None, error=None, evidence=None,
                        attempts={}, order_issued=None,
                        last={"rollout": desired.rollout, "content_sha256": desired.content_sha256})
        reason = self.judge(desired)
        if reason:
            self._finish_early("refused", reason)
            return
        self._loaded = candidate
        log.info("updates: promoting the shadow %s v%s", desired.target["name"], desired.version)
        self._enter(uc.STAGED)
        self._advance()

    # -- observing -------------------------------------------------------------------------------

    def _observe(self) -> None:
        s = self.store.state
        desired, target = self._desired, s["target"]
        if desired is not None and desired.content_sha256 != target["content_sha256"]:
            self._roll_back("the host asked to roll back (the rollout was aborted or replaced)", mark=False)
            return
        if not self._window_start:  # resumed after a restart: this process serves the target; start over
            if self.store.attempts(uc.OBSERVING) >= MAX_ATTEMPTS:
                self._roll_back(f"the agent restarted {MAX_ATTEMPTS} times while observing the new model")
                return
            self.store.enter(uc.OBSERVING)
            self.monitor.version = target["version"]
            self._window_start = time.monotonic()
        health = _desired_of(s).health
        elapsed = time.monotonic() - self._window_start
        ev = evidence(self.monitor, target["version"], self._window_start, s.get("reference") or {},
                      self.host.service.artifact.baseline, elapsed)
        ev["selftest_ms"] = (s.get("selftest_ms") or {}).get("new")
        closed = elapsed >= health.window_s
        broken = uc.violations(health.device_rules(), ev, early=not closed) if ev["requests"] else []
        if broken and (ev["requests"] >= max(health.min_requests, EARLY_VERDICT) or closed):
            self.store.save(evidence=ev)
            self._roll_back("on live traffic: " + "; ".join(broken))
            return
        if elapsed < health.window_s:
            return
        result = "committed" if ev["requests"] >= health.min_requests else "committed_unobserved"
        self._commit(result, ev)

    def _commit(self, result: str, ev: dict) -> None:
        s = self.store.state
        self.store.commit_version(s["target"])  # the anti-rollback counter first: it must never lag
        self.store.enter(uc.COMMITTED, result=result, evidence=ev)
        _pause()
        self._finish(result)

    def _finish(self, result: str) -> None:
        s = self.store.state
        active = s.get("active")
        new_active = s["target"] if result.startswith("committed") else active
        moved = (active or {}).get("content_sha256") != (new_active or {}).get("content_sha256")
        previous = active if moved else s.get("previous")
        self.store.save(state=uc.IDLE, result=result, active=new_active, previous=previous, reference=None,
                        window_started=None, transfer=None)
        self._window_start = 0.0
        self.store.collect_garbage()
        log.info("updates: %s %s v%s", result, s["target"]["name"], s["target"]["version"])
        self._event()

    def _roll_back(self, reason: str, mark: bool = True) -> None:
        """Serve the previous model again; ``mark``: the new one failed here and is never tried again."""
        s = self.store.state
        if s["state"] != uc.ROLLING_BACK:
            self.store.enter(uc.ROLLING_BACK, error=reason, mark_failed=mark)
            self._event()
            _pause()
        previous = s.get("previous") or s.get("active")
        if previous and self.host.service.artifact.content_sha256 != previous["content_sha256"]:
            try:
                service = self.host.load(previous["path"])
            except EdgemlError as exc:  # nothing better to serve: keep the new model, say so
                log.error("updates: cannot roll back to %s: %s", previous["path"], exc)
                self.store.save(state=uc.IDLE, result="failed", error=f"{reason}; and the rollback failed: "
                                f"{first_line(exc)}", active=s["target"])
                self._event()
                return
            self.monitor.version = service.version
            self.host.swap(service)
        if mark:
            self.store.mark_failed(s["target"]["content_sha256"])
        self.store.save(state=uc.IDLE, result="rolled_back", error=reason, active=previous, previous=None,
                        window_started=None)
        self._window_start = 0.0
        self.store.collect_garbage()
        log.warning("updates: rolled back from %s v%s: %s", s["target"]["name"], s["target"]["version"], reason)
        self._event()

    def _finish_early(self, result: str, reason: str, mark: bool = False) -> None:
        s = self.store.state
        target = s.get("target") or {}
        if mark and target.get("content_sha256"):
            self.store.mark_failed(target["content_sha256"])
        if self._loaded is not None:
            self._loaded = None
        self.store.save(state=uc.IDLE, result=result, error=reason, transfer=None)
        if target.get("path") and Path(target["path"]).name not in {
                Path((s.get("active") or {}).get("path", "")).name, Path((s.get("previous") or {}).get("path", "")).name}:
            Path(target["path"]).unlink(missing_ok=True)
        self.store.collect_garbage()
        (log.info if result in ("cancelled", "ended") else log.warning)("updates: %s %s v%s: %s", result, target.get("name"),
                                                              target.get("version"), reason)
        self._event()


def _pause() -> None:
    if STEP_DELAY_S:
        time.sleep(STEP_DELAY_S)


def _plain(desired: uc.Desired) -> dict:
    import json

    return json.loads(desired.encode())


def _desired_of(state: dict) -> uc.Desired:
    import json

    return uc.decode_desired(json.dumps(state["desired"]).encode())


def _selftest_latencies(new, old) -> tuple:
    """Milliseconds per reference input of the new and the old model on this device: each the
    fastest of ``LATENCY_RUNS`` runs, the two interleaved, so that a busy moment (another thread,
    another process) slows both alike and cannot make one look several times slower."""
    from edgeml.core.data import Dataset

    def feeds(service):
        art = service.artifact
        ds = Dataset(art.selftest_inputs, whole=bool(art.manifest.get("selftest", {}).get("whole_samples", False)))
        return [ds.feed(i) for i in range(len(ds))]

    runs = {"new": (new, feeds(new), []), "old": (old, feeds(old), [])}
    if not runs["new"][1] or not runs["old"][1]:
        return None, None
    for i in range(LATENCY_RUNS):
        for service, inputs, times in runs.values():
            t0 = time.perf_counter()
            service.run_alone(inputs[i % len(inputs)])  # the model itself: no response cache, no batching delay
            times.append((time.perf_counter() - t0) * 1000.0)
    return min(runs["new"][2]), min(runs["old"][2])


def serving_path(store: UpdateStore, configured: Path) -> Path:
    """The artifact to serve at start: the target while it was being observed (its window starts
    again) or once committed, the previous model while rolling back, else the active model,
    unless the operator has configured a newer version by hand since."""
    s = store.state
    target, active, previous = s.get("target"), s.get("active"), s.get("previous")
    if s["state"] in (uc.OBSERVING, uc.COMMITTED) and target and Path(target["path"]).exists():
        return Path(target["path"])
    if s["state"] == uc.ROLLING_BACK and previous and Path(previous["path"]).exists():
        return Path(previous["path"])
    if active and Path(active["path"]).exists():
        try:
            hand = read_artifact(configured).manifest
        except EdgemlError:
            return Path(active["path"])
        if hand["name"] != active["name"] or hand["version"] > active["version"]:
            return Path(configured)  # installed by hand since: the operator wins
        return Path(active["path"])
    return Path(configured)
