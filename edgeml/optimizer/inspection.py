"""``edgeml inspect``: what an artifact holds, as a dict and as a readable summary."""
from __future__ import annotations

from pathlib import Path


def describe(path) -> dict:
    """Integrity-checked summary of an artifact (the signature is checked by ``verify``)."""
    from edgeml.core.artifact import read_artifact

    art = read_artifact(path)
    m = art.manifest
    return {
        "ok": True,
        "artifact": str(Path(path)),
        "file_bytes": art.size,  # what a device downloads
        "compressed": art.compressed,
        "unpacked_bytes": art.content_size,
        "model_bytes": len(art.model),
        "key_id": art.key_id,
        "signature_verified": False,
        "manifest": m,
    }


def render(info: dict, out) -> None:
    """Print ``describe``'s summary on a rich console."""
    from rich.table import Table

    m = info["manifest"]
    metrics = m.get("metrics", {})
    out.print(f"[bold]{m['name']}[/] v{m['version']}  {m.get('format')}  recipe {m.get('recipe')}  "
              f"signed by key {info['key_id']} (not checked: use edgeml verify)")
    packing = f"zstd, {info['unpacked_bytes']} unpacked" if info.get("compressed") else "uncompressed"
    out.print(f"file {info['file_bytes']} bytes to ship ({packing}), model {info['model_bytes']} bytes, "
              f"created {m.get('created')}")
    io = Table(title="tensors")
    for col in ("", "name", "dtype", "shape", "quantization"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for s in m.get(kind, []):
            quant = "" if s.get("scale") is None else f"scale {s['scale']:.6g}, zero point {s['zero_point']}"
            shape = "[" + ", ".join("?" if d is None else str(d) for d in s["shape"]) + "]"
            io.add_row(kind[:-1], s["name"], s["dtype"], shape, quant)
    out.print(io)
    lat = metrics.get("latency_ms", {})
    figures = Table(title="measured")
    for col in ("bytes", "accuracy", "float accuracy", "agreement", "cosine", "IoU", "rel. error", "drop", "metric",
                "median ms", "p95 ms", "goal met"):
        figures.add_column(col, justify="right")

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    figures.add_row(str(metrics.get("bytes")), f(metrics.get("accuracy")), f(metrics.get("float_accuracy")),
                    f(metrics.get("agreement")), f(metrics.get("cosine"), ".5f"), f(metrics.get("iou")),
                    f(metrics.get("relative_error")), f(metrics.get("drop")), str(metrics.get("drop_kind", "-")),
                    f(lat.get("median_ms"), ".3f"), f(lat.get("p95_ms"), ".3f"), str(metrics.get("goal_met")))
    out.print(figures)
    stages = m.get("stages") or []
    if stages:
        out.print("stages: " + " -> ".join(
            f"{s['stage']} ({s['nonzero_params']:,}/{s['params']:,} nonzero, {s['zstd_bytes']} zstd bytes"
            f"{'' if s['passed'] else ', rejected'})" for s in stages) + f" -> {m.get('recipe')}")
    src = m.get("lineage", {}).get("source", {})
    out.print(f"source {src.get('file')} ({src.get('kind')}, sha256 {str(src.get('sha256'))[:16]}…)")
