"""The OpenAPI 3.0.3 document of the agent's HTTP API, as this agent serves it (GET /v2/openapi.json).

Built from the served model, so a client or a fuzzer sees its real names: ``model_name`` and
``model_version`` are enums of the served ones, and an infer request's inputs and outputs name
the model's tensors, with the datatypes each takes (its own, or one numpy casts to it without
loss), their ranks and the ranges of integer types. Every error is ``{"error": "..."}`` with the
statuses ``server`` answers with. A plain dict, no YAML.
"""
from __future__ import annotations

import copy

import numpy as np

from edgeml.core import __version__

from .protocol import DATATYPES

ERROR = {"$ref": "#/components/schemas/Error"}
BINARY = {"type": "string", "format": "binary"}
_EMPTY = {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}  # a probe's body
_NUMPY = {kserve: name for name, kserve in DATATYPES.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"
INFER_EXAMPLES = ("one", "batch")
# status -> (component name, description); each an Error body
ERRORS = {
    400: ("BadRequest", "The request is malformed, or does not fit the model (names, datatypes, shapes, values)."),
    401: ("Unauthorized", "No bearer token, or not a valid one."),
    404: ("NotFound", "No such model or version (or feedback is off, or the id is not waiting for a label)."),
    408: ("RequestTimeout", "The request's headers and body did not arrive in time; the connection is closed."),
    411: ("LengthRequired", "No Content-Length (chunked bodies are not taken)."),
    413: ("PayloadTooLarge", "The body, or the inputs it unpacks to, exceed what the agent takes."),
    415: ("UnsupportedMediaType", "A Content-Encoding other than gzip, deflate or identity."),
    422: ("UnprocessableEntity", "Valid inputs the model could not run on (say, a token id beyond its vocabulary)."),
    503: ("ServiceUnavailable", "The agent is busy (every worker or connection in use): retry after Retry-After."),
}
GET_ERRORS = (401, 503)
MODEL_ERRORS = (401, 404, 503)
POST_ERRORS = (400, 401, 404, 408, 411, 413, 415, 503)


def document(service) -> dict:
    """The whole API for ``service`` (a ``ModelService``) as a JSON-ready dict."""
    name, version = service.name, str(service.version)
    model = [_param("model_name", "path", {"type": "string", "enum": [name]}, "The served model's name.")]
    versioned = model + [_param("model_version", "path", {"type": "string", "enum": [version]},
                                "The served model's version.")]
    paths = {
        "/v2/health/live": {"get": _probe("Liveness: 200 while the process serves HTTP.", "serverLive", [])},
        "/v2/health/ready": {"get": _probe("Readiness: 200 once the model is verified and warmed up.",
                                           "serverReady", [])},
        "/v2": {"get": _op("Server metadata.", "serverMetadata", [], _json("#/components/schemas/ServerMetadata"),
                           GET_ERRORS)},
        "/metrics": {"get": _op("Prometheus metrics (text exposition format 0.0.4).", "metrics", [],
                                {"text/plain": {"schema": {"type": "string"}}}, GET_ERRORS)},
        "/v2/openapi.json": {"get": _op("This document.", "openapi", [], _json("#/components/schemas/OpenApi"),
                                        GET_ERRORS)},
    }
    for prefix, params, suffix in (("/v2/models/{model_name}", model, ""),
                                   ("/v2/models/{model_name}/versions/{model_version}", versioned, "Version")):
        paths[prefix] = {"get": _op("Model metadata: its tensors, platform and versions.", "modelMetadata" + suffix,
                                    params, _json("#/components/schemas/ModelMetadata"), MODEL_ERRORS)}
        paths[prefix + "/ready"] = {"get": _probe("Model readiness: 200 once verified and warmed up.",
                                                  "modelReady" + suffix, params, (401, 404))}
        paths[prefix + "/infer"] = {"post": _infer(params, suffix)}
    paths["/v2/models/{model_name}/feedback"] = {"post": _feedback(model)}
    return copy.deepcopy({  # the module's shared pieces stay out of the caller's reach
        "openapi": "3.0.3",
        "info": {
            "title": "edgeml-agent", "version": __version__,
            "description": (
                "The Open Inference Protocol (KServe v2) as Triton speaks it, binary tensor data extension "
                f"included, serving '{name}' version {version}. Every error is {{\"error\": \"...\"}}; a path "
                "this document does not name answers 404, a method it does not name 405 with Allow. "
                "Request bodies may be gzip or deflate encoded (Content-Encoding), responses are when the "
                "client's Accept-Encoding takes it. HTTPS when the agent has a certificate."),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "A token of the agent's token file (--api-token-file); without one configured, "
                               "none is needed (loopback only)."}},
            "schemas": _schemas(service),
            "examples": _infer_examples(service),
            "responses": {title: _error(text, status) for status, (title, text) in ERRORS.items()},
            "headers": {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer"},
                                     "description": "The scheme to authenticate with: Bearer."},
                "Retry-After": {"schema": {"type": "integer", "minimum": 0},
                                "description": "Seconds to wait before retrying."},
            },
        },
    })


