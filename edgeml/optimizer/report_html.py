"""``edgeml report``: an artifact's optimization report as one self-contained HTML page.

Everything comes from the artifact's signed manifest (what was measured, how, on what data), so
the page can be made for any artifact, on any machine, long after the build. No scripts, fonts or
images are fetched: the candidates' size/quality plot is SVG drawn here.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import List, Optional

QUALITY_KEYS = {"accuracy": "accuracy", "agreement": "agreement", "sequence": "agreement", "iou": "iou",
                "relative-error": "relative_error", "cosine": "cosine"}


def _e(value) -> str:
    return html.escape("-" if value is None else str(value))


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def quality_of(q: dict) -> tuple:
    """(label, value) of the figure that gated a candidate: the task metric ``drop_kind`` names."""
    kind = (q or {}).get("drop_kind") or "agreement"
    key = QUALITY_KEYS.get(kind, "agreement")
    value = (q or {}).get(key)
    if value is None and q:
        key, value = "cosine", q.get("cosine")
    return {"relative_error": "relative error", "iou": "IoU"}.get(key, key), value


def render(manifest: dict, *, file_bytes: Optional[int] = None, key_id: Optional[str] = None,
           overhead: Optional[dict] = None) -> str:
    m = manifest
    metrics = m.get("metrics") or {}
    kept = m.get("recipe")
    parts = [_HEAD.format(title=_e(f"{m.get('name')} v{m.get('version')}"))]
    parts.append(f"<h1>{_e(m.get('name'))} <small>v{_e(m.get('version'))}</small></h1>")
    lat = metrics.get("latency_ms") or {}
    label, value = quality_of(metrics)
    goal = "met" if metrics.get("goal_met") else "NOT met"
    parts.append(
        "<p class=summary>"
        f"{_e(m.get('format'))} model, recipe <b>{_e(kept)}</b>, {_e(_bytes(metrics.get('bytes')))} "
        f"({_num(_ratio(metrics.get('bytes'), metrics.get('fp32_bytes')), '.3f')}&times; fp32), "
        f"{_e(label)} {_num(value)}, drop {_num(metrics.get('drop'))} (goal &le; {_num(metrics.get('max_accuracy_drop'))}: "
        f"<b class={'ok' if metrics.get('goal_met') else 'bad'}>{goal}</b>), median {_num(lat.get('median_ms'), '.3f')} ms "
        f"({_num(_ratio(lat.get('median_ms'), metrics.get('fp32_latency_ms')), '.2f')}&times; fp32, "
        f"{_e(lat.get('threads'))} thread, batch {_e(lat.get('batch'))}, {_e(lat.get('runs'))} runs)."
        f"<br>Created {_e(m.get('created'))}"
        + (f"; signed by key {_e(key_id)} (check it with <code>edgeml verify</code>)" if key_id else "")
        + (f"; the file is {_e(_bytes(file_bytes))}" if file_bytes else "")
        + (f", {_num(overhead.get('overhead_percent'), '.1f')}% beyond the model's compressed bytes"
           if overhead and overhead.get("overhead_percent") is not None else "")
        + ".</p>")
    candidates = m.get("candidates") or []
    if candidates:
        parts.append("<h2>Candidates</h2>")
        parts.append(_svg_plot(candidates, kept, set(m.get("frontier") or [])))
        parts.append(_candidates_table(candidates, kept, set(m.get("frontier") or [])))
    stages = m.get("stages") or []
    if stages:
        parts.append("<h2>Training stages</h2>")
        parts.append(_stages_table(stages))
    parts.append("<h2>Tensors</h2>")
    parts.append(_tensors_table(m))
    parts.append("<h2>How it was measured</h2>")
    parts.append(_lineage(m))
    parts.append("<details><summary>The whole manifest (JSON)</summary><pre>"
                 + html.escape(json.dumps(m, indent=1, sort_keys=True, default=str)) + "</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _ratio(a, b):
    return None if a is None or not b else a / b


def _candidates_table(candidates: List[dict], kept: str, frontier: set) -> str:
    rows = ["<table class=candidates><thead><tr><th>recipe</th><th>bytes</th><th>zstd bytes</th><th>&times; fp32 zstd</th>"
            "<th>quality</th><th>drop</th><th>median ms</th><th>&times; fp32 latency</th><th></th><th>notes</th></tr></thead><tbody>"]
    for c in candidates:
        q = c.get("quality") or {}
        label, value = quality_of(q)
        ratio = c.get("ratio_to_fp32") or {}
        mark = "kept" if c.get("recipe") == kept else ("frontier" if c.get("recipe") in frontier else "")
        rows.append(
            f"<tr class='{mark}'><td>{_e(c.get('recipe'))}</td><td>{_e(c.get('bytes'))}</td><td>{_e(c.get('zstd_bytes'))}</td>"
            f"<td>{_num(ratio.get('zstd_bytes'), '.3f')}</td><td>{_e(label)} {_num(value)}</td><td>{_num(q.get('drop'))}</td>"
            f"<td>{_num((c.get('latency_ms') or {}).get('median_ms'), '.3f')}</td><td>{_num(ratio.get('latency'), '.2f')}</td>"
            f"<td>{mark}</td><td>{'<br>'.join(_e(n) for n in c.get('notes') or [])}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _stages_table(stages: List[dict]) -> str:
    rows = ["<table class=stages><thead><tr><th>stage</th><th>params</th><th>nonzero</th><th>zstd bytes</th>"
            "<th>quality</th><th>drop vs input</th><th>gate</th><th>passed</th></tr></thead><tbody>"]
    for s in stages:
        label, value = quality_of(s.get("quality") or {})
        rows.append(f"<tr><td>{_e(s.get('stage'))}</td><td>{_e(s.get('params'))}</td><td>{_e(s.get('nonzero_params'))}</td>"
                    f"<td>{_e(s.get('zstd_bytes'))}</td><td>{_e(label)} {_num(value)}</td><td>{_num(s.get('drop_vs_input'))}</td>"
                    f"<td>{_num(s.get('max_accuracy_drop'))}</td><td>{_e(s.get('passed'))}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _tensors_table(m: dict) -> str:
    rows = ["<table><thead><tr><th></th><th>name</th><th>dtype</th><th>shape</th></tr></thead><tbody>"]
    for kind in ("inputs", "outputs"):
        for t in m.get(kind) or []:
            shape = "[" + ", ".join("?" if d is None else str(d) for d in t.get("shape") or []) + "]"
            rows.append(f"<tr><td>{kind[:-1]}</td><td>{_e(t.get('name'))}</td><td>{_e(t.get('dtype'))}</td><td>{_e(shape)}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _lineage(m: dict) -> str:
    data = ((m.get("lineage") or {}).get("data")) or {}
    items = []
    for role, d in data.items():
        if isinstance(d, dict):
            items.append(f"<li>{_e(role)}: {_e(d.get('samples'))} samples of {_e(d.get('source'))} "
                         f"(seed {_e(d.get('seed'))}, sha256 <code>{_e(str(d.get('sha256'))[:16])}…</code>)</li>")
    lat = (m.get("metrics") or {}).get("latency_ms") or {}
    items.append(f"<li>latency: median of {_e(lat.get('runs'))} runs, {_e(lat.get('threads'))} thread(s), batch "
                 f"{_e(lat.get('batch'))}, on the device runtime ({_e((m.get('runtime') or {}).get('measured_with'))})</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _svg_plot(candidates: List[dict], kept: str, frontier: set, width: int = 640, height: int = 360) -> str:
    """Quality against compressed bytes (log scale), one dot per candidate; the frontier joined."""
    points = []
    for c in candidates:
        label, value = quality_of(c.get("quality") or {})
        if c.get("zstd_bytes") and value is not None and math.isfinite(value):
            points.append((c["zstd_bytes"], value, c.get("recipe"), label))
    if not points:
        return "<p>(no candidate has both a size and a quality to plot)</p>"
    left, right, top, bottom = 70, 20, 20, 50
    xs = [math.log10(p[0]) for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = min(ys), max(ys)
    pad = max((y1 - y0) * 0.1, 0.002)
    y0, y1 = y0 - pad, y1 + pad

    def sx(v):
        return left + (math.log10(v) - x0) / (x1 - x0) * (width - left - right)

    def sy(v):
        return top + (y1 - v) / (y1 - y0) * (height - top - bottom)

    out = [f"<svg class=plot xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='quality against compressed bytes'>",
           f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' class=axis />",
           f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' class=axis />",
           f"<text x='{(left + width - right) / 2}' y='{height - 12}' text-anchor='middle'>compressed bytes (zstd, log scale)</text>",
           f"<text x='16' y='{(top + height - bottom) / 2}' transform='rotate(-90 16 {(top + height - bottom) / 2})' "
           f"text-anchor='middle'>{_e(points[0][3])}</text>"]
    for v in (y0 + pad, (y0 + y1) / 2, y1 - pad):
        out.append(f"<text x='{left - 6}' y='{sy(v) + 4:.1f}' text-anchor='end' class=tick>{v:.4f}</text>")
    for b in sorted({p[0] for p in points}):
        out.append(f"<text x='{sx(b):.1f}' y='{height - bottom + 16}' text-anchor='middle' class=tick>{_e(_bytes(b))}</text>")
    front = sorted((p for p in points if p[2] in frontier), key=lambda p: p[0])
    if len(front) > 1:
        path = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in front)
        out.append(f"<polyline points='{path}' class=frontier />")
    for b, q, recipe, _ in points:
        cls = "kept" if recipe == kept else ("frontier" if recipe in frontier else "other")
        out.append(f"<circle cx='{sx(b):.1f}' cy='{sy(q):.1f}' r='6' class='{cls}'><title>{_e(recipe)}: "
                   f"{_e(_bytes(b))}, {q:.4f}</title></circle>")
        out.append(f"<text x='{sx(b) + 9:.1f}' y='{sy(q) - 8:.1f}' class=label>{_e(recipe)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def write_report(artifact, output) -> dict:
    """Read ``artifact`` (integrity checked), write the page to ``output`` atomically."""
    from edgeml.core.artifact import overhead, read_artifact
    from edgeml.core.atomic import write_atomic

    from .config import check_writable

    art = read_artifact(artifact)
    check_writable(Path(output).parent)
    page = render(art.manifest, file_bytes=art.size, key_id=art.key_id, overhead=overhead(artifact))
    write_atomic(Path(output), page.encode("utf-8"))
    return {"ok": True, "artifact": str(artifact), "report": str(output), "bytes": len(page.encode("utf-8")),
            "candidates": len(art.manifest.get("candidates") or []), "kept": art.manifest.get("recipe")}


_HEAD = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>edgeml report: {title}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #1b1b1b; }}
h1 small {{ color: #666; font-weight: normal; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; vertical-align: top; }}
th:first-child, td:first-child, td:last-child {{ text-align: left; }}
tr.kept {{ background: #e7f5e9; font-weight: 600; }}
tr.frontier {{ background: #f3f7fc; }}
.ok {{ color: #1a7f37; }} .bad {{ color: #b42318; }}
svg.plot {{ border: 1px solid #eee; }} .axis {{ stroke: #444; }} .tick, .label {{ font-size: 12px; }}
circle.kept {{ fill: #1a7f37; }} circle.frontier {{ fill: #2f6fb0; }} circle.other {{ fill: #999; }}
polyline.frontier {{ fill: none; stroke: #2f6fb0; stroke-dasharray: 4 3; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; font-size: 12px; }}
</style></head><body>"""
