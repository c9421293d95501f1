"""What a person sees: a table of candidates on the terminal and a PNG plot beside the artifact."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _quality_cell(q) -> str:
    if q.accuracy is not None:
        return f"acc {q.accuracy:.4f}"
    if q.agreement is not None:
        return f"agree {q.agreement:.4f}"
    return f"cos {q.cosine:.5f}" if q.cosine is not None else "-"


def candidates_table(result):
    """A rich Table of the candidates of an OptimizeResult."""
    from rich.table import Table

    base = result.baseline
    title = f"{result.manifest['name']} v{result.manifest['version']}: candidates"
    if result.float_accuracy is not None:
        title += f" (float accuracy {result.float_accuracy:.4f})"
    table = Table(title=title)
    for col, justify in (("recipe", "left"), ("bytes", "right"), ("× fp32", "right"), ("quality", "right"),
                         ("drop", "right"), ("median ms", "right"), ("p95 ms", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for m in result.candidates:
        if m.candidate is None:
            table.add_row(m.recipe, "-", "-", "-", "-", "-", "-", "; ".join(m.notes)[:80])
            continue
        ratio = f"{m.bytes / base.bytes:.3f}" if base and base.bytes else "-"
        mark = "◀ kept" if m is result.chosen else ""
        if m.quality.drop > result.max_accuracy_drop and m.recipe != "fp32":
            mark = (mark + " over the drop limit").strip()
        table.add_row(m.recipe, _fmt_bytes(m.bytes), ratio, _quality_cell(m.quality), f"{m.quality.drop:.4f}",
                      f"{m.latency.median_ms:.3f}", f"{m.latency.p95_ms:.3f}", mark)
    return table


def plot_candidates(measured: Sequence, chosen, path: Path) -> Optional[Path]:
    """Bytes against median latency, coloured by accuracy (or agreement), the kept one circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [m for m in measured if m.candidate is not None and not math.isnan(m.latency.median_ms)]
    if not pts:
        return None
    kind = pts[0].quality.drop_kind
    label = {"accuracy": "accuracy", "agreement": "top-1 agreement with float"}.get(kind, "cosine similarity")

    def score(m):
        q = m.quality
        return q.accuracy if kind == "accuracy" else q.agreement if kind == "agreement" else q.cosine

    scores = [score(m) for m in pts]
    top = max(scores)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    # at least a 2-point colour range, so equal scores do not get an arbitrary scale
    sc = ax.scatter([m.bytes / 1024 for m in pts], [m.latency.median_ms for m in pts], c=scores, cmap="viridis",
                    vmin=min(min(scores), top - 0.02), vmax=top, s=90, edgecolors="black", linewidths=0.5)
    for m in pts:
        ax.annotate(m.recipe, (m.bytes / 1024, m.latency.median_ms), textcoords="offset points", xytext=(6, 6))
    ax.scatter([chosen.bytes / 1024], [chosen.latency.median_ms], s=320, facecolors="none",
               edgecolors="red", linewidths=1.5, label=f"kept: {chosen.recipe}")
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel("median latency, 1 thread (ms)")
    ax.set_title("candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.colorbar(sc, ax=ax, label=label)
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
