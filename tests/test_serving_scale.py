"""Serving that holds up: model instances, dynamic batching and the response cache.

Real models (the int8 digits CNN as .tflite, a tiny ONNX text encoder that fails on token ids
beyond its vocabulary), in process and through the real agent process over HTTP.
"""
from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np
import pytest
from agent_proc import AgentProcess

from device_agent.cache import ResponseCache, request_key
from device_agent.serving import ModelService, RequestError
from device_agent.telemetry import Recorder, TelemetryQueue
from edgeml.core.artifact import write_artifact

WORKERS = ["--workers", "64"]  # the API's own bound on requests at once stays out of the way


@pytest.fixture(scope="module")
def pub(digits_dir):
    return digits_dir / "keys" / "signing.pub"


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"].astype(np.float32)


@pytest.fixture(scope="module")
def plain(digits_int8_artifact, pub):
    """Today's service: one interpreter, no batching, no cache: the reference answers."""
    return ModelService.load(digits_int8_artifact, pub)


@pytest.fixture(scope="module")
def out_name(plain):
    return plain.outputs[0].name


def concurrently(n: int, work, *, barrier: bool = True):
    """Run ``work(i)`` on n threads started together; their results (or exceptions) by i."""
    start = threading.Barrier(n) if barrier else None
    results = [None] * n

    def run(i):
        if start is not None:
            start.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def scrape(agent) -> dict:
    """/metrics as {'name{labels}': value}."""
    status, text = agent.get("/metrics")
    assert status == 200
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def http_output(body: dict, name: str) -> np.ndarray:
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.array(out["data"], np.float32).reshape(out["shape"])


# -- model instances ---------------------------------------------------------------------------------


def test_two_instances_serve_concurrent_clients_alike(digits_int8_artifact, pub, plain, images, out_name):
    two = ModelService.load(digits_int8_artifact, pub, instances=2)
    stats = two.serving_stats()
    assert stats["instances"] == 2 and len(stats["instance_memory_bytes"]) == 2
    assert all(b >= 0 for b in stats["instance_memory_bytes"])
    assert two.ready and two.selftest.ok
    assert [i.runs for i in two.pool.instances] == [0, 0]  # warm-up runs are not requests

    def work(i):
        got = []
        for k in range(40):
            x = images[(i * 40 + k) % len(images)][None]
            got.append((x, two.infer({"image": x})[out_name], two.last_run_ms()))
        return got

    results = concurrently(16, work)
    for got in results:
        assert not isinstance(got, Exception), got
        for x, y, run_ms in got:
            np.testing.assert_allclose(y, plain.infer({"image": x})[out_name], atol=1e-6)
            assert run_ms is not None and run_ms > 0
    runs = two.serving_stats()["instance_runs"]
    assert sum(runs) == 16 * 40 and min(runs) > 0, runs  # both interpreters took requests


def test_instances_in_the_agent_process_report_memory_and_runs(digits_int8_artifact, pub, images, tmp_path):
    agent = AgentProcess(digits_int8_artifact, pub, tmp_path / "data", extra=["--instances", "2", *WORKERS]).start()
    try:
        results = concurrently(8, lambda i: [agent.infer("digits", {"image": images[(i * 25 + k) % len(images)][None]})[0]
                                             for k in range(25)])
        assert all(s == 200 for r in results for s in r), results
        m = scrape(agent)
        assert m["edgeml_model_instances"] == 2
        assert m['edgeml_model_instance_memory_bytes{instance="0"}'] > 0  # the runtime's libraries, at least
        assert m['edgeml_model_instance_memory_bytes{instance="1"}'] >= 0
        runs = [m[f'edgeml_model_instance_runs_total{{instance="{i}"}}'] for i in (0, 1)]
        assert sum(runs) == 200 and min(runs) > 0, runs
        assert m["edgeml_cache_hits_total"] == 0 and m["edgeml_cache_misses_total"] == 0  # off by default
        assert m["edgeml_batches_total"] == 0  # so is batching
        agent.infer("digits", {"image": images[:1]})
        agent.infer("digits", {"image": images[:1]})
        m = scrape(agent)
        assert m["edgeml_cache_hits_total"] == 0 and m["edgeml_cache_misses_total"] == 0
        assert m["edgeml_cache_bytes"] == 0
    finally:
        agent.terminate()


