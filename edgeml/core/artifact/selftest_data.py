"""How the self-test is stored in ``selftest.npz``: input encodings and compact references.

numpy only: the device agent decodes the inputs and recomputes the compact form of its own
outputs with these functions, exactly as the build machine made them.

The manifest's ``selftest`` section says how each array is stored; what it does not mention is
stored as is (every artifact of schema version 1 is like that)::

    "inputs":     {name: {"dtype": "float32", "stored": "float16"}}  (or "uint8" with "scale", "offset")
    "references": {name: {"kind": "topk+projection" | "projection", "shape": [n, ...],
                          "topk": 5, "projection": {"dims": 64, "seed": 0, "margin": 2.0}}}

Arrays in ``selftest.npz``: ``input/<name>`` (in its stored dtype; the reference outputs were
computed on the decoded values, so storing them narrower costs the self-test nothing),
``output/<name>`` (a full reference), and for a compact reference
``reference/topk_index/<name>``, ``reference/topk_value/<name>``, ``reference/projection/<name>``.

- **topk** (class scores ``[n, C]`` or ``[n, T, C]``): per row of the last axis, the indices and
  values of its ``k`` largest scores. A model within ``atol`` of the reference everywhere has
  those entries within ``atol`` and no other entry above the k-th value plus ``atol``.
- **projection**: each sample's output, flattened to ``d`` values, times a fixed ``dims × d``
  matrix of ±1/√dims (signs from a seeded integer hash, the same on every machine and numpy).
  An error ``e`` with ``|e_i| <= atol`` has ``‖e‖ <= √d·atol``, and the projection keeps ``‖e‖``
  within a factor ``margin`` (2) but for a chance far below 1e-12, so the bound is
  ``margin·√d·atol``: a correct model passes, and one whose outputs are off by more than about
  ``margin·atol`` in root mean square fails.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from .layout import npz_bytes

TOPK = 5
PROJECTION_DIMS = 64  # at most 64: one 64-bit hash gives every row's sign for an input position
PROJECTION_MARGIN = 2.0
KINDS = ("topk+projection", "projection")
PARTS = ("topk_index", "topk_value", "projection")
STORED = ("float16", "int8", "uint8", "int16", "uint16", "int32", "uint32")
_CHUNK = 16384  # positions per block of signs: 16384 x 64 float64 = 8 MiB

References = Dict[str, Dict[str, np.ndarray]]  # {output name: {part: array}}


# -- inputs ------------------------------------------------------------------------------------------


def narrowest(x: np.ndarray) -> Optional[str]:
    """The dtype to store ``x`` in, or None to store it as is: float16 for float32/float64 values
    it can hold (finite, within its range), the narrowest integer type that holds integers."""
    x = np.asarray(x)
    if x.size == 0:
        return None
    if x.dtype in (np.float32, np.float64):
        fits = bool(np.all(np.isfinite(x))) and float(np.max(np.abs(x))) <= float(np.finfo(np.float16).max)
        return "float16" if fits else None
    if x.dtype.kind in "iu" and x.dtype.itemsize > 1:
        lo, hi = int(x.min()), int(x.max())
        for name in ("int8", "uint8", "int16", "uint16", "int32", "uint32"):
            info = np.iinfo(name)
            if info.min <= lo and hi <= info.max and np.dtype(name).itemsize < x.dtype.itemsize:
                return name
    return None


def byte_spec(x: np.ndarray) -> Optional[dict]:
    """For float ``x``: 256 evenly spaced levels from its minimum to its maximum (an image's own
    resolution), or None when ``x`` is not float or not finite."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.size == 0 or not np.all(np.isfinite(x)):
        return None
    lo, hi = float(np.min(x)), float(np.max(x))
    return {"dtype": str(x.dtype), "stored": "uint8", "scale": (hi - lo) / 255.0 if hi > lo else 1.0, "offset": lo}


def decode_input(stored: np.ndarray, spec: dict) -> np.ndarray:
    stored = np.asarray(stored)
    if "scale" in spec:  # float64 multiply, then add: the same values on every machine
        return (stored.astype(np.float64) * float(spec["scale"]) + float(spec["offset"])).astype(spec["dtype"])
    return stored.astype(spec["dtype"])


def quantize_input(x: np.ndarray, spec: dict) -> np.ndarray:
    """``x`` in its stored dtype (rounded to the nearest level for a scale and offset)."""
    x = np.asarray(x)
    if "scale" in spec:
        levels = np.rint((x.astype(np.float64) - float(spec["offset"])) / float(spec["scale"]))
        return np.clip(levels, 0, 255).astype(np.uint8)
    return x.astype(spec["stored"])


