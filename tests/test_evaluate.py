"""Comparison with the float model, latency figures, and how auto picks a candidate."""
from types import SimpleNamespace as NS

import numpy as np
import pytest

from edgeml.core.data import Dataset
from edgeml.core.errors import DataError, UsageError
from edgeml.core.stats import baseline_stats
from edgeml.optimizer.choose import choose, frontier
from edgeml.optimizer.evaluate import compare, measure_latency
from edgeml.optimizer.metrics import infer_kind, output_kinds, parse_metric


def test_compare_with_labels_reports_accuracy_drop():
    ref = {"p": np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]}
    cand = {"p": ref["p"].copy()}
    cand["p"][0] = [0, 1, 0, 0]  # one prediction changes
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    q = compare(ref, cand, labels)
    assert q.accuracy == pytest.approx(7 / 8) and q.drop == pytest.approx(1 / 8)
    assert q.agreement == pytest.approx(7 / 8) and q.drop_kind == "accuracy"


def test_compare_without_labels_uses_agreement_then_cosine():
    ref = {"p": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}
    q = compare(ref, {"p": np.array([[0.1, 0.9], [0.2, 0.8]], np.float32)})
    assert q.drop_kind == "agreement" and q.drop == pytest.approx(0.5)
    reg = {"v": np.array([[1.0], [2.0], [3.0], [4.0]])}
    q = compare(reg, {"v": np.array([[1.0], [2.0], [3.0], [4.1]])})
    assert q.drop_kind == "cosine" and 0 < q.drop < 1e-3 and q.max_abs_error == pytest.approx(0.1)


def test_labels_for_a_non_classifier_are_refused():
    with pytest.raises(DataError, match="not class scores"):
        compare({"v": np.zeros((3, 1))}, {"v": np.zeros((3, 1))}, np.zeros(3))


def test_latency_is_measured_on_single_samples():
    seen = []
    ds = Dataset({"x": np.arange(40, dtype=np.float32).reshape(20, 2)})
    lat = measure_latency(lambda feed: seen.append(feed["x"].shape) or {}, ds, warmup=2, runs=12)
    assert lat.runs == 12 and lat.median_ms >= 0 and lat.p95_ms >= lat.median_ms
    assert set(seen) == {(1, 2)}


def _m(name, size, ms, drop):
    return NS(recipe=name, bytes=size, latency=NS(median_ms=ms), quality=NS(drop=drop))


def test_choose_keeps_least_bytes_times_latency_within_goal():
    fp32, f16, dyn, int8 = _m("fp32", 400, 1.0, 0), _m("float16", 200, 1.0, 0), _m("dynamic", 105, 1.5, 0.002), _m("int8", 100, 0.5, 0.004)
    assert choose([f16, dyn, int8], 0.01) == (int8, True)
    assert choose([f16, dyn, int8], 0.003)[0] is dyn
    assert choose([f16, dyn, int8], 0.0)[0] is f16
    best, ok = choose([dyn, int8], 0.001)
    assert best is dyn and ok is False
    # a third of the bytes but 60% slower loses to half the bytes at the same speed
    small_slow, half_fast = _m("int8", 130, 1.6, 0.0), _m("float16", 200, 1.0, 0.0)
    assert choose([small_slow, half_fast], 0.01)[0] is half_fast
    assert set(m.recipe for m in frontier([fp32, f16, dyn, int8])) == {"float16", "dynamic", "int8"}


def test_baseline_stats_per_channel_and_per_feature():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(50, 4, 4, 3)) + np.array([0.0, 5.0, -5.0])
    stats = baseline_stats({"img": img, "vec": rng.random((50, 7)), "seq": rng.random((50, 1000))})
    chans = stats["inputs"]["img"]["channels"]
    assert stats["inputs"]["img"]["axis"] == 2 and len(chans) == 3
    assert chans[1]["mean"] == pytest.approx(5.0, abs=0.2) and chans[2]["mean"] == pytest.approx(-5.0, abs=0.2)
    assert len(stats["inputs"]["vec"]["channels"]) == 7
    assert stats["inputs"]["seq"]["axis"] is None and stats["inputs"]["seq"]["channels"][0]["count"] == 50000
    nchw = baseline_stats({"x": rng.random((10, 3, 16, 16))})["inputs"]["x"]
    assert nchw["axis"] == 0 and len(nchw["channels"]) == 3


