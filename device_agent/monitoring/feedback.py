"""Ground truth for earlier requests (opt-in): the retraining loop's data, kept on the device.

With feedback on, every inference response carries an ``id`` (the request's own, or one the
agent makes) and a sampled share of requests keeps its inputs and prediction in a bounded
``pending`` table. ``POST /v2/models/{name}/feedback {"id", "label"}`` attaches the true class to
one: it is scored (live accuracy, per window into telemetry) and offered to a reservoir of
(inputs, prediction, label) samples held within a byte bound (reservoir sampling: every labelled
sample has the same chance to be in it, however many came). The reservoir is written to
``DATA_DIR/feedback/reservoir.npz`` (atomically) and is what ``edgeml fleet feedback pull``
collects: one ``.npz`` per fleet that ``edgeml optimize --train/--eval`` takes as it is.
"""
from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from edgeml.core.atomic import write_atomic

log = logging.getLogger(__name__)

RESERVOIR_FILE = "reservoir.npz"


@dataclass
class FeedbackSettings:
    enabled: bool = False  # inputs can be private: nothing is kept unless this is turned on
    sample: float = 1.0  # share of requests whose inputs wait for a label
    pending: int = 1000  # requests waiting for a label, the oldest forgotten first
    max_bytes: int = 16 << 20  # the reservoir's bound, inputs included


class UnknownRequest(LookupError):
    """A feedback for an id never kept (sampled out, forgotten, another model's) or already labelled."""


class Feedback:
    def __init__(self, folder: Path, model: str, version: int, settings: FeedbackSettings, seed: Optional[int] = None):
        self.folder, self.model, self.version, self.settings = Path(folder), model, version, settings
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._pending: "OrderedDict[str, tuple]" = OrderedDict()
        self.samples: List[dict] = []  # the reservoir: {"inputs": {...}, "prediction", "label", "version", "ts"}
        self.seen = 0  # labelled samples offered to the reservoir, ever (reservoir sampling's n)
        self.window = {"labelled": 0, "correct": 0}
        self._bytes = 0
        self._dirty = False
        self._load()

    # --- the request path -----------------------------------------------------------------------

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def keep(self, request_id: str, inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray]) -> None:
        """Keep a served request's inputs and predicted class(es) until a label comes (or not, by sampling)."""
        if self._random.random() >= self.settings.sample:
            return
        prediction = _prediction(outputs)
        with self._lock:
            # the request's own arrays: the API never reuses them, so no copy on the request path
            self._pending[request_id] = (dict(inputs), prediction, time.time())
            while len(self._pending) > self.settings.pending:
                self._pending.popitem(last=False)

    # --- labels -----------------------------------------------------------------------------------

    def label(self, request_id: str, label) -> dict:
        with self._lock:
            kept = self._pending.pop(request_id, None)
        if kept is None:
            raise UnknownRequest(request_id)
        inputs, prediction, ts = kept
        labels = np.asarray(label).reshape(-1)
        if prediction is not None and len(labels) != len(prediction):
            with self._lock:  # a wrong label must not lose the request
                self._pending[request_id] = kept
            raise ValueError(f"the request had {len(prediction)} samples, the feedback has {len(labels)} labels")
        correct = None if prediction is None else int(np.sum(labels == prediction))
        with self._lock:
            self.window["labelled"] += len(labels)
            self.window["correct"] += correct or 0
            for i, y in enumerate(labels):
                self._offer({"inputs": {k: v[i] for k, v in inputs.items()},
                             "prediction": None if prediction is None else int(prediction[i]), "label": y.item(),
                             "version": self.version, "ts": ts})
        return {"id": request_id, "labels": len(labels), "correct": correct}

    def _offer(self, sample: dict) -> None:
        """Reservoir sampling within the byte bound (under the lock)."""
        size = sum(v.nbytes for v in sample["inputs"].values()) + 64
        if size > self.settings.max_bytes:
            return
        self.seen += 1
        if self._bytes + size <= self.settings.max_bytes:
            self.samples.append(sample)
            self._bytes += size
        else:
            j = self._random.randrange(self.seen)
            if j < len(self.samples):
                old = self.samples[j]
                self._bytes += size - (sum(v.nbytes for v in old["inputs"].values()) + 64)
                self.samples[j] = sample
        self._dirty = True

    def take_window(self) -> Optional[dict]:
        """The window's live accuracy for telemetry (None when nothing was labelled)."""
        with self._lock:
            w, self.window = self.window, {"labelled": 0, "correct": 0}
        if not w["labelled"]:
            return None
        return {"kind": "feedback", "ts": time.time(), "model": self.model, "version": self.version,
                "labelled": w["labelled"], "correct": w["correct"], "accuracy": round(w["correct"] / w["labelled"], 6),
                "reservoir": len(self.samples)}

    # --- on disk ----------------------------------------------------------------------------------

    def npz_bytes(self) -> bytes:
        """The reservoir as one .npz: an array per input (samples first), ``y`` the labels,
        ``prediction`` and ``version`` beside them."""
        with self._lock:
            samples = list(self.samples)
        arrays: Dict[str, np.ndarray] = {}
        if samples:
            for name in samples[0]["inputs"]:
                arrays[name] = np.stack([s["inputs"][name] for s in samples])
            arrays["y"] = np.asarray([s["label"] for s in samples])
            arrays["prediction"] = np.asarray([-1 if s["prediction"] is None else s["prediction"] for s in samples])
            arrays["version"] = np.asarray([s["version"] for s in samples])
            arrays["seen"] = np.asarray(self.seen)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / RESERVOIR_FILE, self.npz_bytes())
        except OSError as exc:  # a full disk must not stop serving; the reservoir stays in memory
            self._dirty = True
            log.error("feedback: cannot write the reservoir (%s); kept in memory", exc)

    def _load(self) -> None:
        path = self.folder / RESERVOIR_FILE
        if not path.exists():
            return
        try:
            with np.load(path) as data:
                names = [k for k in data.files if k not in ("y", "prediction", "version", "seen")]
                for i in range(len(data["y"]) if "y" in data.files else 0):
                    self._offer({"inputs": {k: data[k][i] for k in names}, "prediction": int(data["prediction"][i]),
                                 "label": data["y"][i].item(), "version": int(data["version"][i]), "ts": 0.0})
                self.seen = max(self.seen, int(data["seen"])) if "seen" in data.files else self.seen
        except Exception as exc:  # a damaged file costs the old samples, not the service
            log.error("feedback: the reservoir %s is unreadable (%s); starting a new one", path, exc)
            self.samples, self._bytes, self.seen = [], 0, 0
        self._dirty = False


def _prediction(outputs: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """The predicted class per sample of the first class-score output ([N, C]), or integer labels ([N])."""
    for name in sorted(outputs):
        y = np.asarray(outputs[name])
        if y.ndim == 2 and y.shape[1] > 1 and y.dtype.kind == "f":
            return y.argmax(axis=1)
        if y.ndim == 1 and y.dtype.kind in "iu":
            return y.copy()
    return None