def encode_input(x: np.ndarray, spec: dict) -> np.ndarray:
    """``x`` in its stored dtype; ValueError unless decoding gives ``x`` back exactly (the reference
    outputs must have been computed on the values a device will decode)."""
    x = np.asarray(x)
    if x.dtype != np.dtype(spec["dtype"]):
        raise ValueError(f"is {x.dtype}, the manifest's selftest says {spec['dtype']}")
    stored = quantize_input(x, spec)
    if not np.array_equal(decode_input(stored, spec), x, equal_nan=False):
        raise ValueError(f"does not survive storing as {spec['stored']}; compute the reference outputs on "
                         "the decoded values (edgeml.core.selftest.build_selftest does)")
    return stored


# -- references --------------------------------------------------------------------------------------


def compact(y: np.ndarray, spec: dict) -> Dict[str, np.ndarray]:
    """The stored parts of a compact reference for the full output ``y``."""
    y = np.asarray(y)
    if list(y.shape) != list(spec["shape"]):
        raise ValueError(f"has shape {list(y.shape)}, the manifest's selftest says {spec['shape']}")
    parts = {"projection": project(y, spec["projection"])}
    if "topk" in spec:
        parts["topk_index"], parts["topk_value"] = top_k(y, spec["topk"])
    return parts


def top_k(y: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest entries of each row of the last axis, largest first
    (ties: the lower index first)."""
    y = np.asarray(y)
    order = np.argsort(-y.astype(np.float64), axis=-1, kind="stable")[..., :k]
    index_dtype = np.uint16 if y.shape[-1] <= np.iinfo(np.uint16).max + 1 else np.int64
    return order.astype(index_dtype), np.take_along_axis(y, order, axis=-1)


def project(y: np.ndarray, proj: dict) -> np.ndarray:
    """``[n, dims]`` float64: each of the ``n`` samples' outputs, flattened, times the sign matrix."""
    y = np.asarray(y)
    flat = y.reshape(y.shape[0], -1)
    dims, seed = int(proj["dims"]), int(proj["seed"])
    out = np.zeros((flat.shape[0], dims), np.float64)
    for start in range(0, flat.shape[1], _CHUNK):
        stop = min(start + _CHUNK, flat.shape[1])
        out += flat[:, start:stop].astype(np.float64) @ _signs(start, stop, seed)[:, :dims]
    return out / np.sqrt(dims)


def projection_bound(spec: dict, atol: float) -> float:
    """The largest ‖projected error‖ of a model within ``atol`` of the reference everywhere."""
    d = int(np.prod(spec["shape"][1:], dtype=np.int64))
    return float(spec["projection"]["margin"]) * float(np.sqrt(max(d, 1))) * atol


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signs(start: int, stop: int, seed: int) -> np.ndarray:
    """``[stop - start, 64]`` of ±1.0: bit j of splitmix64(position, seed) gives row j's sign."""
    z = np.arange(start, stop, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64((seed * _MIX1 + 1) % (1 << 64))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    z = z ^ (z >> np.uint64(31))
    bits = np.unpackbits(z.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return 1.0 - 2.0 * bits.astype(np.float64)


# -- the member as a whole ------------------------------------------------------------------------------


def section(manifest: dict) -> dict:
    """The manifest's ``selftest`` section ({} when it has none)."""
    meta = manifest.get("selftest")
    return {} if meta is None else meta


def is_compact(meta: dict) -> bool:
    """Whether anything is stored other than as is (which needs schema version 2 to read)."""
    return bool(meta.get("inputs") or meta.get("references"))


def pack(inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray], meta: dict) -> bytes:
    """``selftest.npz`` for these inputs (as the model takes them) and full reference outputs, stored
    as ``meta`` (the manifest's selftest section) says; ValueError when they do not fit it."""
    problem = check_spec(meta)
    if problem:
        raise ValueError(problem)
    in_specs, ref_specs = meta.get("inputs", {}), meta.get("references", {})
    stored = {}
    for name, x in inputs.items():
        try:
            stored[name] = encode_input(x, in_specs[name]) if name in in_specs else x
        except ValueError as exc:
            raise ValueError(f"self-test input {name!r} {exc}") from None
    missing = sorted(set(in_specs) - set(inputs)) + sorted(set(ref_specs) - set(outputs))
    if missing:
        raise ValueError(f"the manifest's selftest describes {missing[0]!r}, which was not given")
    references = {}
    for name, spec in ref_specs.items():
        try:
            references[name] = compact(outputs[name], spec)
        except ValueError as exc:
            raise ValueError(f"self-test output {name!r} {exc}") from None
    full = {name: y for name, y in outputs.items() if name not in ref_specs}
    return npz_bytes(stored, full, references)


def unpack(arrays: dict, meta: dict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], References]:
    """Decoded inputs, full references and compact references from the arrays of ``selftest.npz``
    (``{"input": {...}, "output": {...}, "reference": {part: {name: array}}}``); ValueError says
    what does not match the manifest."""
    problem = check_spec(meta)
    if problem:
        raise ValueError(f"the manifest's {problem}")
    in_specs, ref_specs = meta.get("inputs", {}), meta.get("references", {})
    inputs = {}
    for name, stored in arrays["input"].items():
        spec = in_specs.get(name)
        if spec is not None and stored.dtype != np.dtype(spec["stored"]):
            raise ValueError(f"input {name!r} is stored as {stored.dtype}, the manifest says {spec['stored']}")
        inputs[name] = stored if spec is None else decode_input(stored, spec)
    references: References = {}
    for part, named in arrays["reference"].items():
        if part not in PARTS:
            raise ValueError(f"unexpected reference part {part!r}")
        for name, array in named.items():
            references.setdefault(name, {})[part] = array
    missing = sorted(set(in_specs) - set(inputs)) + sorted(set(ref_specs) - set(references))
    extra = sorted(set(references) - set(ref_specs)) + sorted(set(references) & set(arrays["output"]))
    if missing or extra:
        raise ValueError(f"{(missing or extra)[0]!r} does not match the manifest's selftest section")
    for name, spec in ref_specs.items():
        problem = check_parts(references[name], spec)
        if problem:
            raise ValueError(f"reference {name!r} {problem}")
    return inputs, dict(arrays["output"]), references


# -- the manifest's description, checked by the writer and the reader ----------------------------------


def check_spec(meta: dict) -> Optional[str]:
    """What is wrong with the manifest's ``selftest`` section, or None."""
    if not isinstance(meta, dict):
        return "selftest is not an object"
    inputs, refs = meta.get("inputs", {}), meta.get("references", {})
    if not isinstance(inputs, dict) or not isinstance(refs, dict):
        return "selftest inputs and references must be objects"
    for name, spec in inputs.items():
        if not isinstance(spec, dict) or spec.get("stored") not in STORED or not _numeric_dtype(spec.get("dtype")):
            return f"selftest input {name!r} must give a numeric dtype and a stored dtype among {', '.join(STORED)}"
        levels = "scale" in spec or "offset" in spec
        if levels and not (spec["stored"] == "uint8" and np.dtype(spec["dtype"]).kind == "f"
                           and _positive(spec.get("scale")) and _finite(spec.get("offset"))):
            return f"selftest input {name!r}: a scale and offset go with float stored as uint8, scale > 0"
        if not levels and np.dtype(spec["dtype"]).kind == "f" and spec["stored"] != "float16":
            return f"selftest input {name!r}: float stored as {spec['stored']} needs a scale and offset"
    for name, spec in refs.items():
        problem = _check_reference(spec)
        if problem:
            return f"selftest reference {name!r}: {problem}"
    return None


def _check_reference(spec) -> Optional[str]:
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}"
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) < 2 or not all(_count(d) for d in shape):
        return "shape must list at least two positive sizes"
    proj = spec.get("projection")
    if not isinstance(proj, dict) or not _count(proj.get("dims")) or proj["dims"] > 64 or not (
            _count(proj.get("seed")) or proj.get("seed") == 0) or not _positive(proj.get("margin")):
        return "projection must give dims (1..64), seed and margin"
    if spec["kind"] == "topk+projection":
        if not _count(spec.get("topk")) or spec["topk"] > shape[-1] or len(shape) not in (2, 3):
            return "topk must be a count no larger than the last axis, for outputs [n, C] or [n, T, C]"
    elif "topk" in spec:
        return "topk given for a projection-only reference"
    return None


