"""The digits CNN of examples/digits/train.py, importable by tests and benchmarks as ``models``."""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "examples" / "digits" / "train.py"
if "digits_example" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("digits_example", _PATH)
    sys.modules["digits_example"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["digits_example"])
_example = sys.modules["digits_example"]

INPUT_NAME = _example.INPUT_NAME
digits_splits = _example.digits_splits
build_digits_cnn = _example.build_digits_cnn
train_digits_cnn = _example.train_digits_cnn
accuracy = _example.accuracy


def text_encoder_artifact(path: Path, private_key: Path) -> Path:
    """A tiny ONNX text encoder as a signed artifact: input_ids [N, T] (vocabulary 50) and
    attention_mask [N, T] -> a mean embedding [N, 4]; a token id beyond the vocabulary fails in
    the model (Gather), past the agent's validation."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgeml.core.artifact import write_artifact
    from edgeml.core.runtime import load_runner

    table = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
         helper.make_node("Unsqueeze", ["attention_mask", "axis2"], ["mask3"]),
         helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
         helper.make_node("ReduceSum", ["masked", "axis1"], ["embedding"], keepdims=0)], "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "t"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["n", "t"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2], np.int64), "axis2"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    inputs = {"input_ids": np.random.default_rng(1).integers(0, 50, (4, 6)), "attention_mask": np.ones((4, 6), np.float32)}
    outputs = load_runner(model, "onnx").run(inputs)
    write_artifact(path, model=model, model_format="onnx", private_key=private_key, baseline={},
                   manifest={"name": "encoder", "version": 1, "selftest": {"atol": 1e-5, "samples": 4}},
                   selftest_inputs=inputs, selftest_outputs=outputs)
    return path
