"""Data sources: .npz and module:function, seeded sampling, and every mismatch with the model."""
import textwrap

import numpy as np
import pytest

from edgeml.core.data import load_data, match_inputs
from edgeml.core.errors import DataError, InputError
from edgeml.core.specs import TensorSpec

IMG = TensorSpec("pixels", "float32", (None, 8, 8, 1))


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_with_labels_and_x_alias(tmp_path):
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype(np.float32)
    path = _npz(tmp_path, x=x, y=np.arange(20))
    ds = match_inputs(load_data(str(path)), [IMG])
    assert list(ds.inputs) == ["pixels"]
    np.testing.assert_array_equal(ds.inputs["pixels"], x)
    np.testing.assert_array_equal(ds.labels, np.arange(20))
    assert ds.provenance["samples"] == 20 and len(ds.provenance["sha256"]) == 64


def test_sampling_is_seeded_and_recorded(tmp_path):
    path = _npz(tmp_path, x=np.arange(100, dtype=np.float32)[:, None])
    a = load_data(str(path), limit=10, seed=3)
    b = load_data(str(path), limit=10, seed=3)
    c = load_data(str(path), limit=10, seed=4)
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
    assert not np.array_equal(a.inputs["x"], c.inputs["x"])
    assert a.provenance["indices_sha256"] == b.provenance["indices_sha256"] != c.provenance["indices_sha256"]
    assert np.all(np.diff(a.inputs["x"][:, 0]) > 0)  # source order kept


def test_module_function_source_streams_batches(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import numpy as np
        def batches():
            for i in range(5):
                yield {"pixels": np.full((4, 8, 8, 1), i, np.float32), "y": np.full(4, i)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = match_inputs(load_data("mydata:batches", limit=8, seed=0), [IMG])
    assert len(ds) == 8 and ds.provenance["streamed_samples"] == 20
    assert ds.labels.shape == (8,)
    np.testing.assert_array_equal(ds.inputs["pixels"][:, 0, 0, 0], ds.labels)


def test_missing_file_and_unreadable_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip")
    with pytest.raises(InputError, match="cannot read"):
        load_data(str(bad))
    with pytest.raises(InputError, match="cannot load"):
        load_data("no_such_module_xyz:fn")


@pytest.mark.parametrize("arrays, message", [
    ({"image": np.zeros((3, 8, 8, 1), np.float32)}, "model's inputs are \\['pixels'\\]"),
    ({"pixels": np.zeros((3, 8, 8), np.float32)}, "shape \\(8, 8\\).*expects \\(8,8,1\\)"),
    ({"pixels": np.zeros((3, 8, 8, 3), np.float32)}, "expects \\(8,8,1\\)"),
    ({"pixels": np.array([["a"] * 64] * 3).reshape(3, 8, 8, 1)}, "dtype <U1.*astype\\('float32'\\)"),
])
def test_mismatch_with_model_inputs(tmp_path, arrays, message):
    ds = load_data(str(_npz(tmp_path, **arrays)))
    with pytest.raises(DataError, match=message):
        match_inputs(ds, [IMG], "calibration")


def test_int_data_to_float_input_is_converted_but_float_to_int_is_refused(tmp_path):
    ds = load_data(str(_npz(tmp_path, pixels=np.ones((2, 8, 8, 1), np.int32))))
    assert match_inputs(ds, [IMG]).inputs["pixels"].dtype == np.float32
    ids = TensorSpec("ids", "int64", (None, 5))
    ds = load_data(str(_npz(tmp_path, "i.npz", ids=np.ones((2, 5), np.float32))))
    with pytest.raises(DataError, match="dtype float32 but the model expects int64"):
        match_inputs(ds, [ids])


def test_different_sample_counts_refused(tmp_path):
    with pytest.raises(DataError, match="different sample counts"):
        load_data(str(_npz(tmp_path, a=np.zeros((3, 2)), y=np.zeros(4))))


def test_raw_pixels_empty_data_and_nan_are_refused_naming_the_place(tmp_path):
    """uint8 pixels into a float input would be cast without the model's scaling (digits CNN
    accuracy 0.99 -> 0.82 that way); NaN or infinity would poison every figure; no samples at all
    used to crash with a KeyError."""
    ds = load_data(str(_npz(tmp_path, pixels=np.full((2, 8, 8, 1), 200, np.uint8))))
    with pytest.raises(DataError, match=r"'pixels' is uint8 .*\(x / 255\)\.astype\('float32'\)"):
        match_inputs(ds, [IMG], "eval")
    x = np.zeros((5, 8, 8, 1), np.float32)
    x[3, 2, 2, 0] = np.nan
    x[4, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"eval array 'pixels' holds NaN at sample 3 \(2 of 5 samples"):
        match_inputs(load_data(str(_npz(tmp_path, "n.npz", pixels=x))), [IMG], "eval")
    y = np.array([0.0, 1.0, np.nan])
    with pytest.raises(DataError, match=r"labels 'y' holds NaN at sample 2"):
        match_inputs(load_data(str(_npz(tmp_path, "y.npz", pixels=np.zeros((3, 8, 8, 1), np.float32), y=y))), [IMG])
    with pytest.raises(DataError, match="has no samples"):
        load_data(str(_npz(tmp_path, "e.npz", pixels=np.zeros((0, 8, 8, 1), np.float32))))
