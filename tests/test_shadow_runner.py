"""The device's shadow runner on real models: the candidate runs off the request path, agreement
is counted right, a candidate slower than the traffic is dropped and counted (the hand-off never
waits), its failures are findings, and the window counts add up."""
from __future__ import annotations

import time

import numpy as np
import pytest
from fleet_harness import resign, trap_artifact

from device_agent.shadow import ShadowRunner
from device_agent.serving import ModelService
from edgeml.core import shadow as sh


@pytest.fixture(scope="module")
def models(digits_int8_artifact, digits_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shadow-models")
    key, pub = digits_dir / "keys" / "signing.key", digits_dir / "keys" / "signing.pub"
    paths = {"v1": digits_int8_artifact,
             "v2": resign(digits_int8_artifact, folder / "v2.edgeml", key, version=2),
             "slow": trap_artifact(digits_int8_artifact, folder / "slow.edgeml", key, "slow", version=4),
             "errors": trap_artifact(digits_int8_artifact, folder / "errors.edgeml", key, "errors", version=4)}
    return {k: ModelService.load(p, pub) for k, p in paths.items()}


@pytest.fixture(scope="module")
def images(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"][:64].astype(np.float32)


def _serve(active, runner, batch):
    """What the API does for one request: answer it with the active model, then tell the sinks."""
    inputs = {"image": batch}
    outputs = active.infer(inputs)
    runner.inference(active.name, active.version, 1.0, inputs, outputs, active.last_run_ms())
    return outputs


def _ready(runner):
    assert runner.ready.wait(60), runner.status()  # the candidate loaded in its own process
    return runner


def _run(runner, active, images, per_request=1):
    records = []
    runner.emit = records.append
    _ready(runner)
    for i in range(0, len(images), per_request):
        _serve(active, runner, images[i:i + per_request])
        time.sleep(0.002)
    runner.close()
    return records, sh.summarize(records)


def test_the_same_model_agrees_on_every_row_and_counts_add_up(models, images):
    runner = ShadowRunner(models["v2"], sample=1.0, rollout="s-1", emit=None, window_s=0.05)
    records, s = _run(runner, models["v1"], images, per_request=4)
    assert records and all(r["kind"] == "shadow" and r["shadow_version"] == 2 and r["version"] == 1 for r in records)
    assert s["sampled"] == 16 and s["compared"] + s["dropped"] + s["errors"] == 16 and s["compared"] >= 8
    assert s["rows"] == 4 * s["compared"] and s["top1_agreement"] == 1.0
    # both models timed on the same requests, in the shared log buckets
    assert sum(sum(r["active_ms"].values()) for r in records) == s["compared"]
    assert sum(sum(r["shadow_ms"].values()) for r in records) == s["compared"]
    assert 0.2 < s["latency_ratio"] < 5


def test_a_different_model_disagrees_as_much_as_it_really_does(models, images):
    runner = ShadowRunner(models["slow"], sample=1.0, rollout="s-1", emit=None, window_s=60, active=models["v1"])
    records, s = _run(runner, models["v1"], images)
    active = next(iter(models["v1"].infer({"image": images}).values())).argmax(-1)  # its output has another name
    candidate = models["slow"].infer({"image": images})["probs"].argmax(-1)
    truth = float(np.mean(active == candidate))
    assert s["compared"] == 64 and s["dropped"] == 0
    assert s["top1_agreement"] == pytest.approx(truth) and truth < 0.5


def test_a_slow_candidate_is_dropped_and_counted_and_the_hand_off_never_waits(models, images):
    """Bright inputs make the trap model loop ~50x longer: the queue fills, requests beyond it are
    dropped, and handing a request to the runner stays in microseconds all along."""
    runner = ShadowRunner(models["slow"], sample=1.0, rollout="s-1", emit=None, window_s=60, max_pending=2)
    records = []
    runner.emit = records.append
    _ready(runner)
    bright = images * 60.0
    costs = []
    for i in range(200):
        inputs = {"image": bright[i % 64:i % 64 + 1]}
        outputs = models["v1"].infer(inputs)
        t0 = time.perf_counter()
        runner.inference("digits", 1, 1.0, inputs, outputs, 1.0)
        costs.append(time.perf_counter() - t0)
    runner.close()
    s = sh.summarize(records)
    assert s["sampled"] == 200 and s["dropped"] > 100
    assert s["compared"] + s["dropped"] + s["errors"] == 200
    assert np.median(costs) < 1e-3  # the request path never ran the candidate


def test_sampling_takes_about_the_share_asked(models, images):
    runner = ShadowRunner(models["v2"], sample=0.25, rollout="s-1", emit=None, window_s=60, seed=1)
    records = []
    runner.emit = records.append
    _ready(runner)
    for _ in range(8):
        for i in range(64):
            runner.inference("digits", 1, 1.0, {"image": images[i:i + 1]}, {"probs": np.zeros((1, 10), np.float32)})
    runner.close()
    s = sh.summarize(records)
    assert 0.19 < s["sampled"] / 512 < 0.31


def test_a_candidate_that_fails_is_a_finding_not_a_crash(models, images):
    runner = ShadowRunner(models["errors"], sample=1.0, rollout="s-1", emit=None, window_s=60)
    records = []
    runner.emit = records.append
    _ready(runner)
    for i in range(10):
        _serve(models["v1"], runner, images[i:i + 1] * 60.0)  # the trap fails on bright inputs
        time.sleep(0.01)
    runner.close()
    s = sh.summarize(records)
    assert s["errors"] == 10 and s["compared"] == 0 and s["error_rate"] == 1.0
    assert "could not run" in records[-1]["first_error"]


def test_cosine_for_outputs_that_are_not_class_scores(models):
    out = sh.compare({"emb": np.array([[1.0, 0.0], [0.0, 1.0]])}, {"emb": np.array([[1.0, 0.0], [0.0, -1.0]])}, ())
    assert out["cosine_n"] == 1 and out["cosine_sum"] == pytest.approx(0.0) and out["rows"] == 0
    nan = sh.compare({"emb": np.ones(3)}, {"emb": np.array([1.0, np.nan, 1.0])}, ())
    assert nan["cosine_min"] == -1.0
    classes = sh.compare({"p": np.eye(3)}, {"p": np.eye(3)[[0, 2, 1]]}, {"p"})
    assert (classes["rows"], classes["agreed"]) == (3, 1)
