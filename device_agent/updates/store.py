"""What the update machinery keeps on disk, under ``data_dir/updates/``.

    state.json        the update in progress (or the last one's result), written with fsync + rename
                      before each step runs: a power cut at any point finds the step to resume
    trust.json        outside both model slots: the highest version committed per model (never
                      lowered), the issue time of the last rollback order accepted, and models
                      that failed here (never installed again)
    models/<content_sha256>.edgeml   the slots: the active model, the previous one, a staged one
    downloads/<transfer id>.part     a download in progress, and .blocks: which blocks it holds
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from edgeml.core.atomic import write_atomic

log = logging.getLogger("edgeml-agent.updates")
MAX_FAILED = 64  # models remembered as failed here; the oldest are forgotten first
MAX_ATTEMPTS = 3  # a step entered this many times (a crash loop) fails the update


def _model(art, path: Path) -> dict:
    m = art.manifest
    return {"path": str(path), "name": m["name"], "version": m["version"], "content_sha256": art.content_sha256,
            "sha256": art.sha256, "format": art.model_format}


class UpdateStore:
    def __init__(self, data_dir):
        self.root = Path(data_dir) / "updates"
        self.models = self.root / "models"
        self.downloads = self.root / "downloads"
        for folder in (self.root, self.models, self.downloads):
            folder.mkdir(parents=True, exist_ok=True)
        self.state_path, self.trust_path = self.root / "state.json", self.root / "trust.json"
        self.state = self._read(self.state_path, {"state": "idle", "active": None, "previous": None})
        self.trust = self._read(self.trust_path, {"highest": {}, "last_order_issued": 0.0, "failed": []})
        for leftover in self.root.glob("*.tmp"):  # a write cut off by a crash
            leftover.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path, default: dict) -> dict:
        if not path.exists():
            return dict(default)
        try:
            value = json.loads(path.read_text())
            if isinstance(value, dict):
                return {**default, **value}
        except (OSError, ValueError) as exc:
            log.error("updates: %s is unreadable (%s); starting from a clean state", path, exc)
        return dict(default)

    # -- the persisted state ------------------------------------------------------------------

    def save(self, **changes) -> dict:
        """Update the state and make it durable before anything else happens."""
        self.state.update(changes)
        self.state["updated"] = time.time()
        write_atomic(self.state_path, json.dumps(self.state, sort_keys=True).encode("utf-8"), 0o600)
        return self.state

    def enter(self, state: str, **changes) -> dict:
        """Persist ``state`` as the step about to run, counting how often it was entered for this update."""
        attempts = dict(self.state.get("attempts") or {})
        attempts[state] = attempts.get(state, 0) + 1
        return self.save(state=state, attempts=attempts, entered=time.time(), **changes)

    def attempts(self, state: str) -> int:
        return (self.state.get("attempts") or {}).get(state, 0)

    # -- trust: outside the slots, only ever raised ----------------------------------------------

    def highest(self, name: str) -> Optional[dict]:
        return self.trust["highest"].get(name)

    def commit_version(self, model: dict) -> None:
        """Raise the highest committed version of the model's name (never lower it)."""
        current = self.highest(model["name"])
        if current is None or model["version"] > current["version"]:
            self.trust["highest"][model["name"]] = {"version": model["version"],
                                                    "content_sha256": model["content_sha256"]}
            self._save_trust()

    def accept_order(self, issued: float) -> None:
        self.trust["last_order_issued"] = max(float(issued), self.trust["last_order_issued"])
        self._save_trust()

    def mark_failed(self, content_sha256: str) -> None:
        failed = [c for c in self.trust["failed"] if c != content_sha256] + [content_sha256]
        self.trust["failed"] = failed[-MAX_FAILED:]
        self._save_trust()

    def failed(self, content_sha256: str) -> bool:
        return content_sha256 in self.trust["failed"]

    def _save_trust(self) -> None:
        write_atomic(self.trust_path, json.dumps(self.trust, sort_keys=True).encode("utf-8"), 0o600)

    # -- slots -----------------------------------------------------------------------------------

    def slot(self, content_sha256: str) -> Path:
        return self.models / f"{content_sha256}.edgeml"

    def adopt(self, art, path: Path) -> dict:
        """Record the artifact the agent serves (first start, or one the operator installed by hand)
        as the active model, with a copy in the slots so a later rollback does not depend on the
        original file staying where it was."""
        slot = self.slot(art.content_sha256)
        if not slot.exists():
            write_atomic(slot, Path(path).read_bytes(), 0o644)
        model = _model(art, slot)
        if (self.state.get("active") or {}).get("content_sha256") != model["content_sha256"]:
            self.save(active=model)
        self.commit_version(model)
        return model

    def model(self, art, path: Path) -> dict:
        return _model(art, path)

    def collect_garbage(self) -> None:
        """Keep the active and previous models and whatever the state still points at."""
        keep = {Path(m["path"]).name for m in (self.state.get("active"), self.state.get("previous"),
                                               self.state.get("target")) if m and m.get("path")}
        for path in self.models.glob("*.edgeml"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        transfer = (self.state.get("transfer") or {}).get("id")
        for path in self.downloads.iterdir():
            if transfer is None or not path.name.startswith(transfer):
                path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path, ignore_errors=True)

    def disk_free(self) -> Optional[int]:
        try:
            st = os.statvfs(self.root)
            return st.f_bavail * st.f_frsize
        except OSError:
            return None
