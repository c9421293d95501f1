"""The ``edgeml`` command: a thin layer over the library (see docs/cli.md for exit codes)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from edgeml.core.errors import AccuracyGoalNotMet, EdgemlError

log = logging.getLogger("edgeml")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout, nothing else.")


def _emit(obj) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def _console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    """Rich console for results; wide enough for the tables when stdout is a file or a pipe."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeml")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Optimize, sign, inspect and measure models for small devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@cli.group()
def keys() -> None:
    """Manage Ed25519 signing keys."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              help="Folder for signing.key and signing.pub.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@json_option
def keys_generate(out_dir: Path, force: bool, as_json: bool) -> None:
    """Write a new signing key pair (signing.key stays on the build machine)."""
    from edgeml.core.signing import generate_keys, key_id, load_public_key

    private, public = generate_keys(out_dir, force=force)
    info = {"ok": True, "private_key": str(private), "public_key": str(public),
            "key_id": key_id(load_public_key(public))}
    if as_json:
        _emit(info)
    else:
        click.echo(f"wrote {private} (keep it secret) and {public} (give it to devices); key id {info['key_id']}")


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


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .edgeml file to write.")
@click.option("--key", type=click.Path(path_type=Path), help="Private signing key (edgeml keys generate).")
@click.option("--recipe", type=click.Choice(["auto", "fp32", "float16", "dynamic", "int8"]),
              help="What to build [default: the recipe file's, else auto].")
@click.option("--format", "fmt", type=click.Choice(["tflite", "onnx"]),
              help="Model format in the artifact [default: tflite for Keras/SavedModel, onnx for ONNX].")
@click.option("--calibration", help="Calibration data: a .npz or module:function (needed by int8).")
@click.option("--eval", "eval_data", help="Evaluation data: a .npz or module:function; 'y' holds labels.")
@click.option("--max-accuracy-drop", type=float,
              help="Largest accepted drop of the quantize step (0.01 = one point of accuracy or 1% disagreement) "
                   "[default: the recipe file's, else 0.01].")
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
@json_option
def optimize(model, output, key, recipe, fmt, calibration, eval_data, max_accuracy_drop, name, version, seed,
             calibration_samples, eval_samples, latency_runs, labels, preprocessing, no_plot, recipe_file,
             train_data, prune, prune_schedule, structured, layer_sparsity, student, student_width, temperature,
             alpha, epochs, batch_size, learning_rate, patience, tuner, as_json) -> None:
    """Turn MODEL (.keras, SavedModel dir or .onnx) into a signed, measured artifact."""
    from edgeml.optimizer.config import OptimizeConfig
    from edgeml.optimizer.job import optimize as run_optimize

    config = OptimizeConfig(model=model, output=output, key=key, recipe=recipe, format=fmt,
                            calibration=calibration, eval=eval_data, max_accuracy_drop=max_accuracy_drop,
                            name=name, version=version, seed=seed, calibration_samples=calibration_samples,
                            eval_samples=eval_samples, latency_runs=latency_runs, labels=labels,
                            preprocessing=preprocessing, plot=not no_plot, recipe_file=recipe_file,
                            train=train_data, prune=prune, prune_schedule=prune_schedule, structured=structured,
                            layer_sparsity=layer_sparsity, student=student, student_width=student_width,
                            temperature=temperature, alpha=alpha, epochs=epochs, batch_size=batch_size,
                            learning_rate=learning_rate, patience=patience, tuner=tuner)
    console = _console()
    try:
        with _progress(console) as step:
            result = run_optimize(config, on_step=step)
    except AccuracyGoalNotMet as exc:
        if exc.result is not None:
            _show_result(exc.result, as_json)
        raise
    _show_result(result, as_json)


def _show_result(result, as_json) -> None:
    from edgeml.optimizer.report import candidates_table, stages_table

    if as_json:
        _emit(result.to_dict())
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


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@json_option
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what an artifact holds (integrity checked; use verify for the signature)."""
    from edgeml.optimizer.inspection import describe

    info = describe(artifact)
    if as_json:
        _emit(info)
        return
    from edgeml.optimizer.inspection import render

    render(info, stdout_console())


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), required=True, help="signing.pub of the signer.")
@click.option("--no-selftest", is_flag=True, help="Only check the signature and hashes.")
@json_option
def verify(artifact: Path, public_key: Path, no_selftest: bool, as_json: bool) -> None:
    """Check an artifact's signature, every member's hash, and its self-test."""
    from edgeml.core.artifact import verify_artifact
    from edgeml.core.errors import VerificationError
    from edgeml.core.selftest import run_selftest

    art = verify_artifact(artifact, public_key)
    info = {"ok": True, "artifact": str(artifact), "name": art.manifest["name"], "version": art.manifest["version"],
            "key_id": art.key_id, "signature": "valid", "selftest": None}
    if not no_selftest:
        st = run_selftest(art)
        info["selftest"] = st.to_dict()
        if not st.ok:
            raise VerificationError(
                f"self-test failed on output '{st.failed_output}': max error {st.max_abs_error:.3g} > {st.atol:.3g}; "
                "the model does not reproduce its reference outputs on this machine's runtime")
    if as_json:
        _emit(info)
    else:
        extra = "" if no_selftest else f"; self-test passed ({info['selftest']['samples']} samples)"
        click.echo(f"OK: {info['name']} v{info['version']} signed by key {art.key_id}, every member intact{extra}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="A .npz or module:function; 'y' holds labels.")
@click.option("--public-key", type=click.Path(path_type=Path), help="Also verify the signature.")
@click.option("--runs", type=int, default=100, show_default=True, help="Timed single-sample runs.")
@click.option("--samples", type=int, default=1000, show_default=True, help="At most this many samples (seeded).")
@json_option
def bench(artifact: Path, data: str, public_key, runs: int, samples: int, as_json: bool) -> None:
    """Measure an artifact with the device's runtime: accuracy, latency, bytes."""
    from edgeml.optimizer.bench import bench as run_bench

    result = run_bench(artifact, data, public_key=public_key, runs=runs, samples=samples)
    if as_json:
        _emit({"ok": True, **result})
        return
    from rich.table import Table

    table = Table(title=f"{result['name']} v{result['version']} on {result['runtime']} (1 thread)")
    for col in ("model bytes", "file bytes", "accuracy", "median ms", "p95 ms", "runs", "self-test"):
        table.add_column(col, justify="right")
    lat = result["latency_ms"]
    acc = "-" if result["accuracy"] is None else f"{result['accuracy']:.4f}"
    table.add_row(str(result["model_bytes"]), str(result["file_bytes"]), acc, f"{lat['median_ms']:.3f}",
                  f"{lat['p95_ms']:.3f}", str(lat["runs"]), "pass" if result["selftest"]["ok"] else "FAIL")
    stdout_console().print(table)


@cli.group()
def fleet() -> None:
    """Collect device telemetry over MQTT; list a fleet's devices."""


db_option = click.option("--db", "db_url", required=True, metavar="URL",
                         help="sqlite:///path.db (sqlite:////abs/path.db) or postgresql://user@host:port/db.")


@fleet.command("collect")
@click.option("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port].")
@db_option
@click.option("--username", help="MQTT user name.")
@click.option("--password-file", type=click.Path(path_type=Path), help="File whose first line is the MQTT password.")
@click.option("--ca-file", type=click.Path(path_type=Path), help="CA certificate to check the broker by (mqtts).")
@click.option("--cert-file", type=click.Path(path_type=Path), help="Client certificate (mqtts).")
@click.option("--key-file", type=click.Path(path_type=Path), help="Private key of the client certificate (mqtts).")
@click.option("--group", default="collectors", show_default=True,
              help="Shared-subscription group; collectors in one group split the telemetry.")
@click.option("--client-id", help="MQTT client id, the same on every restart [default: edgeml-collector-GROUP-HOST].")
@json_option
def fleet_collect(broker, db_url, username, password_file, ca_file, cert_file, key_file, group, client_id,
                  as_json) -> None:
    """Store every device's telemetry, presence and state until SIGTERM or Ctrl-C."""
    from edgeml.fleet import open_store
    from edgeml.fleet.collector import Collector, parse_broker_url, serve

    parse_broker_url(broker)  # a wrong URL fails before the database file is created
    password = _read_password(password_file, username)
    with open_store(db_url) as store:
        collector = Collector(broker, store, username=username, password=password, ca_file=ca_file,
                              cert_file=cert_file, key_file=key_file, group=group, client_id=client_id)
        click.echo(f"collecting from {broker} as {collector.client_id}; stop with SIGTERM or Ctrl-C", err=True)
        stats = serve(collector, on_progress=_every(10.0, lambda s: click.echo(_stats_line(s), err=True)))
    if as_json:
        _emit({"ok": True, **stats})
    else:
        click.echo(f"stopped: {_stats_line(stats)}")


def _read_password(path, username):
    from edgeml.core.errors import InputError, UsageError

    if path is None:
        return None
    if username is None:
        raise UsageError("--password-file needs --username")
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read --password-file {path}: {exc.strerror}") from exc
    return lines[0] if lines else ""


def _every(seconds: float, show):
    """``show`` at most once every ``seconds``: progress lines for a long-running command."""
    import time

    last = [float("-inf")]

    def maybe(stats) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            show(stats)

    return maybe


def _stats_line(stats: dict) -> str:
    return (f"{stats['inserted']} records stored from {stats['batches']} batches, {stats['duplicates']} duplicates "
            f"skipped, {stats['rejected']} messages rejected, {stats['presence']} presence and "
            f"{stats['state']} state updates")


@fleet.command("devices")
@db_option
@json_option
def fleet_devices(db_url: str, as_json: bool) -> None:
    """List the devices a collector has seen: presence, model, requests, errors, drops."""
    from edgeml.fleet import open_store

    with open_store(db_url, create=False) as store:
        devices = store.devices()
    if as_json:
        _emit({"ok": True, "devices": devices})
        return
    from rich.table import Table

    table = Table(title=f"{len(devices)} devices")
    for col in ("fleet", "device", "presence", "model", "last seen (UTC)", "requests", "errors", "dropped"):
        table.add_column(col, justify="right" if col in ("requests", "errors", "dropped") else "left")
    for d in devices:
        model = "-" if d["model_name"] is None else f"{d['model_name']} v{d['model_version']}"
        seen = "-" if d["last_seen"] is None else d["last_seen"][:19].replace("T", " ")
        table.add_row(d["fleet"], d["device"], d["presence"] or "?", model, seen, str(d["requests"]),
                      str(d["errors"]), str(d["dropped"]))
    stdout_console().print(table)


def main(argv=None) -> int:
    """Entry point: runs the CLI and turns every error into one line and an exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ logs are noise to a user
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        cli.main(args=argv, prog_name="edgeml", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        if as_json:
            _emit({"ok": False, "error": {"type": "UsageError", "message": exc.format_message(), "exit_code": exc.exit_code}})
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except EdgemlError as exc:
        click.echo(f"error: {exc}", err=True)
        if as_json and not isinstance(exc, AccuracyGoalNotMet):
            _emit({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}})
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback for -vv
        log.debug("internal error", exc_info=True)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with -vv for a traceback; please report it)", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
