"""Train a small CNN on scikit-learn's bundled digits (offline) and write what edgeml needs.

Writes into --out: digits.keras, calib.npz (inputs only), eval.npz (inputs and labels 'y'),
train.npz and labels.txt. Seeded: the same command gives the same splits.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

INPUT_NAME = "pixels"


def digits_splits(seed: int = 0):
    """Digits as float32 [N, 8, 8, 1] in [0, 1]; train / calibration / eval splits, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    x_train, x_calib, y_train, y_calib = train_test_split(x_train, y_train, test_size=200, random_state=seed,
                                                          stratify=y_train)
    return {"train": (x_train, y_train), "calib": (x_calib, y_calib), "eval": (x_eval, y_eval)}


def build_cnn(width: float = 1.0):
    """~85k parameters at width 1: big enough that the weights, not the file's headers, set its size."""
    import keras

    c1, c2, dense = int(32 * width), int(64 * width), int(64 * width)
    inputs = keras.Input((8, 8, 1), name=INPUT_NAME)
    x = keras.layers.Conv2D(c1, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(c2, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train_digits_cnn(epochs: int = 15, seed: int = 0, width: float = 1.0):
    import keras

    keras.utils.set_random_seed(seed)
    splits = digits_splits(seed)
    model = build_cnn(width)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = splits["train"]
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model, splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/digits"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args.out.mkdir(parents=True, exist_ok=True)
    model, splits = train_digits_cnn(args.epochs, args.seed)
    model.save(args.out / "digits.keras")
    np.savez(args.out / "train.npz", **{INPUT_NAME: splits["train"][0], "y": splits["train"][1]})
    np.savez(args.out / "calib.npz", **{INPUT_NAME: splits["calib"][0]})
    np.savez(args.out / "eval.npz", **{INPUT_NAME: splits["eval"][0], "y": splits["eval"][1]})
    (args.out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    x, y = splits["eval"]
    acc = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))
    print(f"trained digits CNN ({model.count_params()} parameters), eval accuracy {acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
