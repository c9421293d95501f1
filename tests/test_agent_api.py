"""The agent's model serving and its KServe v2 API, driven by the standard client (tritonclient).

Real models (the int8 digits CNN as .tflite, silero VAD as .onnx), real HTTP on free ports.
"""
from __future__ import annotations

import gzip
import http.client
import io
import json
import re
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pretrained
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from device_agent.api import ApiServer
from device_agent.serving import LocalClient, ModelService, RequestError
from edgeml.core import transfer
from edgeml.core.artifact import read_artifact, write_artifact
from edgeml.core.errors import VerificationError
from edgeml.core.runtime import load_runner

MAX_BODY = 1 << 20  # small, so an oversized request is cheap to send


class RecordingSink:
    def __init__(self):
        self.inferences, self.errors = [], []

    def inference(self, model, version, latency_ms, inputs, outputs, run_ms=None):
        assert run_ms is not None and 0 < run_ms <= latency_ms  # the model's share of the request
        self.inferences.append((model, version, latency_ms, inputs, outputs))

    def error(self, model, status, message, latency_ms):
        self.errors.append((model, status, message, latency_ms))


@pytest.fixture(scope="module")
def keys(digits_dir):
    return digits_dir / "keys"


@pytest.fixture(scope="module")
def digits_artifact(digits_int8_artifact):
    return digits_int8_artifact


@pytest.fixture(scope="module")
def digits(digits_artifact, keys):
    return ModelService.load(digits_artifact, keys / "signing.pub")


@pytest.fixture(scope="module")
def sink():
    return RecordingSink()


@pytest.fixture(scope="module")
def api(digits, sink):
    server = ApiServer(digits, sink, port=0, max_body_bytes=MAX_BODY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(api):
    with triton.InferenceServerClient(f"127.0.0.1:{api.port}") as c:
        yield c


def _image_input(x, binary=True, datatype="FP32"):
    tensor = triton.InferInput("image", list(x.shape), datatype)
    return tensor.set_data_from_numpy(x, binary_data=binary)


def test_digits_through_tritonclient(api, client, digits, sink):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits", "1")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    meta = client.get_model_metadata("digits", "1")
    assert meta["versions"] == ["1"] and meta["platform"] == "tflite"
    assert meta["parameters"] == {"sha256": digits.sha256, "version": 1}
    # int8 inside, float at the edge: the runtime applies scale and zero point
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}]

    x, ref = digits.artifact.selftest_inputs["image"], digits.artifact.selftest_outputs["output_0"]
    atol = digits.manifest["selftest"]["atol"]
    direct = digits.infer({"image": x})["output_0"]
    served_before = len(sink.inferences)
    for binary in (True, False):
        out = triton.InferRequestedOutput("output_0", binary_data=binary)
        result = client.infer("digits", [_image_input(x, binary)], outputs=[out], request_id=f"r{binary}")
        y = result.as_numpy("output_0")
        assert y.dtype == np.float32 and y.shape == (8, 10) and result.get_response()["id"] == f"r{binary}"
        assert "parameters" in result.get_output("output_0") if binary else "data" in result.get_output("output_0")
        np.testing.assert_array_equal(y, direct)  # JSON numbers carry float32 exactly, too
        np.testing.assert_allclose(y, ref, atol=atol, rtol=0)
    # compressed both ways, no outputs named (tritonclient then asks for all as binary data)
    result = client.infer("digits", [_image_input(x)], model_version="1",
                          request_compression_algorithm="gzip", response_compression_algorithm="deflate")
    np.testing.assert_array_equal(result.as_numpy("output_0"), direct)
    assert len(sink.inferences) == served_before + 3
    model, version, latency_ms, inputs, outputs = sink.inferences[-1]
    assert (model, version) == ("digits", 1) and latency_ms > 0 and inputs["image"].shape == (8, 8, 8, 1)


def test_concurrent_requests_each_get_their_own_answer(api, digits):
    x = digits.artifact.selftest_inputs["image"]
    expected = digits.infer({"image": x})["output_0"]
    failures = []

    def worker(i):
        with triton.InferenceServerClient(f"127.0.0.1:{api.port}") as c:
            for _ in range(5):
                got = c.infer("digits", [_image_input(x[i:i + 1])]).as_numpy("output_0")
                if not np.array_equal(got, expected[i:i + 1]):
                    failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


# -- refused requests -----------------------------------------------------------------------------


def _request(inputs, outputs=None):
    body = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    return json.dumps(body).encode()


def _image(shape=(1, 8, 8, 1), datatype="FP32", data=None):
    return {"name": "image", "shape": list(shape), "datatype": datatype,
            "data": data if data is not None else [0.5] * int(np.prod(shape))}


def _binary_body(size_claimed, payload):
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": size_claimed}}]}).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


