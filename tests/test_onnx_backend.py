"""The ONNX source and backend on real pretrained models (PP-OCR text direction classifier,
magika, silero VAD) and on tiny models built with onnx.helper for the error cases."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pretrained
import pytest
from onnx import TensorProto, helper

from edgeml.core.data import Dataset
from edgeml.core.errors import ConversionError, InputError, UnsupportedModelError, UsageError
from edgeml.core.runtime import load_runner
from edgeml.optimizer.backends import BuildOptions, get_backend
from edgeml.optimizer.backends.onnx import agreement, iter_feeds, quantized_op_counts
from edgeml.optimizer.sources.onnx import load_onnx
from edgeml.optimizer.sources.onnx_prepare import prepare

OPTIONS = BuildOptions(seed=0, min_agreement=0.99)


def top1_agreement(source, model_bytes: bytes, feed: dict) -> float:
    name = source.outputs[0].name
    want = source.reference(feed)[name]
    got = load_runner(model_bytes, "onnx").run(feed)[name]
    return float(np.mean(want.argmax(-1) == got.argmax(-1)))


# --- fixtures: each model loaded and each candidate built once ------------------------------------------


@pytest.fixture(scope="module")
def cls():
    x, _ = pretrained.ppocr_cls_crops(450, seed=0)
    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_CLS))
    return source, Dataset({"x": x[:150]}), {"x": x[150:]}


@pytest.fixture(scope="module")
def magika():
    b = pretrained.magika_inputs(400, seed=1)
    source = load_onnx(pretrained.model_path(*pretrained.MAGIKA))
    return source, Dataset({"bytes": b[:64]}), {"bytes": b[64:]}


@pytest.fixture(scope="module")
def silero():
    chunks = pretrained.silero_chunks(48, seed=2)
    source = load_onnx(pretrained.model_path(*pretrained.SILERO))
    n = len(chunks)
    # The recurrent state and the sample rate are not batched: one unbatched feed per sample.
    data = Dataset({"input": chunks, "state": np.zeros((n, 2, 1, 128), np.float32),
                    "sr": np.full(n, pretrained.SILERO_RATE, np.int64)})
    return source, data


@pytest.fixture(scope="module")
def cls_candidates(cls):
    source, calib, _ = cls
    backend = get_backend("onnx")
    return {r: backend.build(source, r, calib, OPTIONS) for r in ("fp32", "float16", "dynamic", "int8")}


@pytest.fixture(scope="module")
def magika_candidates(magika):
    source, calib, _ = magika
    backend = get_backend("onnx")
    return {r: backend.build(source, r, calib, OPTIONS) for r in ("fp32", "float16", "dynamic", "int8")}


# --- the source ---------------------------------------------------------------------------------------------


def test_source_describes_the_file(cls, magika, silero):
    source = cls[0]
    assert (source.kind, source.default_format) == ("onnx", "onnx")
    assert source.inputs[0].name == "x" and source.inputs[0].dtype == "float32"
    assert source.inputs[0].shape[1] == 3 and source.inputs[0].shape[0] is None
    # what ships is the file without doc strings and metadata; lineage names the file itself
    import hashlib

    import onnx

    shipped, original = onnx.load_model_from_string(source.onnx_bytes()), onnx.load(str(source.path))
    assert [n.op_type for n in shipped.graph.node] == [n.op_type for n in original.graph.node]
    assert not shipped.doc_string and not shipped.metadata_props and not any(n.doc_string for n in shipped.graph.node)
    assert source.sha256 == hashlib.sha256(source.path.read_bytes()).hexdigest()
    assert magika[0].inputs[0].dtype == "int32" and magika[0].outputs[0].shape == (None, 214)
    assert [s.dtype for s in silero[0].inputs] == ["float32", "float32", "int64"]


def test_a_file_that_is_not_onnx_is_an_input_error(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"these are not the weights you are looking for\n" * 10)
    with pytest.raises(InputError, match="not an ONNX model") as info:
        load_onnx(path)
    assert "\n" not in str(info.value)


def test_a_custom_op_is_named_in_the_error(tmp_path):
    node = helper.make_node("FancyGelu", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError, match="com.example::FancyGelu") as info:
        load_onnx(path)
    assert "re-export" in str(info.value)


# --- prepare ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["PPOCR_CLS", "SILERO"])
def test_prepare_lifts_constants_and_keeps_the_outputs(which, cls, silero):
    path = pretrained.model_path(*getattr(pretrained, which))
    original = onnx.load(path)
    feed = {"x": cls[1].inputs["x"][:8]} if which == "PPOCR_CLS" else next(iter_feeds(silero[1], silero[0].inputs))
    prepared, notes = prepare(original, feed)  # raises ConversionError itself if outputs changed

    def constants(graph):
        from edgeml.optimizer.sources.onnx_prepare import subgraphs

        return sum(n.op_type == "Constant" for n in graph.node) + sum(
            constants(g) for n in graph.node for g in subgraphs(n))

    assert constants(original.graph) > 300 and constants(prepared.graph) == 0
    assert any("initializers" in n for n in notes)
    source = load_onnx(path)
    want = source.reference(feed)
    got = load_runner(prepared.SerializeToString(), "onnx").run(feed)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert [i.name for i in prepared.graph.input] == [i.name for i in original.graph.input]
    # dynamic axes stay dynamic: the inputs are described exactly as before
    assert [i.type for i in prepared.graph.input] == [i.type for i in original.graph.input]


def test_prepare_refuses_a_change_in_outputs(cls):
    original = onnx.load(pretrained.model_path(*pretrained.PPOCR_CLS))
    broken, _ = prepare(original, None)
    weight_name = next(n for n in broken.graph.node if n.op_type == "Conv").input[1]
    weight = next(t for t in broken.graph.initializer if t.name == weight_name)
    weight.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(weight), weight_name))
    from edgeml.optimizer.sources.onnx_prepare import check_same_outputs

    with pytest.raises(ConversionError, match="changed output"):
        check_same_outputs(original, broken, {"x": cls[1].inputs["x"][:4]})


# --- recipes on the PP-OCR classifier (weights in Constant nodes) --------------------------------------------


def test_cls_candidates_run_with_the_source_names_and_shrink(cls, cls_candidates):
    source, _, held = cls
    fp32 = cls_candidates["fp32"]
    assert top1_agreement(source, fp32.model, held) == 1.0
    for recipe, cand in cls_candidates.items():
        runner = load_runner(cand.model, "onnx")
        assert [s.name for s in runner.inputs] == [s.name for s in source.inputs], recipe
        assert [s.name for s in runner.outputs] == [s.name for s in source.outputs], recipe
        assert runner.inputs[0].dtype == "float32" and runner.outputs[0].dtype == "float32"
    assert len(cls_candidates["float16"].model) < 0.6 * len(fp32.model)
    assert len(cls_candidates["int8"].model) < 0.65 * len(fp32.model)
    assert top1_agreement(source, cls_candidates["float16"].model, held) >= 0.995


def test_cls_int8_is_quantized_and_close_to_float(cls, cls_candidates):
    source, _, held = cls
    cand = cls_candidates["int8"]
    counts = quantized_op_counts(cand.model)
    assert counts.get("Conv", 0) >= 40  # the weights really are int8 (the raw file's stay float)
    assert cand.details["quantized_ops"] == counts
    assert isinstance(cand.details["float_nodes"], list)
    # Measured: 0.975-0.985 on held-out crops; this depthwise MobileNetV3 spreads its int8 error over
    # the whole network, and the notes say the 0.995 calibration goal was not reached.
    assert top1_agreement(source, cand.model, held) >= 0.97
    if cand.details["score"] < 0.995:
        assert any("below the goal" in n for n in cand.notes)


# --- magika: int32 byte features, layer norms and GELU in elementwise ops ----------------------------------


def test_magika_int8_matches_float_on_held_out_files(magika, magika_candidates):
    source, _, held = magika
    int8 = magika_candidates["int8"]
    assert top1_agreement(source, int8.model, held) >= 0.99
    assert len(int8.model) < 0.35 * len(magika_candidates["fp32"].model)
    ops = int8.details["quantized_ops"]
    assert ops.get("MatMul", 0) + ops.get("Gemm", 0) == 2  # ORT's rewrites may fuse MatMul+Add into Gemm
    assert int8.details["agreement"] >= 0.99
    for recipe in ("fp32", "float16", "dynamic"):
        assert top1_agreement(source, magika_candidates[recipe].model, held) >= 0.99, recipe
    assert len(magika_candidates["dynamic"].model) < 0.35 * len(magika_candidates["fp32"].model)


def test_ort_defaults_fall_short_where_ours_do_not(magika, magika_candidates, tmp_path, monkeypatch):
    """What ONNX Runtime's own quantizers do with these files as they are (measured, not assumed)."""
    monkeypatch.chdir(tmp_path)  # quant_pre_process leaves temporary weight files in the working directory
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, calib, held = magika

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(list(calib.batches(16)))

        def get_next(self):
            return next(self.batches, None)

    default_static = tmp_path / "magika_static.onnx"
    quantize_static(str(source.path), str(default_static), Reader())
    theirs = top1_agreement(source, default_static.read_bytes(), held)
    ours = top1_agreement(source, magika_candidates["int8"].model, held)
    assert theirs < 0.5 and ours >= 0.99  # measured: about 0.2 against 1.0

    # quant_pre_process (its symbolic shape inference) crashes on all three packaged models.
    for which in ("MAGIKA", "PPOCR_CLS", "SILERO"):
        with pytest.raises(Exception):
            quant_pre_process(str(pretrained.model_path(*getattr(pretrained, which))), str(tmp_path / "pre.onnx"))

    # quantize_dynamic on the raw files: weights sit in Constant nodes, so none is stored as int8
    # and the file grows. On the classifier it does emit 53 ConvInteger ops, which then quantize
    # their float weights again on every call; on silero it quantizes nothing at all.
    def int8_weights(data: bytes) -> int:
        return sum(t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.raw_data) > 64
                   for t in onnx.load_model_from_string(data).graph.initializer)

    for which in ("PPOCR_CLS", "SILERO"):
        raw = pretrained.model_path(*getattr(pretrained, which))
        out = tmp_path / f"{which}_dynamic.onnx"
        quantize_dynamic(str(raw), str(out))
        assert int8_weights(out.read_bytes()) == 0, which
        assert out.stat().st_size >= raw.stat().st_size, which
    assert not quantized_op_counts(out.read_bytes())  # silero
    assert int8_weights(magika_candidates["dynamic"].model) > 0