# -- dynamic batching ---------------------------------------------------------------------------------


def test_batching_in_the_agent_process_gives_every_client_its_own_rows(digits_int8_artifact, pub, plain, images,
                                                                      out_name, tmp_path):
    agent = AgentProcess(digits_int8_artifact, pub, tmp_path / "data",
                         extra=["--max-batch", "8", "--max-delay-ms", "20", "--instances", "2", *WORKERS]).start()
    try:
        for round_ in range(3):
            picks = [(round_ * 16 + i) % len(images) for i in range(16)]
            results = concurrently(16, lambda i: agent.infer("digits", {"image": images[picks[i]][None]}))
            for i, (status, body) in enumerate(results):
                assert status == 200, body
                want = plain.infer({"image": images[picks[i]][None]})[out_name]
                np.testing.assert_allclose(http_output(body, out_name), want, atol=1e-5)
        m = scrape(agent)
        assert m["edgeml_batch_requests_total"] == 48 and m["edgeml_batch_rows_total"] == 48
        assert m["edgeml_batches_total"] < m["edgeml_batch_requests_total"], m  # requests were merged
        assert sum(v for k, v in m.items() if k.startswith("edgeml_model_instance_runs_total")) == m["edgeml_batches_total"]
    finally:
        agent.terminate()


def test_mixed_batch_sizes_split_back_exactly(digits_int8_artifact, pub, plain, images, out_name):
    batched = ModelService.load(digits_int8_artifact, pub, max_batch=8, max_delay_ms=200)
    sizes = [1, 3, 1, 3]  # 8 rows: one full batch
    offsets = np.cumsum([0] + sizes)
    feeds = [images[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]

    def work(i):
        y = batched.infer({"image": feeds[i]})[out_name]
        return y, batched.last_run_ms()

    results = concurrently(len(sizes), work)
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), result
        y, run_ms = result
        assert y.shape == (sizes[i], 10)
        np.testing.assert_allclose(y, plain.infer({"image": feeds[i]})[out_name], atol=1e-5)
    stats = batched.serving_stats()
    assert stats["batch_requests"] == 4 and stats["batch_rows"] == 8 and stats["batches"] < 4, stats
    if stats["batches"] == 1:  # one batch: every caller reports its run time
        assert len({r[1] for r in results}) == 1
    # a request as big as a batch, and one with a different shape past the batch axis, run by themselves
    y = batched.infer({"image": images[:8]})[out_name]
    np.testing.assert_allclose(y, plain.infer({"image": images[:8]})[out_name], atol=1e-5)
    assert batched.serving_stats()["batch_requests"] == 4


@pytest.fixture(scope="module")
def encoder_artifact(digits_dir, tmp_path_factory):
    from models import text_encoder_artifact

    return text_encoder_artifact(tmp_path_factory.mktemp("encoder") / "encoder.edgeml",
                                 digits_dir / "keys" / "signing.key")


def test_a_request_the_model_cannot_run_fails_alone_not_its_batch(encoder_artifact, pub):
    reference = ModelService.load(encoder_artifact, pub)
    batched = ModelService.load(encoder_artifact, pub, max_batch=8, max_delay_ms=300)
    assert batched.batcher is not None
    rng = np.random.default_rng(2)
    feeds = [{"input_ids": rng.integers(0, 50, (rows, 5)), "attention_mask": np.ones((rows, 5), np.float32)}
             for rows in (1, 2, 1, 2)]
    feeds[2]["input_ids"][0, 3] = 77  # beyond the vocabulary of 50

    results = concurrently(len(feeds), lambda i: batched.infer(feeds[i]))
    for i, result in enumerate(results):
        if i == 2:
            assert isinstance(result, RequestError) and result.status == 422, result
            assert "out of the range" in result.message
        else:
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result["embedding"], reference.infer(feeds[i])["embedding"], atol=1e-6)
    stats = batched.serving_stats()
    assert stats["batch_requests"] == 4 and stats["batches"] == 1, stats  # all four were merged,
    assert sum(stats["instance_runs"]) == 1 + 4  # the merged run failed, then each ran alone

    # requests whose shapes past the batch axis differ (sequence length 5 and 7) are not merged
    before = batched.serving_stats()
    short = {"input_ids": rng.integers(0, 50, (1, 5)), "attention_mask": np.ones((1, 5), np.float32)}
    long = {"input_ids": rng.integers(0, 50, (1, 7)), "attention_mask": np.ones((1, 7), np.float32)}
    results = concurrently(2, lambda i: batched.infer([short, long][i]))
    for feed, result in zip([short, long], results):
        np.testing.assert_allclose(result["embedding"], reference.infer(feed)["embedding"], atol=1e-6)
    after = batched.serving_stats()
    assert after["batches"] - before["batches"] == 2 and after["batch_requests"] - before["batch_requests"] == 2


