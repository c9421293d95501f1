"""What a person sees: a table of candidates on the terminal and a PNG plot beside the artifact."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _quality_cell(q) -> str:
    """The figure in the task metric that gates (``q.drop_kind``)."""
    kind = q.drop_kind
    if kind == "accuracy" and q.accuracy is not None:
        return f"acc {q.accuracy:.4f}"
    if kind == "sequence" and q.agreement is not None:
        return f"per-pos {q.agreement:.4f}"
    if kind == "iou" and q.iou is not None:
        return f"IoU {q.iou:.4f}"
    if kind == "relative-error" and q.relative_error is not None:
        return f"rel.err {q.relative_error:.4f}"
    if kind == "agreement" and q.agreement is not None:
        return f"agree {q.agreement:.4f}"
    return f"cos {q.cosine:.5f}" if q.cosine is not None else "-"


def _ratio(n: int, base) -> str:
    return f"{n / base.bytes:.3f}" if base and base.bytes else "-"


def stages_table(result):
    """The training stages: each stage's model as fp32, against its input and the user's model."""
    from rich.table import Table

    base = result.baseline
    table = Table(title="stages (each model built as fp32; ratios to the original fp32)")
    for col in ("stage", "params", "nonzero", "bytes", "zstd", "zstd × fp32", "quality", "drop vs input",
                "gate", "median ms", ""):
        table.add_column(col, justify="left" if col in ("stage", "") else "right")
    for s in result.stages:
        m = s.measured
        gate = "-" if s.max_drop is None else f"≤ {s.max_drop:g}"
        verdict = "" if s.stage == "original" else ("passed" if s.passed else "rejected, its input kept")
        if s.details.get("kept") == "labels":
            verdict += " (the student trained on labels alone scored higher and was kept)"
        table.add_row(s.stage, f"{s.params:,}", f"{s.nonzero_params:,}", _fmt_bytes(m.bytes), _fmt_bytes(m.zstd_bytes),
                      _ratio(m.zstd_bytes, base), _quality_cell(m.quality),
                      "-" if s.stage == "original" else f"{s.drop:.4f}", gate, f"{m.latency.median_ms:.3f}", verdict)
    return table


def candidates_table(result):
    """A rich Table of the candidates of an OptimizeResult."""
    from rich.table import Table

    base = result.baseline
    title = f"{result.manifest['name']} v{result.manifest['version']}: candidates"
    if result.stages:
        title += f" of the {[s for s in result.stages if s.passed][-1].stage} model"
    if result.float_accuracy is not None:
        title += f" (float accuracy {result.float_accuracy:.4f})"
    table = Table(title=title)
    columns = ["recipe", "bytes", "× fp32", "zstd", "zstd × fp32", "quality", "drop"]
    if result.stages:
        columns.append("total drop")
    columns += ["median ms", "p95 ms", ""]
    for col in columns:
        table.add_column(col, justify="left" if col in ("recipe", "") else "right")
    for m in result.candidates:
        if m.candidate is None:
            table.add_row(m.recipe, *["-"] * (len(columns) - 2), "; ".join(m.notes)[:80])
            continue
        mark = "◀ kept" if m is result.chosen else ""
        if m.quality.drop > result.max_accuracy_drop and m.recipe != "fp32":
            mark = (mark + " over the drop limit").strip()
        row = [m.recipe, _fmt_bytes(m.bytes), _ratio(m.bytes, base), _fmt_bytes(m.zstd_bytes), _ratio(m.zstd_bytes, base),
               _quality_cell(m.quality), f"{m.quality.drop:.4f}"]
        if result.stages:
            row.append(f"{m.total.drop:.4f}" if m.total is not None else "-")
        table.add_row(*row, f"{m.latency.median_ms:.3f}", f"{m.latency.p95_ms:.3f}", mark)
    if result.artifact_bytes and result.chosen.zstd_bytes:
        table.caption = artifact_caption(result.artifact_bytes, result.chosen.zstd_bytes)
    return table


def artifact_caption(file_bytes: int, model_zstd_bytes: int) -> str:
    """The whole file, not just the model: what the self-test, manifest and signature add."""
    extra = file_bytes - model_zstd_bytes
    return (f"artifact {_fmt_bytes(file_bytes)} = kept model {_fmt_bytes(model_zstd_bytes)} zstd + "
            f"{_fmt_bytes(extra)} self-test and metadata ({100.0 * extra / model_zstd_bytes:.1f}%)")


def _score(q, kind: str):
    if kind == "iou":
        return q.iou
    if kind == "relative-error":
        return None if q.relative_error is None else 1.0 - q.relative_error
    return q.accuracy if kind == "accuracy" else q.agreement if kind in ("agreement", "sequence") else q.cosine


def plot_candidates(result, path: Path) -> Optional[Path]:
    """Transfer size (zstd) against quality for every stage and candidate; the frontier drawn, the kept one circled.

    Quality is against the user's model (a candidate built after training stages is placed by its
    total drop), so stages and candidates share one axis. Labels carry the median latency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(f"{s.stage} fp32", s.measured, s.measured.quality, "s") for s in result.stages if s.stage != "original"]
    base = result.baseline
    if result.stages:
        points.insert(0, ("original fp32", base, base.quality, "s"))
    for m in result.candidates:
        if result.stages and m.recipe == "fp32":
            continue  # the same model as the last stage's square
        if m.candidate is not None and not math.isnan(m.latency.median_ms):
            points.append((m.recipe, m, m.total if m.total is not None else m.quality, "o"))
    if not points:
        return None
    kind = points[0][2].drop_kind
    label = {"accuracy": "accuracy", "agreement": "top-1 agreement with float",
             "sequence": "per-position agreement with float", "iou": "mask IoU with float",
             "relative-error": "1 - relative error against float"}.get(kind, "cosine similarity")
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    for name, m, q, marker in points:
        ax.scatter([m.zstd_bytes / 1024], [_score(q, kind)], marker=marker, s=80, edgecolors="black", linewidths=0.5,
                   color="tab:orange" if marker == "s" else "tab:blue")
        ax.annotate(f"{name}\n{m.latency.median_ms:.3g} ms", (m.zstd_bytes / 1024, _score(q, kind)),
                    textcoords="offset points", xytext=(6, 4), fontsize=7)
    front = _frontier([(m.zstd_bytes / 1024, _score(q, kind)) for _, m, q, _ in points])
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:green", alpha=0.7,
            label="frontier (smaller and at least as good)")
    chosen_q = result.chosen.total if result.chosen.total is not None else result.chosen.quality
    ax.scatter([result.chosen.zstd_bytes / 1024], [_score(chosen_q, kind)], s=320, facecolors="none",
               edgecolors="red", linewidths=1.5, label=f"kept: {result.chosen.recipe}")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("transfer size, zstd (KiB, log scale)")
    ax.set_ylabel(label + (" (vs the original model)" if result.stages else ""))
    ax.set_title("stages (squares) and candidates (circles)" if result.stages else "candidates")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _frontier(points):
    """Points no other point beats on both size (smaller) and score (higher), by size."""
    best, front = -math.inf, []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front
