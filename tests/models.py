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
