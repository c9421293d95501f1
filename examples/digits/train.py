"""Train a small CNN on scikit-learn's bundled digits (offline) and write what edgeml needs.

Writes into --out: digits.keras, calib.npz (inputs only), eval.npz (inputs and labels 'y'),
train.npz and labels.txt. Seeded: the same command gives the same splits and, on one
machine, the same weights. The tests and the benchmark train the same model from here.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

INPUT_NAME = "image"
EVAL_SAMPLES = 400
CALIBRATION_SAMPLES = 200


def digits_splits(seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """sklearn digits as float32 images [N, 8, 8, 1] in [0, 1] and int64 labels, split
    ``train`` / ``calibration`` (200) / ``eval`` (400, held out from training and calibration)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_eval, n_cal = EVAL_SAMPLES, CALIBRATION_SAMPLES
    return {
        "eval": (x[:n_eval], y[:n_eval]),
        "calibration": (x[n_eval : n_eval + n_cal], y[n_eval : n_eval + n_cal]),
        "train": (x[n_eval + n_cal :], y[n_eval + n_cal :]),
    }


def build_digits_cnn():
    """A ~151k-parameter CNN for 8x8x1 digits. Its weights dominate the file (as in the models
    people ship to small devices), so an int8 build is close to a quarter of the fp32 one; with
    fewer parameters the ~9 KB of fixed .tflite overhead (names, per-channel scales) shows."""
    import keras

    inputs = keras.Input((8, 8, 1), name=INPUT_NAME)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train_digits_cnn(epochs: int = 8, seed: int = 0):
    """Train the digits CNN; return ``(model, splits)`` with the splits of ``digits_splits(seed)``."""
    from edgeml.optimizer.sources.tensorflow import import_tensorflow

    import_tensorflow()  # without TensorFlow's C++ start-up lines (CUDA probing, oneDNN notes)
    import keras

    keras.utils.set_random_seed(seed)
    splits = digits_splits(seed)
    model = build_digits_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    x_train, y_train = splits["train"]
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model, splits


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/digits"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args.out.mkdir(parents=True, exist_ok=True)
    model, splits = train_digits_cnn(args.epochs, args.seed)
    model.save(args.out / "digits.keras")
    np.savez(args.out / "train.npz", **{INPUT_NAME: splits["train"][0], "y": splits["train"][1]})
    np.savez(args.out / "calib.npz", **{INPUT_NAME: splits["calibration"][0]})
    np.savez(args.out / "eval.npz", **{INPUT_NAME: splits["eval"][0], "y": splits["eval"][1]})
    (args.out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    x, y = splits["eval"]
    acc = accuracy(model.predict(x, verbose=0), y)
    print(f"trained digits CNN ({model.count_params()} parameters), eval accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
