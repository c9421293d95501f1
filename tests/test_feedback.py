"""Feedback (opt-in): live agents keep sampled requests, take ground truth for them by the id
their infer response carried, report live accuracy, and ``edgeml fleet feedback pull`` brings
the labelled samples home as one .npz that ``edgeml optimize`` reads as it is."""
from __future__ import annotations

import json

import numpy as np
import pytest
from agent_proc import AgentProcess
from fleet_harness import FleetServe, cli, cli_json, devices
from waiting import wait_until

from edgeml.core.data import load_data, match_inputs


@pytest.fixture(scope="module")
def eval_data(digits_dir):
    with np.load(digits_dir / "eval.npz") as data:
        return data["image"], data["y"]


def _post(agent, path, body) -> tuple:
    status, data = agent._request("POST", path, json.dumps(body).encode())
    return status, json.loads(data) if data else None


def test_feedback_is_kept_scored_and_pulled_home(tmp_path, mosquitto, digits_dir, digits_int8_artifact, eval_data):
    images, labels = eval_data
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    serve = FleetServe(mosquitto.url, db, tmp_path / "serve.log").start()
    pub = digits_dir / "keys" / "signing.pub"
    on = AgentProcess(digits_int8_artifact, pub, tmp_path / "dev1", device="dev1", broker=mosquitto.url,
                      extra=["--feedback", "on", "--stats-window", "0.5"]).start()
    off = AgentProcess(digits_int8_artifact, pub, tmp_path / "dev2", device="dev2", broker=mosquitto.url).start()
    try:
        wait_until(lambda: all((devices(db).get(d) or {}).get("presence") == "online" for d in ("dev1", "dev2")), 30,
                   "both online")
        ids, predicted = [], []
        for i in range(40):
            status, body = on.infer("digits", {"image": images[i][None]})
            assert status == 200 and body["id"]
            ids.append(body["id"])
            predicted.append(int(np.argmax(body["outputs"][0]["data"])))
        # a client's own id is kept as its id
        body = {"id": "client-7", "inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                              "data": images[40].ravel().tolist()}]}
        assert _post(on, "/v2/models/digits/infer", body)[1]["id"] == "client-7"
        truth = [int(labels[i]) for i in range(40)]
        truth[0] = (predicted[0] + 1) % 10  # one the model got wrong
        for request_id, y in zip(ids[:30], truth[:30]):
            status, answer = _post(on, "/v2/models/digits/feedback", {"id": request_id, "label": y})
            assert status == 200 and answer["accepted"]
        assert _post(on, "/v2/models/digits/feedback", {"id": ids[0], "label": 1})[0] == 404  # labelled already
        assert _post(on, "/v2/models/digits/feedback", {"id": "never-seen", "label": 1})[0] == 404
        status, answer = _post(on, "/v2/models/digits/feedback", {"id": ids[31], "label": "seven"})
        assert status == 400 and "class id" in answer["error"]
        assert _post(on, "/v2/models/digits/feedback", {"id": ids[31], "label": [1, 2]})[0] == 400  # one sample
        assert _post(on, "/v2/models/digits/feedback", {"id": ids[31], "label": truth[31]})[0] == 200  # still kept
        status, answer = _post(off, "/v2/models/digits/feedback", {"id": "x", "label": 1})
        assert status == 404 and "feedback is off" in answer["error"]
        assert "id" not in off.infer("digits", {"image": images[0][None]})[1]  # off: nothing changes

        # live accuracy reaches the host in telemetry
        from edgeml.fleet import open_store

        def scored():
            with open_store(db) as store:
                return [r for _, _, r in store.records(["feedback"], fleet="f1")]

        records = wait_until(lambda: sum(r["labelled"] for r in scored()) >= 31 and scored(), 20, "feedback records")
        correct = sum(p == t for p, t in zip(predicted[:30] + [predicted[31]], truth[:30] + [truth[31]]))
        assert sum(r["correct"] for r in records) == correct and all(r["version"] == 1 for r in records)

        out = tmp_path / "feedback.npz"
        pulled = cli_json("fleet", "feedback", "pull", "--fleet", "f1", "--broker", mosquitto.url, "--db", db,
                          "-o", out, "--timeout", "20s")
        assert pulled["samples"] == 31 and pulled["per_device"] == {"dev1": 31, "dev2": 0}, pulled
        assert sorted(pulled["answered"]) == ["dev1", "dev2"] and pulled["missing"] == []
        with np.load(out) as npz:
            assert npz["image"].shape == (31, 8, 8, 1) and sorted(npz["y"].tolist()) == sorted(truth[:30] + [truth[31]])
            assert set(npz["_device"].tolist()) == {"dev1"} and npz["_prediction"].shape == (31,)
        # optimize takes it as it is: the input array and the labels, the "_" arrays skipped
        from edgeml.optimizer.sources.base import load_source

        source = load_source(digits_dir / "digits.keras")
        data = match_inputs(load_data(str(out), role="eval"), source.inputs, "eval")
        assert data.labels is not None and len(data.labels) == 31
    finally:
        on.terminate(), off.terminate()
        serve.stop()


def test_a_reservoir_stays_within_its_bytes_and_every_sample_has_its_chance(tmp_path):
    from device_agent.monitoring.feedback import Feedback, FeedbackSettings

    x = np.zeros((1, 8, 8, 1), np.float32)  # 256 bytes + 64 of bookkeeping per sample
    fb = Feedback(tmp_path, "m", 1, FeedbackSettings(enabled=True, max_bytes=320 * 50), seed=0)
    for i in range(1000):
        fb.keep(str(i), {"image": x + i}, {"probs": np.eye(10, dtype=np.float32)[[i % 10]]})
        fb.label(str(i), i % 10)
    assert len(fb.samples) == 50 and fb.seen == 1000
    kept = sorted(int(s["inputs"]["image"][0, 0, 0]) for s in fb.samples)
    assert kept[-1] > 500 and kept[0] < 500  # reservoir sampling: early and late samples alike, not the last 50
    fb.save()
    again = Feedback(tmp_path, "m", 1, FeedbackSettings(enabled=True, max_bytes=320 * 50))
    assert len(again.samples) == 50 and again.seen == 1000  # survives a restart
