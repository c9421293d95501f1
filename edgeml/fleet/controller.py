"""The rollout controller: level-triggered reconciliation, one pass per active rollout.

Each pass reads what is wanted (the rollout and its plan in the store) and what is observed (each
device's retained state, stored by the collector), moves the assignments and waves toward it and
says which desired messages to publish. It holds the rollout's row for the pass (``FOR UPDATE
SKIP LOCKED`` on PostgreSQL; SQLite has one writer at a time), so with several controllers each
rollout is advanced by one of them at a time; a pass that dies changes nothing, the next one
(here or in another controller) repeats it. Publishing happens after the pass commits; a desired
message whose publish is not confirmed is published again.

A device counts as updated only on live evidence: its health window closed with the requests
the rollout asked for (``committed``). ``committed_unobserved`` is not evidence: its wave waits
for it until the wave timeout. A wave starts when the previous one is done and the fleet rules
hold (``failed>10%``: failed, rolled back or refused among the devices started); a broken rule
aborts the rollout, which sends the devices already updated back to the model they had (with the
signed order made at push time when they had committed). A wave that times out goes on when at
least one of its devices committed with evidence, and otherwise pauses, saying why.

A shadow rollout (``push --shadow``) has one wave; a device is settled once it runs the
candidate beside its model (``shadowing``), and the rollout then stays ``shadowing`` until it is
promoted (``rollouts.promote``: a rollout of the same artifact takes over its devices) or aborted
(the devices drop the candidate: the way back is the model they run).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

from edgeml.core import update_contract as uc
from edgeml.core.mqtt_contract import topic

from .rollouts import DONE, FAILED, SHADOWING
from .store import Store

log = logging.getLogger("edgeml.fleet.controller")

REPUBLISH_S = 30.0  # a started device that does not report working on its rollout gets its desired again
ROLLBACK_WINDOW_S = 30.0  # health window of the way back after an abort
COMPARE_EVERY_S = 5.0  # A/B rules compare a rollout's cohorts at most this often (it reads their telemetry)


class Controller:
    def __init__(self, store: Store, publish: Callable[[List[Tuple[str, bytes]]], List[bool]], *,
                 republish_s: float = REPUBLISH_S):
        self.store, self.publish, self.republish_s = store, publish, republish_s
        self._transfers: Dict[str, dict] = {}  # content_sha256 -> full transfer of an artifact the store holds
        self._compared: Dict[str, float] = {}  # rollout -> when its cohorts were last compared

    def tick(self) -> int:
        """One pass over every active rollout; how many desired messages were published."""
        published = 0
        for rollout_id in self.store.rollout_ids():
            with self.store.transaction():
                r = self.store.lock_rollout(rollout_id)
                if r is None or r["state"] not in ("running", "paused", "aborting", SHADOWING):
                    continue
                sends = self.reconcile(r)
            if not sends:
                continue
            confirmed = self.publish([(topic(r["fleet"], device, "desired"), payload) for device, payload in sends])
            with self.store.transaction():  # one commit for the whole wave, not one per device
                for (device, _), ok in zip(sends, confirmed):
                    if ok:
                        self.store.update_assignment(r["id"], device, desired_at=time.time())
            published += sum(confirmed)
        return published

    # -- one rollout -------------------------------------------------------------------------------

    def reconcile(self, r: dict) -> List[Tuple[str, bytes]]:
        now = time.time()
        assignments = self.store.assignments(r["id"])
        status = self.store.device_status(r["fleet"], [a["device"] for a in assignments])
        for a in assignments:
            state, detail = self._observed(r, a, status.get(a["device"]) or {})
            if (state, detail) != (a["state"], a["detail"]):
                self.store.update_assignment(r["id"], a["device"], state=state, detail=detail)
                a["state"], a["detail"] = state, detail
        if r["state"] in ("running", "paused", SHADOWING):
            broken = fleet_violations(r, assignments) + self._cohort_violations(r, now)
            if broken:
                reason = "abort rule: " + "; ".join(broken)
                log.warning("rollout %s: %s", r["id"], reason)
                start_abort(self.store, r["id"], reason)
                r["state"], r["reason"] = "aborting", reason
                # the next pass sees each device's state as an aborting rollout's (a device in its
                # health window is then "returning"); finishing the abort now would leave it on the
                # model being aborted
                return []
        sends: List[Tuple[str, bytes]] = []
        if r["state"] == "aborting":
            self._abort(r, assignments, now)
        elif r["state"] == "running":
            self._waves(r, assignments, now)
        elif r["state"] == SHADOWING:
            self._shadows(r, assignments, now)
        for a in assignments:
            if self._needs_desired(r, a, status.get(a["device"]) or {}, now):
                payload = self._desired(r, a, status.get(a["device"]) or {})
                if payload is not None:
                    sends.append((a["device"], payload))
        return sends

    def _observed(self, r: dict, a: dict, s: dict) -> Tuple[str, dict]:
        """The assignment's state as the device reports it."""
        if a["state"] in ("pending", "skipped"):
            return a["state"], a["detail"]
        up = s.get("update") or {}
        ours = up.get("rollout") == r["id"]
        detail = {k: up[k] for k in ("progress", "error", "evidence", "result") if ours and up.get(k) is not None}
        if ours and up.get("state"):
            detail["device_state"] = up["state"]
        if r["state"] == "aborting" and a["state"] in FAILED:
            return a["state"], {**detail, **{k: v for k, v in a["detail"].items() if k not in detail}}
        if r["state"] == "aborting" or a["state"] in ("returned", "returning"):
            # the host sends it back to the model it had ("stays" when that model is unknown); it is
            # back once that desired message is out and it runs that model, busy with nothing else
            if a["from_content"] is None:
                return "stays", detail
            busy = ours and up.get("state") not in (None, uc.IDLE)
            back = a["desired_at"] is not None and s.get("content_sha256") == a["from_content"] and not busy
            return ("returned" if back else "returning"), detail
        target = r["plan"]["target"]["content_sha256"]
        result = up.get("result") if ours else None
        # a device that runs the target and is busy with no update of ours has it already
        idle = up.get("state") in (None, uc.IDLE)
        if result == "committed" or (not ours and idle and s.get("content_sha256") == target):
            state = "committed"
        elif result == "committed_unobserved":
            state = "unobserved" if a["state"] in ("timed_out", "unobserved") else "committed_unobserved"
        elif result in ("rolled_back", "failed", "refused", "cancelled"):
            state = result
        elif ours and up.get("state") not in (None, uc.IDLE):
            state = up["state"]
        else:
            state = "sent"
        if a["state"] == "timed_out" and state not in DONE:
            state = "timed_out"  # a wave stopped waiting for it; it may still commit later
        return state, detail

    def _cohort_violations(self, r: dict, now: float) -> List[str]:
        """The A/B rules (``ab_latency>1.2x``) the comparison of the rollout's cohorts breaks,
        judged at most every COMPARE_EVERY_S per rollout (it reads the rollout's telemetry)."""
        rules = [rule for rule in uc.parse_rules(r["plan"]["health"]["rules"]) if rule.where == "cohort"]
        if not rules or now - self._compared.get(r["id"], 0.0) < COMPARE_EVERY_S:
            return []
        self._compared[r["id"]] = now
        from .compare import ALPHA, compare_rollout

        result = compare_rollout(self.store, r["id"])
        return cohort_violations(rules, result, ALPHA)

    def _waves(self, r: dict, assignments: List[dict], now: float) -> None:
        plan, k = r["plan"], r["wave"]
        shadow = r["kind"] == "shadow"
        settled = DONE + ((SHADOWING,) if shadow else ())
        if k:
            current = [a for a in assignments if a["wave"] <= k]
            if any(a["state"] not in settled for a in current):
                if now - (r["wave_started"] or now) < plan["wave_timeout_s"]:
                    return
                late = [a for a in current if a["state"] not in settled]
                with_evidence = [a for a in current if a["wave"] == k and a["state"] == ("shadowing" if shadow
                                                                                         else "committed")]
                for a in late:
                    state = "unobserved" if a["state"] == "committed_unobserved" else "timed_out"
                    self.store.update_assignment(r["id"], a["device"], state=state, detail=a["detail"])
                    a["state"] = state
                if not with_evidence:
                    reason = (f"wave {k} timed out after {plan['wave_timeout_s']:.0f} s with no device committing "
                              f"with evidence (waited for {', '.join(a['device'] for a in late[:5])}); "
                              "resume to go on, or abort")
                    log.warning("rollout %s: %s", r["id"], reason)
                    self.store.update_rollout(r["id"], state="paused", reason=reason)
                    r["state"] = "paused"
                    return
            if k >= len(plan["waves"]):
                running = shadow and any(a["state"] == SHADOWING for a in assignments)
                self.store.update_rollout(r["id"], state=SHADOWING if running else "completed", reason=None)
                r["state"] = SHADOWING if running else "completed"
                log.info("rollout %s %s", r["id"], "shadowing on every device it reached" if running else "completed")
                return
        k += 1
        for a in assignments:
            if a["wave"] == k and a["state"] == "pending":
                self.store.update_assignment(r["id"], a["device"], state="sent", desired_at=None)
                a["state"], a["desired_at"] = "sent", None
        self.store.update_rollout(r["id"], wave=k, wave_started=now)
        r["wave"], r["wave_started"] = k, now
        log.info("rollout %s: wave %d of %d started", r["id"], k, len(plan["waves"]))

    def _shadows(self, r: dict, assignments: List[dict], now: float) -> None:
        """A shadow runs until promoted or aborted; once no device runs it any more it is over."""
        if not any(a["state"] == SHADOWING for a in assignments):
            self.store.update_rollout(r["id"], state="completed", reason="no device runs the shadow any more")
            r["state"] = "completed"

    def _abort(self, r: dict, assignments: List[dict], now: float) -> None:
        started = [a for a in assignments if a["state"] not in ("pending", "skipped")]
        for a in assignments:
            if a["state"] == "pending":
                self.store.update_assignment(r["id"], a["device"], state="skipped", detail=a["detail"])
                a["state"] = "skipped"
        waiting = [a for a in started if a["state"] == "returning"]
        if waiting and now - r["updated"] < r["plan"]["wave_timeout_s"]:
            return
        for a in waiting:
            self.store.update_assignment(r["id"], a["device"], state="timed_out", detail=a["detail"])
        self.store.update_rollout(r["id"], state="aborted")
        r["state"] = "aborted"
        log.warning("rollout %s aborted: %s", r["id"], r["reason"])

    def _needs_desired(self, r: dict, a: dict, s: dict, now: float) -> bool:
        if r["state"] == "aborting":
            return a["state"] == "returning" and (a["desired_at"] is None or (
                now - a["desired_at"] > self.republish_s and s.get("presence") == "online"))
        if r["state"] not in ("running", "paused", SHADOWING) or a["state"] in ("pending", "skipped") or a["state"] in DONE:
            return False
        if a["desired_at"] is None:
            return True
        working = (s.get("update") or {}).get("rollout") == r["id"]
        return not working and s.get("presence") == "online" and now - a["desired_at"] > self.republish_s

    # -- desired messages ---------------------------------------------------------------------------

    def _desired(self, r: dict, a: dict, s: dict) -> Optional[bytes]:
        plan = r["plan"]
        health = uc.Health(**plan["health"])
        if r["state"] == "aborting":
            return self._way_back(r, a, health)
        current = s.get("content_sha256") or a["from_content"]
        delta = plan["deltas"].get(current)
        desired = uc.Desired(r["fleet"], a["device"], r["id"], r["created"], dict(plan["target"]),
                             uc.Transfer.from_dict(plan["full"], "full"),
                             uc.Transfer.from_dict(delta, "delta") if delta else None, health, plan.get("order"),
                             plan.get("shadow"))
        return desired.encode()

    def _way_back(self, r: dict, a: dict, health: uc.Health) -> Optional[bytes]:
        """The model the device had before the rollout, with the push's signed order (needed once
        the device committed the new version)."""
        if a["from_content"] is None:
            return None
        info = self.store.artifact_info(a["from_content"])
        full = self._full(info) if info else None
        target = {"name": a["from_name"], "version": a["from_version"], "content_sha256": a["from_content"],
                  "sha256": info["sha256"] if info else (a["from_sha256"] or a["from_content"]),
                  "size": info["size"] if info else 0,
                  "format": info["format"] if info else r["plan"]["target"]["format"]}
        back = uc.Health(window_s=min(ROLLBACK_WINDOW_S, health.window_s), min_requests=0, rules="",
                         latency_budget=1000.0)
        return uc.Desired(r["fleet"], a["device"], r["id"], r["created"], target, full, None, back,
                          r["signed_order"]).encode()

    def _full(self, info: dict) -> uc.Transfer:
        if info["content_sha256"] not in self._transfers:
            data = self.store.blob(info["sha256"])
            self._transfers[info["content_sha256"]] = uc.Transfer.of(data, "full").to_dict()
        return uc.Transfer.from_dict(self._transfers[info["content_sha256"]], "full")