def test_a_candidate_no_smaller_and_no_faster_than_fp32_is_never_kept():
    """An int8 build that left every node in float (1.000x the bytes, same speed) is not a win."""
    fp32 = _m("fp32", 400, 1.0, 0)
    same_int8, same_dyn = _m("int8", 398, 1.0, 0.0), _m("dynamic", 400, 0.97, 0.0)
    assert choose([same_int8, same_dyn], 0.01, baseline=fp32) == (fp32, True)
    smaller = _m("float16", 200, 1.0, 0.0)
    assert choose([same_int8, smaller], 0.01, baseline=fp32)[0] is smaller
    faster = _m("int8", 400, 0.5, 0.0)
    assert choose([same_dyn, faster], 0.01, baseline=fp32)[0] is faster


def test_cosine_is_robust_near_zero():
    """A rebuild that differs by float rounding is never a drop, even when the output is all but
    zero (a detector's map of an image with nothing to detect); a real difference still is."""
    rng = np.random.default_rng(0)
    tiny = rng.random((8, 1, 8, 8)) * 1e-6  # probability maps [N, 1, H, W]
    rebuilt = tiny + rng.standard_normal((8, 1, 8, 8)) * 1e-7
    q = compare({"map": tiny}, {"map": rebuilt}, None, metric=parse_metric("cosine"))
    assert q.drop_kind == "cosine" and q.drop == 0.0
    maps = rng.random((8, 1, 8, 8))
    maps[0] = 1e-9  # one sample with nothing in it, among ordinary ones
    near = maps.copy()
    near[0] += 1e-4
    cosine = parse_metric("cosine")
    assert compare({"map": maps}, {"map": near}, None, metric=cosine).drop < 1e-3
    assert compare({"map": maps}, {"map": -maps}, None, metric=cosine).drop > 0.9  # a real difference still counts
    np.testing.assert_equal(compare({"map": maps}, {"map": maps}, None, metric=cosine).drop, 0.0)
    # judged as what they are, probability maps: the all-but-zero map has no mask either way
    assert compare({"map": tiny}, {"map": rebuilt}, None).drop_kind == "iou"
    assert compare({"map": tiny}, {"map": rebuilt}, None).drop == 0.0


# --- the task metric: each output judged as what it is ------------------------------------------------


def _noisy(ref: np.ndarray, cosine: float, seed: int = 0) -> np.ndarray:
    """``ref`` plus noise orthogonal-ish to it, scaled so each row keeps about ``cosine``."""
    noise = np.random.default_rng(seed).standard_normal(ref.shape)
    scale = np.linalg.norm(ref, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1, keepdims=True)
    return (ref + noise * scale * np.tan(np.arccos(cosine))).astype(np.float32)


def test_a_sentence_embedding_is_judged_by_cosine_not_argmax():
    """A token model's [N, 384] output is a representation: its argmax means nothing. A candidate
    with cosine 0.995 used to fail on "agreement"; it is now well within a 0.01 goal."""
    ref = np.random.default_rng(1).standard_normal((200, 384)).astype(np.float32)
    cand = _noisy(ref, 0.995)
    inputs = ["input_ids", "attention_mask"]
    kinds = output_kinds({"last_hidden_state_mean": ref}, parse_metric("auto"), inputs)
    assert kinds == {"last_hidden_state_mean": "cosine"}
    q = compare({"out": ref}, {"out": cand}, None, kinds=output_kinds({"out": ref}, parse_metric(None), inputs))
    assert q.drop_kind == "cosine" and q.drop == pytest.approx(0.005, abs=0.002)
    assert q.relative_error == pytest.approx(np.tan(np.arccos(0.995)), rel=0.1)
    as_scores = compare({"out": ref}, {"out": cand}, None, kinds={"out": "agreement"})
    assert as_scores.drop > 0.05  # what the old rule said: argmax flips on a flat 384-vector