def test_batching_does_not_apply_without_a_free_batch_axis(digits_dir, pub, tmp_path, caplog):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((2, 3), np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)  # one whole sample
    path = tmp_path / "fixed.edgeml"
    write_artifact(path, model=model, model_format="onnx", private_key=digits_dir / "keys" / "signing.key",
                   baseline={}, manifest={"name": "fixed", "version": 1, "selftest": {"atol": 1e-6, "whole_samples": True}},
                   selftest_inputs={"x": x}, selftest_outputs={"y": x + 1})
    with caplog.at_level(logging.INFO, logger="edgeml-agent.serving"):
        service = ModelService.load(path, pub, max_batch=8, max_delay_ms=5)
    assert service.batcher is None
    notes = [r for r in caplog.records if "dynamic batching does not apply" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    results = concurrently(4, lambda i: service.infer({"x": x[0] + i})["y"])
    for i, y in enumerate(results):
        np.testing.assert_allclose(y, x[0] + i + 1)


# -- the response cache -------------------------------------------------------------------------------


def test_cache_in_the_agent_process_hits_misses_and_stays_bounded(digits_int8_artifact, pub, plain, images, out_name,
                                                                   tmp_path):
    bound = 1_000_000
    agent = AgentProcess(digits_int8_artifact, pub, tmp_path / "data", extra=["--cache-bytes", str(bound)]).start()
    try:
        s1, first = agent.infer("digits", {"image": images[:1]})
        s2, again = agent.infer("digits", {"image": images[:1]})
        assert s1 == s2 == 200 and first["outputs"] == again["outputs"]
        np.testing.assert_allclose(http_output(again, out_name), plain.infer({"image": images[:1]})[out_name],
                                   atol=1e-5)
        m = scrape(agent)
        assert (m["edgeml_cache_hits_total"], m["edgeml_cache_misses_total"]) == (1, 1)
        assert agent.infer("digits", {"image": images[1:2]})[0] == 200  # a different input
        m = scrape(agent)
        assert (m["edgeml_cache_hits_total"], m["edgeml_cache_misses_total"]) == (1, 2)
        assert m["edgeml_cache_entries"] == 2 and 0 < m["edgeml_cache_bytes"] <= bound

        # fill it past its bound: 1000-row answers of 40 kB each, 30 of them
        rng = np.random.default_rng(0)
        big = [rng.uniform(0, 16, (1000, 8, 8, 1)).astype(np.float32) for _ in range(30)]
        for x in big:
            assert agent.infer("digits", {"image": x})[0] == 200
        m = scrape(agent)
        assert m["edgeml_cache_bytes"] <= bound and m["edgeml_cache_evictions_total"] > 0
        assert m["edgeml_cache_misses_total"] == 32
        assert agent.infer("digits", {"image": big[-1]})[0] == 200  # the newest is kept
        assert scrape(agent)["edgeml_cache_hits_total"] == 2
        assert agent.infer("digits", {"image": images[:1]})[0] == 200  # the oldest was evicted
        m = scrape(agent)
        assert (m["edgeml_cache_hits_total"], m["edgeml_cache_misses_total"]) == (2, 33)
    finally:
        agent.terminate()


def test_a_caller_cannot_change_a_cached_answer(digits_int8_artifact, pub, plain, images, out_name):
    cached = ModelService.load(digits_int8_artifact, pub, cache_bytes=1 << 20)
    x = images[:2]
    want = plain.infer({"image": x})[out_name]
    first = cached.infer({"image": x})
    run_ms = cached.last_run_ms()
    first[out_name][:] = 999.0  # the answer of the miss: the cache kept its own copy
    second = cached.infer({"image": x})
    np.testing.assert_allclose(second[out_name], want, atol=1e-5)
    assert cached.last_run_ms() == run_ms  # a hit reports the run that computed the answer
    second[out_name][:] = -1.0  # an answer from the cache is the caller's own copy
    third = cached.infer({"image": x})
    np.testing.assert_allclose(third[out_name], want, atol=1e-5)
    # the key is taken after validation: uint8 pixels are the same request as the same float32 ones
    pixels = np.round(images[:1]).astype(np.uint8)
    cached.infer({"image": pixels.astype(np.float32)})
    hits = cached.cache.hits
    cached.infer({"image": pixels})
    assert cached.cache.hits == hits + 1
    assert cached.cache.stats()["cache_misses"] == 2  # x, then the pixels


def test_cache_bound_and_key():
    feed = {"x": np.arange(4, dtype=np.float32)}
    key = request_key("a" * 64, ["y"], feed)
    assert key != request_key("b" * 64, ["y"], feed)  # another model's artifact
    assert key != request_key("a" * 64, ["z"], feed)  # other outputs
    assert key != request_key("a" * 64, ["y"], {"x": feed["x"].reshape(2, 2)})  # same bytes, other shape
    assert key != request_key("a" * 64, ["y"], {"x": feed["x"].astype(np.float64)})
    assert key == request_key("a" * 64, ["y"], {"x": np.arange(4, dtype=np.float32)})

    cache = ResponseCache(3 * (32 + 40))  # three answers of 10 float32 values
    for i in range(5):
        assert cache.put(bytes([i]) * 32, {"y": np.full(10, i, np.float32)})
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 3 and bytes([0]) * 32 not in cache and bytes([1]) * 32 not in cache
    assert cache.get(bytes([2]) * 32) is not None  # used: now the newest
    cache.put(bytes([5]) * 32, {"y": np.zeros(10, np.float32)})
    assert bytes([2]) * 32 in cache and bytes([3]) * 32 not in cache  # the least recently used went
    assert not cache.put(b"big" * 11, {"y": np.zeros(1000, np.float32)})  # bigger than the whole cache
    assert cache.bytes <= cache.max_bytes and cache.evictions == 3


def test_system_records_carry_the_cache_counts(digits_int8_artifact, pub, images, tmp_path):
    cached = ModelService.load(digits_int8_artifact, pub, cache_bytes=1 << 20)
    for x in (images[:1], images[:1], images[1:2]):
        cached.infer({"image": x})
    queue = TelemetryQueue(tmp_path / "telemetry.db")
    recorder = Recorder(queue, "digits", 1, system_interval_s=0.05, stats=cached.telemetry_stats)
    plain_recorder = Recorder(queue, "digits", 1, system_interval_s=0.05)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            systems = [r for r in queue.peek(1000, 1 << 20) if r["kind"] == "system"]
            if any("cache_hits" in r for r in systems) and any("cache_hits" not in r for r in systems):
                break
            time.sleep(0.05)
    finally:
        recorder.close()
        plain_recorder.close()
    with_cache = [r for r in systems if "cache_hits" in r]
    assert with_cache and (with_cache[-1]["cache_hits"], with_cache[-1]["cache_misses"]) == (1, 2)
    assert any("cache_hits" not in r for r in systems)  # no provider, no cache fields
    queue.close()


def test_metrics_text_is_valid_for_the_new_families(digits_int8_artifact, pub, images, tmp_path):
    agent = AgentProcess(digits_int8_artifact, pub, tmp_path / "data",
                         extra=["--cache-bytes", "4096", "--max-batch", "4", "--instances", "2"]).start()
    try:
        agent.infer("digits", {"image": images[:1]})
        _, text = agent.get("/metrics")
        text = text.decode()
        for family, kind in (("edgeml_model_instances", "gauge"), ("edgeml_model_instance_memory_bytes", "gauge"),
                             ("edgeml_model_instance_runs_total", "counter"), ("edgeml_batches_total", "counter"),
                             ("edgeml_cache_hits_total", "counter"), ("edgeml_cache_misses_total", "counter"),
                             ("edgeml_cache_bytes", "gauge")):
            assert f"# TYPE {family} {kind}" in text, family
        assert re.search(r'^edgeml_model_instance_memory_bytes\{instance="1"\} \d+$', text, re.M)
    finally:
        agent.terminate()