INFER = "/v2/models/digits/infer"
BAD_REQUESTS = [  # (id, method, path, body, headers, status, model label in metrics)
    ("unknown model", "POST", "/v2/models/nope/infer", _request([_image()]), {}, 404, ""),
    ("unknown version", "GET", "/v2/models/digits/versions/7", b"", {}, 404, "digits"),
    ("unknown path", "GET", "/v2/nothing", b"", {}, 404, ""),
    ("wrong method", "GET", INFER, b"", {}, 405, ""),
    ("wrong method on health", "POST", "/v2/health/live", b"{}", {}, 405, ""),
    ("unknown input", "POST", INFER, _request([_image(), {**_image(), "name": "extra"}]), {}, 400, "digits"),
    ("missing input", "POST", INFER, _request([]), {}, 400, "digits"),
    ("unknown output", "POST", INFER, _request([_image()], [{"name": "logits"}]), {}, 400, "digits"),
    ("wrong shape", "POST", INFER, _request([_image((1, 8, 8))]), {}, 400, "digits"),
    ("wrong dtype", "POST", INFER, _request([_image(datatype="FP64")]), {}, 400, "digits"),
    ("float for INT", "POST", INFER, _request([_image(datatype="INT8", data=[0.5] * 64)]), {}, 400, "digits"),
    ("data count", "POST", INFER, _request([_image(data=[0.5] * 63)]), {}, 400, "digits"),
    ("NaN", "POST", INFER, _request([_image(data=[float("nan")] * 64)]), {}, 400, "digits"),
    ("Infinity", "POST", INFER, _request([_image(data=[1e39] * 64)]), {}, 400, "digits"),
    ("not JSON", "POST", INFER, b"image=1", {}, 400, "digits"),
    ("classification", "POST", INFER, _request([_image()], [{"name": "output_0", "parameters": {"classification": 3}}]),
     {}, 400, "digits"),
    ("binary size", "POST", INFER, *_binary_body(255, bytes(255)), 400, "digits"),
    ("binary left over", "POST", INFER, *_binary_body(256, bytes(260)), 400, "digits"),
    ("header length", "POST", INFER, b"{}", {"Inference-Header-Content-Length": "99"}, 400, "digits"),
    ("too large", "POST", INFER, bytes(8 * MAX_BODY), {}, 413, "digits"),  # larger than socket buffers
    ("gzip bomb", "POST", INFER, gzip.compress(bytes(4 * MAX_BODY)), {"Content-Encoding": "gzip"}, 413, "digits"),
    ("brotli", "POST", INFER, b"x", {"Content-Encoding": "br"}, 415, "digits"),
]


