"""Distillation against the same student trained on labels alone, on two teachers and several seeds.

Two digits CNN teachers (examples/digits/train.py's network, trained here on scikit-learn's bundled
digits): one outputs class scores (logits), the other probabilities (a softmax). For each seed the
distill stage runs with `edgeml optimize`'s defaults (`[distill]` in edgeml/optimizer/recipe.py)
at `--student-width`: it trains the half-width student against the teacher, then the same student
(architecture, initial weights, seed, epochs, optimizer) on the labels alone, and keeps the one
that scores higher on eval. Accuracy is on the 400 held-out eval digits, which the stage also uses
to pick each run's best epoch and the kept student (the `--eval` data of `edgeml optimize`).

    .venv/bin/python benchmarks/distill_benchmark.py [--seeds 0,1,2,3,4] [--out benchmarks/results]

Prints a Markdown table and writes it with every run's figures to --out/distill.json. Not a test:
numbers depend on the machine; quote them with the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from edgeml.core.data import Dataset  # noqa: E402
from edgeml.optimizer.recipe import DistillStage  # noqa: E402
from edgeml.optimizer.stages import distill_settings  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_teacher(output: str, splits: dict, epochs: int, seed: int = 0):
    """The digits CNN with a softmax output, or the same network ending in class scores (``logits``)."""
    import keras
    import models as digits  # examples/digits/train.py via tests/models.py

    keras.utils.set_random_seed(seed)
    model = digits.build_digits_cnn()
    logits = output == "logits"
    if logits:
        last = model.layers[-1]
        scores = keras.layers.Dense.from_config({**last.get_config(), "activation": "linear", "name": "scores"})
        model = keras.Model(model.inputs, scores(model.layers[-2].output), name="digits_cnn_logits")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
    x, y = splits["train"]
    model.fit(x, y, epochs=epochs, batch_size=32, shuffle=True, verbose=0)
    return model


def bench_teacher(output: str, splits: dict, args) -> dict:
    from edgeml.optimizer.training.distill import distill
    from edgeml.optimizer.training.keras_train import score

    import models as digits

    name = digits.INPUT_NAME
    train_ds = Dataset({name: splits["train"][0]}, splits["train"][1])
    eval_ds = Dataset({name: splits["eval"][0]}, splits["eval"][1])
    log(f"{output} teacher: training ({args.teacher_epochs} epochs)")
    teacher = train_teacher(output, splits, args.teacher_epochs)
    runs = []
    for seed in args.seeds:
        settings = distill_settings(DistillStage(student_width=args.width, epochs=args.epochs), seed)
        start = time.monotonic()
        done = distill(teacher, train_ds, eval_ds, settings)
        run = {"seed": seed, **done.details(), "kept_score": done.student_score,
               "epochs_run": {k: r.epochs_run for k, r in done.runs.items()},
               "best_epoch": {k: r.best_epoch for k, r in done.runs.items()},
               "seconds": round(time.monotonic() - start, 1)}
        log(f"  seed {seed}: {done.summary()}")
        runs.append(run)
    settings = distill_settings(DistillStage(student_width=args.width, epochs=args.epochs))
    return {"teacher": f"digits CNN, {output} output", "teacher_accuracy": score(teacher, eval_ds),
            "teacher_params": teacher.count_params(), "student_params": done.student_params,
            "settings": {"student_width": args.width, "temperature": settings.temperature, "alpha": settings.alpha,
                         "epochs": settings.train.epochs, "learning_rate": settings.train.learning_rate,
                         "patience": settings.train.patience, "batch_size": settings.train.batch_size},
            "runs": runs}


def _worst_median(values) -> str:
    return f"{min(values):.4f} / {statistics.median(values):.4f}"


def table(results: list) -> str:
    lines = ["| teacher | teacher acc | kept student worst / median | distilled worst / median | "
             "labels alone worst / median | kept: distilled / labels alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        runs = r["runs"]
        kept = [x["kept"] for x in runs]
        lines.append(
            f"| {r['teacher']} | {r['teacher_accuracy']:.4f} | {_worst_median([x['kept_score'] for x in runs])} | "
            f"{_worst_median([x['distilled_score'] for x in runs])} | "
            f"{_worst_median([x['labels_only_score'] for x in runs])} | "
            f"{kept.count('distilled')} / {kept.count('labels')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of the student runs")
    parser.add_argument("--width", type=float, default=0.5, help="the student's width multiplier")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each student run")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]

    from edgeml.optimizer.sources.tensorflow import import_tensorflow

    import models as digits

    import_tensorflow().get_logger().setLevel(logging.ERROR)  # no start-up lines, no retracing notes
    logging.getLogger("edgeml").setLevel(logging.ERROR)  # the stage's own line: this script logs each run
    splits = digits.digits_splits(0)
    results = [bench_teacher(output, splits, args) for output in ("logits", "softmax")]
    text = table(results)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    header = (f"Run {stamp}, `{' '.join(['python'] + sys.argv)}`; accuracy on 400 held-out digits over seeds "
              f"{','.join(map(str, args.seeds))}, student width {args.width}, {args.epochs} epochs\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps({"header": header.strip(), "table": text, "results": results},
                                                      indent=1, default=str))
    print(header + text)


if __name__ == "__main__":
    main()