@pytest.mark.parametrize("name,shape,unit,inputs,kind", [
    ("sentence_embedding", (16, 384), False, ["x"], "cosine"),  # the name says so
    ("output_0", (16, 384), True, ["x"], "cosine"),  # normalized rows: an embedding
    ("output_0", (16, 10), False, ["x"], "agreement"),  # class scores
    ("logits", (16, 2), False, ["input_ids"], "agreement"),  # a text classifier on tokens
    ("output_0", (16, 40, 97), False, ["x"], "sequence"),  # per-position scores (a text recognizer)
    ("output_0", (16, 1), False, ["x"], "cosine"),  # a regression
])
def test_the_kind_is_read_off_the_output(name, shape, unit, inputs, kind):
    y = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if unit:
        y /= np.linalg.norm(y, axis=-1, keepdims=True)
    assert output_kinds({name: y}, parse_metric(None), inputs) == {name: kind}
    assert infer_kind("map", np.random.default_rng(0).random((4, 1, 32, 32))) == "iou"  # sigmoid map [N, 1, H, W]
    assert infer_kind("map", np.random.default_rng(0).random((4, 32, 32, 1))) == "iou"  # NHWC
    assert infer_kind("map", np.random.default_rng(0).standard_normal((4, 1, 32, 32))) == "cosine"  # not probabilities
    assert infer_kind("ids", np.arange(4)) == "agreement"


def test_a_probability_map_is_judged_by_mask_iou_at_the_threshold():
    rng = np.random.default_rng(2)
    ref = np.zeros((6, 1, 32, 32), np.float32)
    ref[:, :, 8:24, 8:24] = 0.9  # one text box per image
    cand = ref.copy()
    cand[:, :, 8:24, 20:24] = 0.4  # the candidate's boxes are a quarter narrower at 0.5, whole at 0.3
    q = compare({"maps": ref}, {"maps": cand}, None)
    assert q.drop_kind == "iou" and q.iou == pytest.approx(0.75) and q.drop == pytest.approx(0.25)
    assert compare({"maps": ref}, {"maps": cand}, None, metric=parse_metric("iou@0.3")).drop == 0.0
    empty = np.full_like(ref, 1e-7)  # nothing to detect in either: a full agreement, not a 0/0
    assert compare({"maps": empty}, {"maps": empty + rng.random(ref.shape).astype(np.float32) * 1e-7}, None).drop == 0.0


def test_a_sequence_is_judged_position_by_position():
    rng = np.random.default_rng(3)
    ref = rng.random((10, 40, 97)).astype(np.float32)
    cand = ref.copy()
    flip = ref.argmax(-1)
    cand[:, :4, :] = 0.0
    for i in range(10):  # move the top class at 4 of 40 positions of each line
        for t in range(4):
            cand[i, t, (flip[i, t] + 1) % 97] = 1.0
    q = compare({"seq": ref}, {"seq": cand}, None)
    assert q.drop_kind == "sequence" and q.agreement == pytest.approx(0.9) and q.drop == pytest.approx(0.1)


def test_relative_error_gates_a_regression_when_asked():
    ref = np.linspace(1, 2, 50, dtype=np.float32).reshape(50, 1)
    cand = ref * 1.02  # 2% too high everywhere: the direction is the same, the size is not
    by_cosine = compare({"y": ref}, {"y": cand}, None)
    assert by_cosine.drop_kind == "cosine" and by_cosine.drop < 1e-6 and by_cosine.relative_error == pytest.approx(0.02)
    by_error = compare({"y": ref}, {"y": cand}, None, metric=parse_metric("relative-error"))
    assert by_error.drop_kind == "relative-error" and by_error.drop == pytest.approx(0.02)


@pytest.mark.parametrize("text,message", [
    ("iou@1.5", "between 0 and 1"), ("iou@x", "between 0 and 1"), ("cosine@0.3", "only iou"), ("top5", "unknown metric"),
])
def test_a_bad_metric_is_refused_in_one_line(text, message):
    with pytest.raises(UsageError, match=message):
        parse_metric(text)


def test_a_metric_that_cannot_apply_is_refused():
    with pytest.raises(UsageError, match="needs class scores"):
        output_kinds({"y": np.zeros((4, 1), np.float32)}, parse_metric("agreement"))
    with pytest.raises(UsageError, match="needs labels"):
        output_kinds({"y": np.zeros((4, 3), np.float32)}, parse_metric("accuracy"))