def _send(conn, method, path, body=b"", headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response, response.read()


@pytest.mark.parametrize("method, path, body, headers, status, label",
                         [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_refused_counted_and_reported(api, client, sink, digits, method, path, body, headers,
                                                     status, label):
    before, errors = api.requests.get(model=label, status=status), len(sink.errors)
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    response, raw = _send(conn, method, path, body, headers)
    conn.close()
    assert response.status == status, raw
    assert set(json.loads(raw)) == {"error"}
    if status == 405:
        assert response.getheader("Allow") in ("GET", "POST")
    assert api.requests.get(model=label, status=status) == before + 1
    assert len(sink.errors) == errors + 1 and sink.errors[-1][1] == status
    x = digits.artifact.selftest_inputs["image"][:2]  # and the server still serves
    assert client.infer("digits", [_image_input(x)]).as_numpy("output_0").shape == (2, 10)


def test_tritonclient_sees_the_errors(client, digits):
    x = digits.artifact.selftest_inputs["image"]
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    cases = [(lambda: client.infer("nope", [_image_input(x)]), "404", "unknown model"),
             (lambda: client.infer("digits", [_image_input(bad)]), "400", "NaN"),
             (lambda: client.infer("digits", [_image_input(x.astype(np.float64), datatype="FP64")]), "400", "float64"),
             (lambda: client.infer("digits", [_image_input(np.zeros((40000, 8, 8, 1), np.float32))]), "413", "bytes")]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status and words in info.value.message()
    assert not client.is_model_ready("nope")


def test_a_kept_alive_connection_survives_refusals(api, digits):
    x = digits.artifact.selftest_inputs["image"][:1]
    good = _request([_image(data=x.ravel().tolist())])
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    statuses = [_send(conn, "POST", INFER, b"nope")[0].status]
    sock = conn.sock
    for method, path, body in (("POST", INFER, good), ("GET", "/v2/models/x", b""), ("POST", INFER, good)):
        response, raw = _send(conn, method, path, body)
        statuses.append(response.status)
    assert statuses == [400, 200, 404, 200] and conn.sock is sock  # one connection throughout
    np.testing.assert_array_equal(np.asarray(json.loads(raw)["outputs"][0]["data"], np.float32),
                                  digits.infer({"image": x})["output_0"].ravel())
    conn.close()


# -- metrics --------------------------------------------------------------------------------------

SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*"(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*\})?'
    r" (-?[0-9.]+(e[+-]?[0-9]+)?|[+-]Inf|NaN)$")


def _scrape(api):
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    response, raw = _send(conn, "GET", "/metrics")
    conn.close()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    return raw.decode()


def _value(text, sample):
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_parse_and_count(api, client, digits):
    api.metrics.gauge("edgeml_telemetry_queue_records", "Telemetry records waiting").set(12)
    api.metrics.gauge("edgeml_telemetry_dropped_total", "Telemetry records dropped").set(0)
    first = _scrape(api)
    client.infer("digits", [_image_input(digits.artifact.selftest_inputs["image"][:1])])
    text = _scrape(api)
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
        else:
            assert SAMPLE_RE.match(line), line
    ok = 'edgeml_requests_total{model="digits",status="200"}'
    assert _value(text, ok) == _value(first, ok) + 1
    count = 'edgeml_request_latency_seconds_count{model="digits"}'
    assert _value(text, count) == _value(first, count) + 1
    assert _value(text, 'edgeml_request_latency_seconds_bucket{model="digits",le="+Inf"}') == _value(text, count)
    assert _value(text, 'edgeml_model_ready{model="digits",version="1"}') == 1
    assert _value(text, "edgeml_telemetry_queue_records") == 12 and _value(text, "process_resident_memory_bytes") > 1e6
    try:  # the reference parser, where it happens to be installed (not a dependency)
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    assert {f.name for f in text_string_to_metric_families(text)} >= {"edgeml_requests", "edgeml_model_ready"}


# -- an ONNX model with several inputs: silero VAD ------------------------------------------------


@pytest.fixture(scope="module")
def silero_artifact(keys, tmp_path_factory):
    """Whole samples (the recurrent state has no batch axis first), reference outputs from ORT."""
    model = pretrained.model_path(*pretrained.SILERO).read_bytes()
    runner = load_runner(model, "onnx")
    feeds = [pretrained.silero_feed(chunk) for chunk in pretrained.silero_chunks(3)]
    outs = [runner.run(feed) for feed in feeds]
    inputs = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}
    outputs = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
    path = tmp_path_factory.mktemp("silero") / "silero.edgeml"
    write_artifact(path, model=model, model_format="onnx", private_key=keys / "signing.key", baseline={},
                   manifest={"name": "silero_vad", "version": 3,
                             "selftest": {"atol": 1e-4, "samples": 3, "whole_samples": True}},
                   selftest_inputs=inputs, selftest_outputs=outputs)
    return path


def test_silero_through_tritonclient(silero_artifact, keys):
    service = ModelService.load(silero_artifact, keys / "signing.pub")
    api = ApiServer(service, port=0).start()
    feed = pretrained.silero_feed(pretrained.silero_chunks(1)[0])
    expected = service.infer(feed)
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{api.port}") as c:
            meta = c.get_model_metadata("silero_vad")
            assert meta["platform"] == "onnxruntime" and meta["versions"] == ["3"]
            assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
                "input": ("FP32", [-1, -1]), "state": ("FP32", [2, -1, 128]), "sr": ("INT64", [])}
            for binary in (True, False):
                tensors = [triton.InferInput(name, list(v.shape), {"float32": "FP32", "int64": "INT64"}[v.dtype.name])
                           .set_data_from_numpy(v, binary_data=binary) for name, v in feed.items()]
                result = c.infer("silero_vad", tensors, outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                                                 for n in ("output", "stateN")])
                for name, value in expected.items():
                    np.testing.assert_array_equal(result.as_numpy(name), value)
            # int32 for the int64 sample rate is lossless, so it is taken; a state without its layer axis is not
            sr32 = triton.InferInput("sr", [], "INT32").set_data_from_numpy(np.array(16000, np.int32))
            inp = triton.InferInput("input", [1, 512], "FP32").set_data_from_numpy(feed["input"])
            state = triton.InferInput("state", [2, 1, 128], "FP32").set_data_from_numpy(feed["state"])
            got = c.infer("silero_vad", [inp, state, sr32]).as_numpy("output")
            np.testing.assert_array_equal(got, expected["output"])
            flat = triton.InferInput("state", [1, 128], "FP32").set_data_from_numpy(feed["state"][0])
            with pytest.raises(InferenceServerException, match=r"state.*\[2,\?,128\]"):
                c.infer("silero_vad", [inp, flat, sr32])
    finally:
        api.stop()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", api.port, timeout=2).connect()


# -- inputs that pass validation but not the model: a text encoder's ids and mask ----------------