# --- silero: weights inside If branches ------------------------------------------------------------------


def test_silero_dynamic_quantizes_inside_control_flow(silero):
    source, data = silero
    cand = get_backend("onnx").build(source, "dynamic", data, OPTIONS)
    assert sum(cand.details["quantized_ops"].values()) > 0
    # Measured: int8 convolutions on the 16 kHz path break the output (cosine 0.57), so the
    # leave-one-out repair keeps that path's convs in float; the file shrinks by about 12%.
    assert cand.details["float_nodes"] and all("Conv" in n for n in cand.details["float_nodes"])
    assert len(cand.model) < 0.95 * len(source.onnx_bytes())
    feeds = list(iter_feeds(data, source.inputs))
    runner = load_runner(cand.model, "onnx")
    score = agreement([source.reference(f) for f in feeds], [runner.run(f) for f in feeds], [1] * len(feeds))
    assert score["cosine"]["output"] > 0.99 and score["cosine"]["stateN"] > 0.99
    assert score["max_abs_error"] < 0.1


def test_silero_int8_says_why_it_cannot(silero):
    """ONNX Runtime's static QDQ quantizer does not enter If branches, where all of silero is."""
    source, data = silero
    with pytest.raises(ConversionError, match="use the dynamic recipe") as info:
        get_backend("onnx").build(source, "int8", data, OPTIONS)
    assert "\n" not in str(info.value)


