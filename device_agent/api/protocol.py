"""The Open Inference Protocol (KServe v2) on the wire, as Triton speaks it: pure functions from
request bytes to arrays and from arrays to response bytes, each refusing what it cannot read with
a ``RequestError`` (a status and one line).

Triton's binary tensor data extension in both directions: a request whose
``Inference-Header-Content-Length`` header gives the JSON's length carries raw little-endian
tensor bytes after it, one run per input with ``parameters.binary_data_size``; outputs asked for
with ``parameters.binary_data`` (or all of them, with the request parameter
``binary_data_output``) come back the same way. Bodies may be gzip or deflate encoded.
"""
from __future__ import annotations

import json
import math
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..serving import RequestError

DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_TYPES = {kserve: np.dtype(name).newbyteorder("<") for name, kserve in DATATYPES.items()}
# JSON values a datatype accepts, by numpy kind of the parsed list: JSON has no int/float split
# for floats, but a 1.5 for an INT64 would be truncated silently, so it is refused.
_JSON_KINDS = {"f": "biuf", "i": "iu", "u": "iu", "b": "b"}
_UNSUPPORTED = ("shared_memory_region", "classification")

def tensor_metadata(spec) -> dict:
    return {"name": spec.name, "datatype": DATATYPES.get(spec.dtype, spec.dtype.upper()),
            "shape": [-1 if d is None else d for d in spec.shape]}


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding, refusing bodies that would unpack beyond ``limit`` (zip bombs)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)  # deflate in HTTP is the zlib format
    if wbits is None:
        raise RequestError(415, f"Content-Encoding {encoding[:30]!r} is not supported; use gzip, deflate or none")
    unpacker = zlib.decompressobj(wbits)
    try:
        data = unpacker.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(400, f"the {encoding} body cannot be unpacked: {exc}") from None
    if len(data) > limit:
        raise RequestError(413, f"the body unpacks to more than the {limit} bytes this agent takes")
    if not unpacker.eof:
        raise RequestError(400, f"the {encoding} body is truncated")
    return data


def split_body(body: bytes, header_length: Optional[str]) -> Tuple[dict, bytes]:
    """The JSON request and the binary tensor data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length[:30]!r} does not fit "
                                    f"a body of {len(body)} bytes")
        # views, not copies: the tensors are read straight out of the request's buffer
        json_part, binary = bytes(memoryview(body)[:n]), memoryview(body)[n:]
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"the request is not JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "the request's JSON is nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError(400, 'the request must be a JSON object with an "inputs" list')
    if not isinstance(request.get("parameters", {}), dict):
        raise RequestError(400, '"parameters" must be an object')
    if "id" in request and not isinstance(request["id"], str):
        raise RequestError(400, '"id" must be a string (the Open Inference Protocol\'s request id)')
    flag = request.get("parameters", {}).get("binary_data_output")
    if flag is not None and not isinstance(flag, bool):
        raise RequestError(400, 'parameters.binary_data_output must be true or false')
    return request, binary


def parse_inputs(items: list, binary: bytes) -> Dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for item in items:
        name, shape, dtype, params = _input_header(item)
        if name in arrays:
            raise RequestError(400, f"input '{name}' is given twice")
        count = math.prod(shape)
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise RequestError(400, f"input '{name}': binary_data_size {size!r} does not fit the "
                                        f"{len(binary) - offset} bytes of binary data left")
            if size != count * dtype.itemsize:
                raise RequestError(400, f"input '{name}' has {size} bytes of binary data; shape {shape} of "
                                        f"{item['datatype']} takes {count * dtype.itemsize}")
            arrays[name] = np.frombuffer(binary, dtype, count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise RequestError(400, f"input '{name}' has neither data nor parameters.binary_data_size")
            arrays[name] = _from_json(item["data"], dtype, name, shape, count)
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return arrays


def _input_header(item) -> Tuple[str, List[int], np.dtype, dict]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise RequestError(400, 'each input must be an object with "name", "shape", "datatype" and data')
    name, shape, datatype = item["name"], item.get("shape"), item.get("datatype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(400, f"input '{name}': shape must be a list of whole numbers >= 0, not {shape!r}"[:300])
    if datatype not in NUMPY_TYPES:
        raise RequestError(400, f"input '{name}': datatype {str(datatype)[:20]!r} is not supported; "
                                f"use one of {', '.join(NUMPY_TYPES)}")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"input '{name}': parameters must be an object")
    _refuse_unsupported(params, f"input '{name}'")
    return name, shape, NUMPY_TYPES[datatype], params


def _from_json(data, dtype: np.dtype, name: str, shape: List[int], count: int) -> np.ndarray:
    """Flat or nested JSON numbers -> an array of ``dtype``, refusing values it cannot hold."""
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, f"input '{name}': data must be a (nested) list of numbers") from None
    if raw.size != count:
        raise RequestError(400, f"input '{name}' has {raw.size} values; shape {shape} takes {count}")
    if raw.size and raw.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise RequestError(400, f"input '{name}': data must be {_kind_text(dtype)}")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise RequestError(400, f"input '{name}': a value is outside the range of {dtype.name}")
    with np.errstate(over="ignore"):  # floats beyond float32 become inf, which infer then refuses
        return raw.astype(dtype).reshape(shape)


def _kind_text(dtype: np.dtype) -> str:
    return {"b": "true or false", "f": "numbers", "i": "whole numbers", "u": "whole numbers"}[dtype.kind]


def requested_outputs(request: dict) -> Optional[Dict[str, Optional[bool]]]:
    """{name: binary_data or None (not said)} in request order, or None for all outputs."""
    items = request.get("outputs")
    if items is None:
        return None
    if not isinstance(items, list):
        raise RequestError(400, '"outputs" must be a list')
    wanted = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(400, 'each requested output must be an object with a "name"')
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, f"output '{item['name']}': parameters must be an object")
        _refuse_unsupported(params, f"output '{item['name']}'")
        if item["name"] in wanted:
            raise RequestError(400, f"output '{item['name']}' is requested twice")
        if params.get("binary_data") is not None and not isinstance(params["binary_data"], bool):
            raise RequestError(400, f"output '{item['name']}': parameters.binary_data must be true or false")
        wanted[item["name"]] = params.get("binary_data")
    return wanted


def _refuse_unsupported(params: dict, what: str) -> None:
    for key in _UNSUPPORTED:
        if key in params:
            raise RequestError(400, f"{what}: {key} is not supported by this agent")


def encode_outputs(reply: dict, outputs: Dict[str, np.ndarray], wanted: Dict[str, Optional[bool]],
                    default_binary: bool) -> Tuple[bytes, Optional[int]]:
    """The response body, and the JSON header's length when binary data follows it."""
    entries, blobs = [], []
    for name, value in outputs.items():
        array = np.ascontiguousarray(value)
        entry = {"name": name, "datatype": DATATYPES[array.dtype.name], "shape": list(array.shape)}
        binary = wanted.get(name)
        if binary if binary is not None else default_binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise RequestError(500, f"output '{name}' holds NaN or infinity, which JSON cannot carry; "
                                        "request it as binary data")
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    header = json.dumps({**reply, "outputs": entries}).encode("utf-8")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def accepted_encoding(accept: str) -> Optional[str]:
    """gzip or deflate if the client takes it (tritonclient's response_compression_algorithm)."""
    for token in accept.split(","):
        coding, _, params = token.strip().partition(";")
        if coding.strip().lower() in ("gzip", "deflate") and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return coding.strip().lower()
    return None


def compress(body: bytes, encoding: str) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    return packer.compress(body) + packer.flush()