# -- operations ------------------------------------------------------------------------------------

def _op(summary: str, op_id: str, params: list, content: dict, errors, ok: str = "OK") -> dict:
    responses = {"200": {"description": ok, "content": content}}
    responses.update({str(s): {"$ref": f"#/components/responses/{ERRORS[s][0]}"} for s in errors})
    return {"summary": summary, "operationId": op_id, "parameters": params, "responses": responses}


def _probe(summary: str, op_id: str, params: list, errors=(401,)) -> dict:
    """A health probe: an empty body, 200 or 503 (not ready yet, or busy). Server health needs no
    token when the agent runs with --open-health on."""
    op = _op(summary, op_id, params, _EMPTY, errors)
    op["responses"]["503"] = {"description": "Not ready, or busy (then with Retry-After).", "content": _EMPTY,
                              "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}}
    if op_id.startswith("server"):
        op["security"] = [{}, {"bearer": []}]
    return op


def _infer(params: list, suffix: str) -> dict:
    op = _op("Run the model on a request's inputs.", "modelInfer" + suffix, params,
             {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
              "application/octet-stream": {"schema": BINARY}},
             POST_ERRORS + (422,),
             ok="The outputs; application/octet-stream when some are binary data (the JSON part first, "
                f"its length in {HEADER_LENGTH}, then their bytes).")
    op["responses"]["200"]["headers"] = {HEADER_LENGTH: {"schema": {"type": "integer", "minimum": 0},
                                                         "description": "The JSON part's length (binary outputs)."}}
    # The binary form's header is described, not declared: OpenAPI 3.0 cannot tie a header to one
    # media type, and declared, a fuzzer would send it with JSON bodies too.
    op["requestBody"] = {
        "required": True,
        "description": f"JSON; or the binary tensor data extension, application/octet-stream: the {HEADER_LENGTH} "
                       "header gives the length of the JSON request at the start of the body (an InferRequest "
                       "whose inputs carry parameters.binary_data_size instead of data), their raw little-endian "
                       "bytes follow in input order.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}, "examples": {
                        k: {"$ref": f"#/components/examples/{k}"} for k in INFER_EXAMPLES}},
                    "application/octet-stream": {"schema": BINARY}},
    }
    return op