# --- usage and failures ----------------------------------------------------------------------------------


def test_int8_without_calibration_is_a_usage_error(cls):
    with pytest.raises(UsageError, match="int8 needs --calibration"):
        get_backend("onnx").build(cls[0], "int8", None, OPTIONS)


# --- task-aware builds on a dense map and a sequence; weight-only int8; percentile calibration -------------


def _kinds(source, feed):
    from edgeml.optimizer.metrics import output_kinds, parse_metric

    return output_kinds(source.reference(feed), parse_metric(None), [s.name for s in source.inputs])


def test_the_text_detector_is_judged_by_mask_iou_and_int8_weights_hold():
    """A probability map: its quality is the IoU of the text masks. Weight-only int8 alone loses
    1.4 points of IoU on it; measuring each weight's worth keeps the few that matter (small early
    convolutions) in float32, and the rest holds within the 0.01 goal as an int8-class model
    (at most 0.45x the float bytes)."""
    from edgeml.optimizer.evaluate import compare

    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_DET))
    held_out = {"x": pretrained.ppocr_det_images(12, seed=3)}
    kinds = _kinds(source, held_out)
    assert kinds == {source.outputs[0].name: "iou"}
    reference = source.reference(held_out)
    assert np.mean(reference[source.outputs[0].name] > 0.5) > 0.005  # there is text to find
    options = BuildOptions(seed=0, min_agreement=0.99, kinds=kinds)
    backend = get_backend("onnx")
    fp32 = backend.build(source, "fp32", None, options)
    weights = backend.build(source, "int8-weights", Dataset({"x": pretrained.ppocr_det_images(16, seed=1)}), options)
    assert len(weights.model) <= 0.45 * len(fp32.model)
    assert 0 < len(weights.details["float_nodes"]) <= 8, weights.notes
    q = compare(reference, load_runner(weights.model, "onnx").run(held_out), None, kinds=kinds)
    assert q.drop_kind == "iou" and q.drop <= 0.01, q


