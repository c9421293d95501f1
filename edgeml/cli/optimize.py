"""``edgeml optimize``: a model in, a signed, measured artifact out (``edgeml.optimizer``)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeml.core.errors import AccuracyGoalNotMet
from edgeml.tracking import TrackingError

from .common import emit, json_option, stderr_console, stdout_console


def _layer_sparsity(ctx, param, values):
    """--layer-sparsity NAME=S, repeated."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} should look like dense_1=0.5 (layer name = sparsity)")
    return out


@click.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .edgeml file to write.")
@click.option("--key", type=click.Path(path_type=Path), help="Private signing key (edgeml keys generate).")
@click.option("--recipe", type=click.Choice(["auto", "fp32", "float16", "dynamic", "int8", "int8-weights"]),
              help="What to build [default: the recipe file's, else auto].")
@click.option("--format", "fmt", type=click.Choice(["tflite", "onnx"]),
              help="Model format in the artifact [default: tflite for Keras/SavedModel, onnx for ONNX].")
@click.option("--calibration", help="Calibration data: a .npz or module:function (needed by int8).")
@click.option("--eval", "eval_data", help="Evaluation data: a .npz or module:function; 'y' holds labels.")
@click.option("--max-accuracy-drop", type=float,
              help="Largest accepted drop of the quantize step (0.01 = one point of accuracy or 1% disagreement) "
                   "[default: the recipe file's, else 0.01].")
@click.option("--metric", metavar="KIND",
              help="What the drop measures: accuracy, agreement (top-1), sequence (per-position agreement), iou "
                   "(iou@0.3 sets the mask threshold), cosine or relative-error [default: auto, read off each output].")
@click.option("--name", help="Artifact name [default: the model file's stem].")
@click.option("--version", "version", type=int, default=1, show_default=True, help="Artifact version (monotonic).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data sampling and training.")
@click.option("--calibration-samples", type=int, default=300, show_default=True)
@click.option("--eval-samples", type=int, default=1000, show_default=True)
@click.option("--latency-runs", type=int, default=50, show_default=True)
@click.option("--labels", type=click.Path(path_type=Path), help="Text file with one class label per line.")
@click.option("--preprocessing", type=click.Path(path_type=Path), help="JSON describing input preprocessing.")
@click.option("--no-plot", is_flag=True, help="Do not write the candidates plot.")
@click.option("--recipe-file", type=click.Path(path_type=Path),
              help="TOML recipe chaining distill -> prune -> quantize (flags override it).")
@click.option("--train", "train_data", help="Training data with labels 'y' (needed to distill or prune).")
@click.option("--prune", type=float, help="Target sparsity, the share of weights set to zero, in [0, 1).")
@click.option("--prune-schedule", type=click.Choice(["constant", "polynomial"]),
              help="How sparsity rises while fine-tuning [default: polynomial].")
@click.option("--structured", help="N:M sparsity such as 2:4 (at most N nonzeros in each group of M).")
@click.option("--layer-sparsity", multiple=True, callback=_layer_sparsity, metavar="LAYER=S",
              help="Per-layer target, repeatable (0 leaves a layer dense).")
@click.option("--student", type=click.Path(path_type=Path), help="Student .keras file to distill into.")
@click.option("--student-width", type=float, help="Make the student from the teacher, every layer this wide, in (0, 1).")
@click.option("--temperature", type=float, help="Distillation temperature [default: 4].")
@click.option("--alpha", type=float, help="Weight of the label loss against the teacher's [default: 0.1].")
@click.option("--epochs", type=int, help="Training epochs of each stage [default: 30 distill, 10 prune].")
@click.option("--batch-size", type=int, help="Training batch size [default: 64].")
@click.option("--learning-rate", type=float, help="Adam learning rate [default: 0.001].")
@click.option("--patience", type=int, help="Stop after this many epochs without a better eval score [default: 3].")
@click.option("--tuner", type=click.Choice(["inc"]),
              help="Accuracy-aware int8 tuning with Intel Neural Compressor (ONNX; see README).")
