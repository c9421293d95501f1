"""Short internal names: same outputs, fewer bytes, inputs and outputs keep their names."""
import numpy as np
import pretrained

from edgeml.core.runtime import load_runner
from edgeml.optimizer.backends.onnx_compact import compact_names


def test_compacting_keeps_outputs_and_io_names_and_saves_bytes():
    raw = pretrained.model_path(*pretrained.PPOCR_CLS).read_bytes()
    small = compact_names(raw)
    assert len(small) < len(raw) - 10_000
    x, _ = pretrained.ppocr_cls_crops(4, seed=3)
    a, b = load_runner(raw, "onnx"), load_runner(small, "onnx")
    assert [s.name for s in a.inputs + a.outputs] == [s.name for s in b.inputs + b.outputs]
    for name, want in a.run({"x": x}).items():
        np.testing.assert_array_equal(b.run({"x": x})[name], want)


def test_control_flow_models_are_left_alone():
    raw = pretrained.model_path(*pretrained.SILERO).read_bytes()
    assert compact_names(raw) == raw