def start_abort(store: Store, rollout_id: str, reason: str) -> None:
    """Inside a transaction: stop the rollout; every device that got its desired model gets the way
    back (the desired messages are due again)."""
    store.update_rollout(rollout_id, state="aborting", reason=reason)
    store.reset_desired(rollout_id)


def cohort_violations(rules, result: dict, alpha: float) -> List[str]:
    """What ``rules`` say of a comparison (``compare_rollout``): broken when the new cohort is worse
    by more than the factor and the test calls the difference significant."""
    old, new, tests = result["cohorts"]["old"], result["cohorts"]["new"], result["tests"]
    out = []
    for rule in rules:
        if rule.metric == "ab_latency" and "latency" in tests and old["latency_p50_ms"]:
            ratio, test = new["latency_p50_ms"] / old["latency_p50_ms"], tests["latency"]
            if ratio > rule.threshold and test["p"] is not None and test["p"] < alpha and test["p_greater"] > 0.5:
                out.append(f"the new version's devices answer slower: p50 {new['latency_p50_ms']:.3f} ms against "
                           f"{old['latency_p50_ms']:.3f} ms ({ratio:.2f}x > {rule}, Mann-Whitney p {test['p']:.2g})")
        if rule.metric == "ab_error_rate" and "error_rate" in tests:
            test = tests["error_rate"]
            base = max(old["error_rate"], 1.0 / max(old["requests"] + old["errors"], 1))
            if new["error_rate"] > rule.threshold * base and test["p"] is not None and test["p"] < alpha:
                out.append(f"the new version's devices fail more: error rate {new['error_rate']:.4f} against "
                           f"{old['error_rate']:.4f} (> {rule}, z-test p {test['p']:.2g})")
    return out


def fleet_violations(r: dict, assignments: List[dict]) -> List[str]:
    """The fleet rules (``failed>10%``) the rollout's devices break."""
    rules = [rule for rule in uc.parse_rules(r["plan"]["health"]["rules"]) if rule.where == "fleet"]
    started = [a for a in assignments if a["state"] not in ("pending", "skipped")]
    if not rules or not started:
        return []
    failed = [a for a in started if a["state"] in FAILED]
    share = len(failed) / len(started)
    out = []
    for rule in rules:
        limit = rule.threshold if rule.unit == "%" else rule.threshold / len(started)
        if failed and share > limit:
            names = ", ".join(f"{a['device']} ({a['state']}: {a['detail'].get('error', '')[:80]})" for a in failed[:3])
            out.append(f"{len(failed)} of {len(started)} started devices failed ({share:.0%} > {rule}): {names}")
    return out