def expected_parts(spec: dict) -> Dict[str, tuple]:
    """Part name -> the shape its array must have."""
    shape = tuple(spec["shape"])
    parts = {"projection": (shape[0], spec["projection"]["dims"])}
    if spec["kind"] == "topk+projection":
        parts["topk_index"] = parts["topk_value"] = shape[:-1] + (spec["topk"],)
    return parts


def check_parts(parts: Dict[str, np.ndarray], spec: dict) -> Optional[str]:
    expected = expected_parts(spec)
    if set(parts) != set(expected):
        return f"has parts {sorted(parts)}, the manifest says {sorted(expected)}"
    for part, shape in expected.items():
        if tuple(parts[part].shape) != shape:
            return f"{part} has shape {list(parts[part].shape)}, not {list(shape)}"
    if "topk_index" in parts:
        index = parts["topk_index"]
        if index.dtype.kind not in "iu" or (index.size and (index.min() < 0 or index.max() >= spec["shape"][-1])):
            return "topk_index holds indices outside the last axis"
    return None


def _numeric_dtype(name) -> bool:
    try:
        return isinstance(name, str) and np.dtype(name).kind in "biuf"
    except TypeError:
        return False


def _count(v) -> bool:
    return type(v) is int and v > 0


def _positive(v) -> bool:
    return _finite(v) and v > 0


def _finite(v) -> bool:
    return type(v) in (int, float) and bool(np.isfinite(v))