@pytest.fixture(scope="module")
def encoder_artifact(keys, tmp_path_factory):
    from models import text_encoder_artifact

    return text_encoder_artifact(tmp_path_factory.mktemp("encoder") / "encoder.edgeml", keys / "signing.key")


def test_inputs_the_model_cannot_run_on_are_422_without_runtime_internals(encoder_artifact, keys):
    service = ModelService.load(encoder_artifact, keys / "signing.pub")
    sink = RecordingSink()
    api = ApiServer(service, port=0, sink=sink).start()
    ids = np.array([[1, 2, 3, 4]], np.int64)
    try:
        with triton.InferenceServerClient(f"127.0.0.1:{api.port}") as c:
            def call(ids, mask):
                tensors = [triton.InferInput("input_ids", list(ids.shape), "INT64").set_data_from_numpy(ids),
                           triton.InferInput("attention_mask", list(mask.shape), "FP32").set_data_from_numpy(mask)]
                return c.infer("encoder", tensors).as_numpy("embedding")

            assert call(ids, np.ones((1, 4), np.float32)).shape == (1, 4)
            cases = [(np.array([[1, 2, 3, 77]], np.int64), np.ones((1, 4), np.float32), "'input_ids' is out of the range"),
                     (ids, np.ones((1, 5), np.float32), "shapes do not fit together")]
            for bad_ids, mask, words in cases:
                with pytest.raises(InferenceServerException) as caught:
                    call(bad_ids, mask)
                text = str(caught.value)
                assert caught.value.status() == "422" and words in text, text
                assert not re.search(r"onnxruntime|\.cc|\.py|Gather|Status Message|/", text), text
    finally:
        api.stop()
    assert [e[1] for e in sink.errors] == [422, 422]


# -- the in-process API, and refusing to load -----------------------------------------------------


def test_local_client_validates_and_reports(digits, monkeypatch):
    sink = RecordingSink()
    local = LocalClient(digits, sink)
    x = digits.artifact.selftest_inputs["image"][:2]
    pixels = np.round(x * 255).astype(np.uint8)  # uint8 -> float32 is lossless, so it is taken
    np.testing.assert_array_equal(local.infer({"image": pixels}, ["output_0"])["output_0"],
                                  digits.infer({"image": pixels.astype(np.float32)})["output_0"])
    with pytest.raises(RequestError, match="float64") as info:
        local.infer({"image": x.astype(np.float64)})
    assert info.value.status == 400
    monkeypatch.setattr(digits, "max_input_bytes", x.nbytes - 1)
    with pytest.raises(RequestError, match="send smaller batches") as info:
        local.infer({"image": x})
    assert info.value.status == 413
    assert [e[1] for e in sink.errors] == [400, 413] and len(sink.inferences) == 1


def _tampered(artifact, out):
    raw = bytearray(transfer.decompress(artifact.read_bytes(), 1 << 30))
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = z.getinfo("model.tflite")
    raw[info.header_offset + 200] ^= 0xFF
    out.write_bytes(transfer.compress(bytes(raw)))
    return out


def _resigned_with_wrong_reference(artifact, out, key):
    art = read_artifact(artifact)
    manifest = {k: v for k, v in art.manifest.items() if k not in ("members", "schema_version", "format", "model_member")}
    write_artifact(out, model=art.model, model_format=art.model_format, manifest=manifest, baseline=art.baseline,
                   selftest_inputs=art.selftest_inputs, private_key=key,
                   selftest_outputs={k: np.roll(v, 1, axis=-1) for k, v in art.selftest_outputs.items()})
    return out


def test_load_refuses_what_does_not_verify(digits_artifact, keys, tmp_path):
    from edgeml.core.signing import generate_keys

    generate_keys(tmp_path / "other")
    with pytest.raises(VerificationError, match="signed by key"):
        ModelService.load(digits_artifact, tmp_path / "other" / "signing.pub")
    with pytest.raises(VerificationError, match="model.tflite"):
        ModelService.load(_tampered(digits_artifact, tmp_path / "t.edgeml"), keys / "signing.pub")
    wrong = _resigned_with_wrong_reference(digits_artifact, tmp_path / "w.edgeml", keys / "signing.key")
    with pytest.raises(VerificationError, match="self-test failed"):
        ModelService.load(wrong, keys / "signing.pub")


def test_serving_imports_no_tensorflow(digits_artifact, keys):
    code = ("import sys, numpy as np; from device_agent.serving import ModelService; import device_agent.api; "
            "s = ModelService.load(sys.argv[1], sys.argv[2]); "
            "s.infer({'image': np.zeros((1, 8, 8, 1), np.float32)}); "
            "print([m for m in ('tensorflow', 'keras', 'tf2onnx', 'onnx') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code, str(digits_artifact), str(keys / "signing.pub")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