def _feedback(params: list) -> dict:
    op = _op('Label an earlier request: {"id": <its response id>, "label": <class id or one per sample>}; '
             "404 while feedback is off on the agent.", "modelFeedback", params,
             _json("#/components/schemas/FeedbackResponse"), POST_ERRORS)
    op["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}}
    return op


def _param(name: str, where: str, schema: dict, text: str) -> dict:
    return {"name": name, "in": where, "required": where == "path", "schema": schema, "description": text}


def _json(ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": ref}}}


def _error(text: str, status: int) -> dict:
    response = {"description": text, "content": {"application/json": {"schema": ERROR}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}}
    if status == 503:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
    return response


# -- schemas ---------------------------------------------------------------------------------------

def _schemas(service) -> dict:
    name, version = service.name, str(service.version)
    tensor = _object({"name": {"type": "string"}, "datatype": {"type": "string", "enum": sorted(DATATYPES.values())},
                      "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}}})
    class_id = {"type": "integer", "minimum": 0}
    label = {"oneOf": [class_id, {"type": "array", "minItems": 1, "items": class_id}],
             "description": "The true class id, or one per sample of the request."}
    return {
        "Error": _object({"error": {"type": "string"}}),
        "ServerMetadata": _object({"name": {"type": "string"}, "version": {"type": "string"},
                                   "extensions": {"type": "array", "items": {"type": "string"}}}),
        "TensorMetadata": tensor,
        "ModelMetadata": _object({
            "name": {"type": "string", "enum": [name]},
            "versions": {"type": "array", "items": {"type": "string", "enum": [version]}},
            "platform": {"type": "string", "enum": ["tflite", "onnxruntime"]},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "parameters": _object({"sha256": {"type": "string"}, "version": {"type": "integer"}}),
        }),
        "InferRequest": _infer_request(service),
        "InferResponse": _object({
            "model_name": {"type": "string", "enum": [name]},
            "model_version": {"type": "string", "enum": [version]},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _one_of([_response_output(s) for s in service.outputs])},
        }, optional=("id",)),
        "FeedbackRequest": {
            "type": "object", "required": ["id"], "additionalProperties": False,
            "properties": {"id": {"type": "string", "description": "The id of the infer response."},
                           "label": label, "labels": label},
            "anyOf": [{"required": ["label"]}, {"required": ["labels"]}],
        },
        "FeedbackResponse": _object({"accepted": {"type": "boolean", "enum": [True]}, "id": {"type": "string"},
                                     "labels": {"type": "integer", "minimum": 1},
                                     "correct": {"type": "integer", "minimum": 0, "nullable": True}}),
        "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
    }


def _infer_request(service) -> dict:
    n = len(service.inputs)
    inputs = [_request_input(s, kserve) for s in service.inputs for kserve in _accepted(s.dtype)]
    outputs = [s.name for s in service.outputs]
    return {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "description": "Echoed in the response (and the id feedback names)."},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": n, "maxItems": n, "items": _one_of(inputs),
                       "description": "Every model input exactly once."},
            "outputs": {"type": "array", "maxItems": len(outputs), "description": "Leave out for all outputs.",
                        "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                  "properties": {"name": {"type": "string", "enum": outputs}, "parameters": {
                                      "type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}},
        },
    }


def _request_input(spec, kserve: str) -> dict:
    """One input sent as ``kserve`` in a JSON body: its data flat in row-major order (nested lists
    are taken too). Its parameters may only hold binary_data_size, in an octet-stream body."""
    return {
        "type": "object", "required": ["name", "shape", "datatype", "data"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": [spec.name]},
            "datatype": {"type": "string", "enum": [kserve]},
            "shape": _shape(spec.shape),
            "data": {"type": "array", "minItems": 1, "items": _scalar(kserve),
                     "description": "As many values as the shape takes."},
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }


def _response_output(spec) -> dict:
    kserve = _kserve(spec.dtype)
    return _object({
        "name": {"type": "string", "enum": [spec.name]},
        "datatype": {"type": "string", "enum": [kserve]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "array", "items": _scalar(kserve)},
        "parameters": _object({"binary_data_size": {"type": "integer", "minimum": 0}}),
    }, optional=("data", "parameters"))


def _shape(shape) -> dict:
    """The model's rank; a dim the model fixes has one value, but OpenAPI 3.0 cannot say per position."""
    fixed = sorted({d for d in shape if d is not None})
    dim = {"type": "integer", "minimum": 1}
    if fixed and len(fixed) == len(shape):
        dim = {"type": "integer", "enum": fixed}
    return {"type": "array", "minItems": len(shape), "maxItems": len(shape), "items": dim,
            "description": f"The model takes {[d if d is not None else -1 for d in shape]} (-1: any size)."}


def _scalar(kserve: str) -> dict:
    if kserve not in _NUMPY:  # a tensor type the protocol does not carry: the model says it, nothing more
        return {}
    dtype = np.dtype(_NUMPY[kserve])
    if dtype.kind == "b":
        return {"type": "boolean"}
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    kind = "integer" if dtype.kind in "iu" else "number"
    return {"type": kind, "minimum": _plain(info.min), "maximum": _plain(info.max)}


def _accepted(dtype: str) -> list:
    """KServe datatypes an input of numpy ``dtype`` takes: its own and those that cast to it safely."""
    if dtype not in DATATYPES:
        return [_kserve(dtype)]
    return [kserve for name, kserve in DATATYPES.items() if np.can_cast(name, dtype, "safe")]


def _kserve(dtype: str) -> str:
    return DATATYPES.get(dtype, dtype.upper())


def _infer_examples(service) -> dict:
    """Requests of the model's shapes, all zeros (free dims 1, or 2 for the batch): one sample in the
    model's datatypes with outputs as JSON; two in the smallest datatypes it takes, outputs as binary data."""
    one = {"inputs": [_example(s, _kserve(s.dtype), 1) for s in service.inputs]}
    small = {s.name: next((k for k in _accepted(s.dtype) if k != "BOOL"), _kserve(s.dtype)) for s in service.inputs}
    batch = {"inputs": [_example(s, small[s.name], 2) for s in service.inputs],
             "parameters": {"binary_data_output": True}}
    return {"one": {"summary": "One sample of zeros, outputs as JSON", "value": one},
            "batch": {"summary": "Two samples of zeros, outputs as binary data", "value": batch}}


def _example(spec, kserve: str, batch: int) -> dict:
    shape = [batch if d is None else d for d in spec.shape]
    kind = np.dtype(_NUMPY[kserve]).kind if kserve in _NUMPY else "i"
    zero = False if kind == "b" else 0.0 if kind == "f" else 0
    return {"name": spec.name, "shape": shape, "datatype": kserve, "data": [zero] * int(np.prod(shape))}


def _object(properties: dict, optional=()) -> dict:
    return {"type": "object", "required": [k for k in properties if k not in optional], "properties": properties}


def _one_of(schemas: list) -> dict:
    return schemas[0] if len(schemas) == 1 else {"oneOf": schemas}


def _plain(value):
    return int(value) if isinstance(value, (int, np.integer)) else float(value)
