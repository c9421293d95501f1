"""Calibration and evaluation data: ``.npz`` files or ``module:function`` iterables of input dicts.

A data source yields dicts mapping input names to batched arrays (an optional ``y`` holds
labels), like ONNX Runtime's CalibrationDataReader. Sampling is seeded and described in
``Dataset.provenance`` so a run can be repeated exactly.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from .errors import DataError, InputError
from .hashing import sha256_path
from .specs import TensorSpec

LABEL_KEY = "y"
SINGLE_INPUT_KEY = "x"
Outputs = Dict[str, np.ndarray]


@dataclass
class Dataset:
    """Samples held in memory: ``inputs[name]`` has the sample axis first.

    Usually the sample axis is the model's batch axis. When ``whole`` is set, each sample is a
    complete input tensor instead (models whose inputs have no batch axis first, such as a
    recurrent state [layers, batch, units] or a scalar sample rate), fed one sample at a time.
    """

    inputs: Dict[str, np.ndarray]
    labels: Optional[np.ndarray] = None
    provenance: dict = field(default_factory=dict)
    whole: bool = False

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
        """Feeds for the model: batches along the batch axis, or single whole samples."""
        if self.whole:
            for i in range(len(self)):
                yield {k: v[i] for k, v in self.inputs.items()}
            return
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def feed(self, index: int) -> Dict[str, np.ndarray]:
        """One sample as the model takes it."""
        if self.whole:
            return {k: v[index] for k, v in self.inputs.items()}
        return {k: v[index : index + 1] for k, v in self.inputs.items()}

    def take(self, indices: Sequence[int]) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(
            {k: v[idx] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[idx],
            dict(self.provenance),
            self.whole,
        )

    def head(self, n: int) -> "Dataset":
        return self.take(range(min(n, len(self))))


def run_dataset(run: Callable[[Outputs], Outputs], dataset: Dataset, batch_size: int = 32) -> Outputs:
    """Run ``run`` over the dataset in batches; join each output along the sample axis."""
    parts: Dict[str, list] = {}
    for batch in dataset.batches(batch_size):
        for name, value in run(batch).items():
            parts.setdefault(name, []).append(np.asarray(value))
    join = np.stack if dataset.whole else np.concatenate  # whole samples get a new sample axis
    return {name: join(chunks) for name, chunks in parts.items()}


def load_data(spec: str, *, limit: Optional[int] = None, seed: int = 0, role: str = "data") -> Dataset:
    """Load ``spec`` (a .npz path or ``module:function``); keep at most ``limit`` samples.

    When there are more samples than ``limit``, a seeded random subset is kept (in source order).
    """
    path = Path(spec)
    if path.suffix == ".npz" or path.exists():
        dataset = _load_npz(path, role)
    elif ":" in spec:
        dataset = _load_callable(spec, limit=limit, seed=seed, role=role)
    else:
        raise InputError(
            f"{role} file not found: {spec}; pass a .npz file or module:function"
        )
    if len(dataset) == 0:
        raise DataError(f"{role} data {spec} has no samples; give at least one")
    return _sample(dataset, limit, seed)


def _load_npz(path: Path, role: str) -> Dataset:
    if not path.is_file():
        raise InputError(f"{role} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(
            f"cannot read {role} file {path} as .npz ({exc}); save it with numpy.savez"
        ) from exc
    labels = arrays.pop(LABEL_KEY, None)
    # names starting with "_" are about the samples, not inputs (where each came from, what the
    # model predicted: edgeml fleet feedback pull writes them), so the file is taken as it is
    arrays = {k: v for k, v in arrays.items() if not k.startswith("_")}
    if not arrays:
        raise DataError(f"{role} file {path} holds no input arrays; add one array per model input")
    dataset = Dataset(arrays, labels, {"source": str(path), "sha256": sha256_path(path)})
    _check_lengths(dataset, str(path), role)
    return dataset


def _load_callable(spec: str, *, limit, seed, role) -> Dataset:
    module_name, _, func_name = spec.partition(":")
    try:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # so a module next to the user's data is found, as with python -m
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load {role} source {spec}: {exc}") from exc
    try:
        stream = func()
    except Exception as exc:
        raise DataError(f"{role} source {spec} raised {type(exc).__name__}: {exc}") from exc
    dataset = _collect(stream, spec, role, limit=limit, seed=seed)
    dataset.provenance = {"source": spec, **dataset.provenance}
    return dataset


def _collect(stream: Iterable[dict], spec: str, role: str, *, limit, seed) -> Dataset:
    """Read batches from an iterable; keep a seeded reservoir sample when ``limit`` is set."""
    rng = np.random.default_rng(seed)
    kept: List[tuple] = []  # (position, sample dict)
    seen = 0
    keys = None
    for batch in stream:
        if not isinstance(batch, dict) or not batch:
            raise DataError(f"{role} source {spec} must yield dicts of arrays, got {type(batch).__name__}")
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        if keys is None:
            keys = sorted(arrays)
        elif sorted(arrays) != keys:
            raise DataError(f"{role} source {spec} yielded batches with different keys: {keys} vs {sorted(arrays)}")
        n = len(next(iter(arrays.values())))
        for i in range(n):
            sample = {k: v[i] for k, v in arrays.items()}
            if limit is None or len(kept) < limit:
                kept.append((seen, sample))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < limit:
                    kept[j] = (seen, sample)
            seen += 1
    if not kept:
        raise DataError(f"{role} source {spec} yielded no samples")
    kept.sort(key=lambda t: t[0])
    stacked = {k: np.stack([s[k] for _, s in kept]) for k in keys}
    labels = stacked.pop(LABEL_KEY, None)
    return Dataset(stacked, labels, {"streamed_samples": seen})


def _sample(dataset: Dataset, limit: Optional[int], seed: int) -> Dataset:
    n = len(dataset)
    prov = dict(dataset.provenance)
    if limit is not None and n > limit:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        dataset = dataset.take(idx)
        prov["indices_sha256"] = hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
    prov.update({"samples": len(dataset), "seed": seed, "limit": limit})
    dataset.provenance = prov
    return dataset


def _check_lengths(dataset: Dataset, where: str, role: str) -> None:
    lengths = {k: len(v) for k, v in dataset.inputs.items() if np.ndim(v) > 0}
    if dataset.labels is not None:
        lengths[LABEL_KEY] = len(dataset.labels)
    if len(set(lengths.values())) > 1 or len(lengths) < len(dataset.inputs):
        raise DataError(f"{role} arrays in {where} have different sample counts: {lengths}")


def match_inputs(dataset: Dataset, specs: Sequence[TensorSpec], role: str = "data") -> Dataset:
    """Check names, shapes and dtypes against the model's inputs; return data keyed by input name.

    A single-input model also takes an array named ``x``. Integer data fed to a float input and
    float64 data fed to float32 are converted, except uint8 (raw pixels need the model's own
    scaling); NaN or infinity anywhere is refused; anything else that differs is an error.
    """
    arrays = dict(dataset.inputs)
    names = [s.name for s in specs]
    if len(specs) == 1 and SINGLE_INPUT_KEY in arrays and names[0] not in arrays:
        arrays[names[0]] = arrays.pop(SINGLE_INPUT_KEY)
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        hint = " (or 'x' for a single-input model)" if len(specs) == 1 else ""
        raise DataError(
            f"{role} data has arrays {sorted(dataset.inputs)} but the model's inputs are {names}; "
            f"name one array per model input{hint}"
        )
    whole = _whole_samples(arrays, specs, role)
    out = {}
    for spec in specs:
        out[spec.name] = _conform(arrays[spec.name], spec, role, whole)
        _check_finite(out[spec.name], f"{role} array '{spec.name}'")
    if dataset.labels is not None:
        _check_finite(dataset.labels, f"{role} labels 'y'")
    return Dataset(out, dataset.labels, dataset.provenance, whole)


def _check_finite(x: np.ndarray, what: str) -> None:
    """NaN or infinity in data poison every figure computed from it: name the first sample."""
    if x.dtype.kind not in "fc" or not x.size:
        return
    bad = ~np.isfinite(x.reshape(len(x), -1) if x.ndim else x.reshape(1, 1)).all(axis=1)
    if bad.any():
        first, count = int(np.argmax(bad)), int(bad.sum())
        value = "NaN" if np.isnan(x[first] if x.ndim else x).any() else "infinity"
        raise DataError(f"{what} holds {value} at sample {first} ({count} of {len(bad)} samples hold NaN or "
                        "infinity); clean or drop those samples")


def _whole_samples(arrays: Dict[str, np.ndarray], specs: Sequence[TensorSpec], role: str) -> bool:
    """True when every array holds whole input tensors (one more axis than the input has).

    That is how data for inputs without a leading batch axis is given: a state of shape
    [2, 1, 128] as an array [N, 2, 1, 128], a scalar as an array [N].
    """
    extra = {s.name: arrays[s.name].ndim - len(s.shape) for s in specs}
    if all(e == 1 for e in extra.values()):
        return True
    scalar = [s.name for s in specs if not s.shape]
    if not scalar and not (1 in extra.values() and 0 in extra.values()):
        return False  # batches; _conform names any shape that is off
    name = (scalar or [n for n, e in extra.items() if e == 1])[0]
    spec = next(s for s in specs if s.name == name)
    raise DataError(
        f"{role} array '{name}' has {arrays[name].ndim} axes but the model input has {len(spec.shape)}; "
        "give every input either as batches (the input's own axes, samples first) or as whole inputs "
        "(one extra leading axis)"
    )


def _conform(x: np.ndarray, spec: TensorSpec, role: str, whole: bool = False) -> np.ndarray:
    want = tuple(spec.shape) if whole else (spec.shape[1:] if spec.shape else ())
    got = x.shape[1:]
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        shown = ",".join("?" if w is None else str(w) for w in want)
        raise DataError(
            f"{role} array '{spec.name}' has samples of shape {tuple(got)} but the model expects "
            f"({shown}); reshape the data to match"
        )
    target = np.dtype(spec.dtype)
    if x.dtype == target:
        return x
    if target.kind == "f" and x.dtype == np.uint8:
        raise DataError(
            f"{role} array '{spec.name}' is uint8 (raw pixels?) but the model takes {target}: casting would skip "
            f"the scaling the model was trained with, so edgeml does not guess it; save the data as the model "
            f"takes it, say (x / 255).astype('{target}'), or x.astype('{target}') if it was trained on 0..255"
        )
    float_ok = target.kind == "f" and x.dtype.kind in "fiub"
    int_ok = target.kind in "iu" and x.dtype.kind in "iu" and np.can_cast(x.dtype, target, "same_kind")
    if float_ok or int_ok:
        return x.astype(target)
    raise DataError(
        f"{role} array '{spec.name}' has dtype {x.dtype} but the model expects {target}; "
        f"convert it with .astype('{target}')"
    )


def rename_inputs(dataset: Dataset, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> Dataset:
    """The same samples keyed by another model's input names, matched by position (a student
    model checked to take the teacher's inputs may have named them differently)."""
    old_names, new_names = [s.name for s in old], [s.name for s in new]
    if old_names == new_names:
        return dataset
    return Dataset({n: dataset.inputs[o] for o, n in zip(old_names, new_names)}, dataset.labels,
                   dict(dataset.provenance), dataset.whole)


def save_npz(path, inputs: Dict[str, np.ndarray], labels: Optional[np.ndarray] = None) -> None:
    """Write a data file edgeml reads back (one array per input, optional labels)."""
    arrays = dict(inputs)
    if labels is not None:
        arrays[LABEL_KEY] = labels
    np.savez(path, **arrays)
