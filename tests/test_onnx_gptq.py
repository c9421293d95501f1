"""GPTQ rounding of int8 weights (edgeml/optimizer/backends/onnx_gptq.py): the input rows it
unfolds are the ones the op really multiplies, its rounding beats rounding to nearest on
held-out inputs, and the stored format does not change."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeml.optimizer.backends import onnx_gptq
from edgeml.optimizer.backends.onnx_weights import int8_per_channel, weights_to_int8


def _conv_model(w: np.ndarray, group: int, strides, pads, dilations) -> onnx.ModelProto:
    spatial = w.ndim - 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=strides, pads=pads, dilations=dilations)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[1] * group] + [None] * spatial)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # as edgeml's runtime does for int8-weights
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("shape,group,strides,pads,dilations", [
    ((6, 4, 3, 3), 1, [1, 1], [1, 1, 1, 1], [1, 1]),
    ((6, 2, 3, 2), 2, [2, 1], [0, 1, 1, 0], [1, 2]),  # grouped, strided, dilated, uneven padding
    ((8, 1, 3, 3), 8, [1, 1], [1, 1, 1, 1], [1, 1]),  # depthwise
    ((5, 3, 3), 1, [2], [1, 1], [1]),  # 1-D
])
def test_unfolded_rows_times_the_weight_are_the_conv_outputs(shape, group, strides, pads, dilations):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32)
    model = _conv_model(w, group, strides, pads, dilations)
    x = rng.normal(size=(2, shape[1] * group) + (7,) * (len(shape) - 2)).astype(np.float32)
    y = _run(model, x)
    layer = onnx_gptq._layers(model.graph, {"w": model.graph.initializer[0]}, ["w"])["w"]
    picks = np.random.default_rng(1)
    rows = onnx_gptq._rows(layer, x, 10**9, picks)  # every output position, in order
    per_group = shape[0] // group
    for g, r in enumerate(rows):
        got = r @ w[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T.astype(np.float64)
        want = np.moveaxis(y[:, g * per_group : (g + 1) * per_group], 1, -1).reshape(-1, per_group)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _correlated(rng, n: int, k: int) -> np.ndarray:
    """Inputs whose features move together, as real activations do (GPTQ's whole lever)."""
    factors = rng.normal(size=(k // 8, k))  # a few causes drive many features
    return (rng.normal(size=(n, k // 8)) @ factors + 0.1 * rng.normal(size=(n, k)) + 0.5).astype(np.float32)


def test_gptq_rounding_beats_nearest_on_held_out_inputs_and_keeps_the_format():
    rng = np.random.default_rng(0)
    k, n = 96, 64
    w = (rng.normal(size=(k, n)) * np.exp(rng.normal(size=(1, n)))).astype(np.float32)
    model = _matmul_model(w)
    mixing_seed = np.random.default_rng(7)
    x = _correlated(mixing_seed, 4000, k)
    calibration, held_out = x[:1000], x[1000:]
    chosen = onnx_gptq.round_weights(model, [{"x": calibration[i : i + 100]} for i in range(0, 1000, 100)], ["w"])
    q, scale, axis = chosen["w"]
    assert q.dtype == np.int8 and q.shape == w.shape and axis == 1 and scale.shape == (n,)
    nearest_scale, nearest_q = int8_per_channel(w, 1)
    np.testing.assert_array_equal(scale, nearest_scale)  # same scales: only the int8 values differ
    assert np.mean(q != nearest_q) > 0.05

    want = held_out @ w
    err_gptq = np.linalg.norm(held_out @ (q * scale) - want)
    err_nearest = np.linalg.norm(held_out @ (nearest_q * nearest_scale) - want)
    assert err_gptq < 0.5 * err_nearest, (err_gptq, err_nearest)

    # what weights_to_int8 stores with them is what the model then computes
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    assert weights_to_int8(stored.graph, rounded=chosen) == 1
    np.testing.assert_allclose(_run(stored, held_out[:50]), held_out[:50] @ (q * scale), rtol=1e-4, atol=1e-4)


def test_a_weight_read_by_two_ops_keeps_rounding_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])]
    graph = helper.make_graph(nodes, "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_gptq.round_weights(model, [{"x": rng.normal(size=(32, 16)).astype(np.float32)}], ["w"]) == {}