def test_the_text_recognizer_is_judged_position_by_position():
    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_REC))
    feed = {"x": pretrained.ppocr_rec_lines(4, seed=4)}
    (name, kind), = _kinds(source, feed).items()
    assert kind == "sequence"
    y = source.reference(feed)[name]
    assert y.ndim == 3 and y.shape[-1] == 6625  # 6625 characters at each of the line's positions


def test_int8_weights_hold_on_the_text_recognizer_with_gptq_rounding():
    """A sequence recognizer (40 positions x 6625 characters, low margins): rounding each weight
    to nearest int8 loses 6 points of per-position agreement on it; GPTQ rounding, fit on 24
    calibration lines, holds on held-out lines at an int8-class size and float speed."""
    source = load_onnx(pretrained.model_path(*pretrained.PPOCR_REC))
    held_out = {"x": pretrained.ppocr_rec_lines(48, seed=3)}
    kinds = _kinds(source, held_out)
    options = BuildOptions(seed=0, min_agreement=0.99, kinds=kinds)
    backend = get_backend("onnx")
    fp32 = backend.build(source, "fp32", None, options)
    built = backend.build(source, "int8-weights", Dataset({"x": pretrained.ppocr_rec_lines(24, seed=1)}), options)
    rounding = built.details["rounding"]
    assert rounding["gptq"] > rounding["nearest"] + 0.03, rounding
    assert any("GPTQ" in n for n in built.notes)
    assert len(built.model) <= 0.45 * len(fp32.model)
    name = source.outputs[0].name
    want = source.reference(held_out)[name].argmax(-1)
    assert np.mean(load_runner(built.model, "onnx").run(held_out)[name].argmax(-1) == want) >= 0.985


def test_weight_only_int8_stores_int8_weights_and_computes_in_float(cls):
    source, calib, held_out = cls
    built = get_backend("onnx").build(source, "int8-weights", calib, OPTIONS)
    model = onnx.load_model_from_string(built.model)
    int8 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert int8 and not any(n.op_type in ("QuantizeLinear", "ConvInteger", "MatMulInteger") for n in model.graph.node)
    fp32 = get_backend("onnx").build(source, "fp32", None, OPTIONS)
    assert len(built.model) < 0.4 * len(fp32.model)
    assert top1_agreement(source, built.model, held_out) >= 0.99


def test_percentile_calibration_survives_a_short_last_batch(cls):
    """37 calibration samples are batches of 16, 16 and 5: ORT's histogram calibrators crashed
    on the short one. A strict goal makes the build try percentile ranges after min-max."""
    source, calib, held_out = cls
    strict = BuildOptions(seed=0, min_agreement=0.9999)
    built = get_backend("onnx").build(source, "int8", Dataset({"x": calib.inputs["x"][:37]}), strict)
    assert built.details["calibration"]["tried"] == ["min-max", "percentile"]
    assert quantized_op_counts(built.model)
    assert top1_agreement(source, built.model, held_out) >= 0.9