@click.option("--mlflow", "track", is_flag=True,
              help="Record the run in MLflow at MLFLOW_TRACKING_URI: parameters, metrics per candidate, artifacts.")
@click.option("--experiment", help="MLflow experiment of the run [default: the source run's, else 'edgeml'].")
@click.option("--register", metavar="NAME", help="Register the signed artifact as a new version of NAME in MLflow.")
@json_option
def optimize(model, output, key, recipe, fmt, calibration, eval_data, max_accuracy_drop, metric, name, version, seed,
             calibration_samples, eval_samples, latency_runs, labels, preprocessing, no_plot, recipe_file,
             train_data, prune, prune_schedule, structured, layer_sparsity, student, student_width, temperature,
             alpha, epochs, batch_size, learning_rate, patience, tuner, track, experiment, register, as_json) -> None:
    """Turn MODEL (.keras, SavedModel dir, .onnx, or an MLflow models:/ or runs:/ URI) into a signed,
    measured artifact."""
    from edgeml.optimizer.config import OptimizeConfig
    from edgeml.optimizer.job import optimize as run_optimize

    config = OptimizeConfig(model=model, output=output, key=key, recipe=recipe, format=fmt,
                            calibration=calibration, eval=eval_data, max_accuracy_drop=max_accuracy_drop, metric=metric,
                            name=name, version=version, seed=seed, calibration_samples=calibration_samples,
                            eval_samples=eval_samples, latency_runs=latency_runs, labels=labels,
                            preprocessing=preprocessing, plot=not no_plot, recipe_file=recipe_file,
                            train=train_data, prune=prune, prune_schedule=prune_schedule, structured=structured,
                            layer_sparsity=layer_sparsity, student=student, student_width=student_width,
                            temperature=temperature, alpha=alpha, epochs=epochs, batch_size=batch_size,
                            learning_rate=learning_rate, patience=patience, tuner=tuner, mlflow=track,
                            experiment=experiment, register=register)
    console = stderr_console()
    try:
        with _progress(console) as step:
            result = run_optimize(config, on_step=step)
    except (AccuracyGoalNotMet, TrackingError) as exc:  # the artifact was written: show what it is
        if exc.result is not None:
            _show_result(exc.result, as_json)
        raise
    _show_result(result, as_json)


def _show_result(result, as_json) -> None:
    from edgeml.optimizer.report import candidates_table, stages_table

    if as_json:
        emit(result.to_dict())
        return
    out = stdout_console()
    if result.stages:
        out.print(stages_table(result))
    out.print(candidates_table(result))
    c = result.chosen
    out.print(f"kept [bold]{c.recipe}[/]: {c.bytes} bytes ({c.zstd_bytes} zstd), drop {c.quality.drop:.4f} "
              f"({c.quality.drop_kind}), median {c.latency.median_ms:.3f} ms -> {result.artifact} "
              f"({result.artifact_bytes} bytes to ship)")
    if result.plot:
        out.print(f"plot: {result.plot}")
    if result.mlflow and result.mlflow.get("run_id") and not result.tracking_error:
        out.print(f"MLflow run {result.mlflow['run_id']} at {result.mlflow['tracking_uri']}")
        reg = result.mlflow.get("registered")
        if reg:
            out.print(f"registered as {reg['uri']}")


class _progress:
    """A spinner with the current step on stderr; quiet when stderr is not a terminal."""

    def __init__(self, console):
        self.console = console
        self.progress = None

    def __enter__(self):
        if not self.console.is_terminal:  # a log file gets plain lines, not cursor movements
            return lambda description: print(f"... {description}", file=sys.stderr, flush=True)
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=self.console, transient=True)
        self.progress.__enter__()
        self.task = None
        self.current = None

        def step(description: str) -> None:
            stage = description.split(":")[0]
            if self.task is not None and stage == self.current and ":" in description:
                self.progress.update(self.task, description=description)  # epochs update one line
                return
            self.current = stage
            if self.task is not None:
                self.progress.update(self.task, completed=1)
                self.progress.stop_task(self.task)
            self.task = self.progress.add_task(description, total=1)

        return step

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc) if self.progress else False
