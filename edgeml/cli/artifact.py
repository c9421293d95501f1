"""``edgeml inspect``, ``verify`` and ``bench``: look at, check and measure an artifact."""
from __future__ import annotations

from pathlib import Path

import click

from .common import emit, json_option, stdout_console


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@json_option
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what an artifact holds (integrity checked; use verify for the signature)."""
    from edgeml.core.artifact import overhead
    from edgeml.optimizer.inspection import describe

    info = describe(artifact)
    info["overhead"] = overhead(artifact)
    if as_json:
        emit(info)
        return
    from edgeml.optimizer.inspection import render

    out = stdout_console()
    render(info, out)
    out.print(_overhead_line(info["overhead"]))


def _overhead_line(o: dict) -> str:
    refs = ", ".join(f"{name}: {kind}" for name, kind in o["references"].items())
    pct = "-" if o["overhead_percent"] is None else f"{o['overhead_percent']:.1f}%"
    verdict = "within" if o["within_budget"] else "[bold red]over[/]"
    return (f"overhead {o['overhead_bytes']} bytes on top of the model's {o['model_zstd_bytes']} zstd bytes ({pct}; "
            f"{verdict} the budget of {o['budget_bytes']}): self-test {o['selftest_bytes']} "
            f"({o['selftest_samples']} samples; {refs}), manifest, signature and baseline {o['metadata_bytes']}")


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), required=True, help="signing.pub of the signer.")
@click.option("--no-selftest", is_flag=True, help="Only check the signature and hashes.")
@json_option
def verify(artifact: Path, public_key: Path, no_selftest: bool, as_json: bool) -> None:
    """Check an artifact's signature, every member's hash, and its self-test."""
    from edgeml.core.artifact import verify_artifact
    from edgeml.core.selftest import run_selftest

    art = verify_artifact(artifact, public_key)
    info = {"ok": True, "artifact": str(artifact), "name": art.manifest["name"], "version": art.manifest["version"],
            "key_id": art.key_id, "signature": "valid", "selftest": None}
    if not no_selftest:
        advice = "the model does not reproduce its reference outputs on this machine's runtime"
        info["selftest"] = run_selftest(art).require_ok(advice).to_dict()
    if as_json:
        emit(info)
    else:
        extra = "" if no_selftest else f"; self-test passed ({info['selftest']['samples']} samples)"
        click.echo(f"OK: {info['name']} v{info['version']} signed by key {art.key_id}, every member intact{extra}")


@click.command()
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
        emit({"ok": True, **result})
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


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The HTML file to write.")
@json_option
def report(artifact: Path, output: Path, as_json: bool) -> None:
    """Write an artifact's optimization report (candidates, plot, stages, manifest) as one HTML page."""
    from edgeml.optimizer.report_html import write_report

    result = write_report(artifact, output)
    if as_json:
        emit(result)
    else:
        click.echo(f"wrote {result['report']} ({result['bytes']} bytes, {result['candidates']} candidates, kept "
                   f"{result['kept']})")
