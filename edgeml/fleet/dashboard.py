"""The dashboard of ``fleet serve --http``: devices, rollouts, shadow evaluations, alerts, drift
and traffic on one page, rendered here from the store (no front-end build, no third-party
script: the charts are SVG drawn here), kept live by server-sent events (``/events``: the
sections, re-rendered every ``interval`` seconds, replace themselves in the page).

Bound to loopback it is open; on any other address ``fleet serve`` refuses to start without a
token, which every page then needs (``?token=`` once, kept in a cookie, or ``Authorization:
Bearer``). Actions (pause, resume, abort a rollout; promote a shadow, when ``fleet serve`` has
``--signing-key``) always need the token.
"""
from __future__ import annotations

import hmac
import html
import json
import threading
import time
from typing import Dict, List, Optional

from .drift import describe_feature

SECTIONS = ("devices", "rollouts", "shadow", "alerts", "drift", "traffic")
COOKIE = "edgeml_token"


def _e(v) -> str:
    return html.escape("-" if v is None else str(v))


def sections(store, now: Optional[float] = None) -> Dict[str, str]:
    """Each section's HTML, from what the store holds now."""
    from .drift import alerts, fleet_drift

    now = time.time() if now is None else now
    devices = store.devices()
    listed = alerts(store)["alerts"]
    open_by_device: Dict[tuple, int] = {}
    for a in listed:
        if a["state"] == "open":
            open_by_device[(a["fleet"], a["device"])] = open_by_device.get((a["fleet"], a["device"]), 0) + 1
    out = {"devices": _devices(devices, open_by_device), "rollouts": _rollouts(store), "shadow": _shadow(store),
           "alerts": _alerts(listed)}
    fleets = sorted({d["fleet"] for d in devices})
    drift_rows = []
    for fleet in fleets:
        drift_rows += [dict(r, fleet=fleet) for r in fleet_drift(store, fleet, by="device", since_s=3600)["rows"]]
    out["drift"] = _drift(drift_rows)
    out["traffic"] = _traffic(store, now)
    return out


def _devices(devices: List[dict], open_alerts: Dict[tuple, int]) -> str:
    if not devices:
        return "<p class=empty>No device has reported yet.</p>"
    rows = ["<table id=devices-table><thead><tr><th>fleet</th><th>device</th><th>presence</th><th>model</th>"
            "<th>update</th><th>requests</th><th>errors</th><th>open alerts</th><th>last seen (UTC)</th></tr></thead><tbody>"]
    for d in devices:
        update = d["update_state"] or "-"
        if d.get("progress"):
            update += f" {d['progress']['blocks_done']}/{d['progress']['blocks']} blocks"
        elif d["update_state"] == "idle" and d.get("update_result"):
            update = d["update_result"]
        model = "-" if d["model_name"] is None else f"{d['model_name']} v{d['model_version']}"
        alerts = open_alerts.get((d["fleet"], d["device"]), 0)
        rows.append(f"<tr data-device='{_e(d['device'])}'><td>{_e(d['fleet'])}</td><td>{_e(d['device'])}</td>"
                    f"<td class='{_e(d['presence'])}'>{_e(d['presence'])}</td><td>{_e(model)}</td><td>{_e(update)}</td>"
                    f"<td>{d['requests']}</td><td>{d['errors']}</td><td class='{'alert' if alerts else ''}'>{alerts}</td>"
                    f"<td>{_e((d['last_seen'] or '-')[:19].replace('T', ' '))}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _rollouts(store) -> str:
    from .rollouts import list_rollouts

    listed = list_rollouts(store)["rollouts"][-10:]
    if not listed:
        return "<p class=empty>No rollout yet.</p>"
    rows = ["<table id=rollouts-table><thead><tr><th>rollout</th><th>fleet</th><th>model</th><th>state</th><th>wave</th>"
            "<th>progress</th><th>devices</th><th></th></tr></thead><tbody>"]
    for r in reversed(listed):
        reached = ("shadowing",) if r["kind"] == "shadow" else ("committed", "committed_unobserved", "unobserved")
        done = sum(v for k, v in r["counts"].items() if k in reached)
        width = 100 * done / r["devices"] if r["devices"] else 0
        bar = (f"<svg width='120' height='12' class=progress><rect width='120' height='12' class=track />"
               f"<rect width='{1.2 * width:.0f}' height='12' class=done /></svg> {done}/{r['devices']}")
        actions = "".join(f"<button data-action='{a}' data-rollout='{_e(r['id'])}'>{a}</button>"
                          for a in _actions(r["state"]))
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
        rows.append(f"<tr data-rollout='{_e(r['id'])}'><td>{_e(r['id'][:16])}</td><td>{_e(r['fleet'])}</td>"
                    f"<td>{_e(r['name'])} v{_e(r['version'])}</td><td class=state>{_e(r['state'])}</td>"
                    f"<td>{r['wave']}/{r['waves']}</td><td class=progress>{bar}</td><td>{_e(counts)}</td><td>{actions}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _actions(state: str) -> List[str]:
    return {"running": ["pause", "abort"], "paused": ["resume", "abort"], "shadowing": ["promote", "abort"]}.get(state, [])


SHADOW_LIVE = ("running", "shadowing")


def _shadow(store) -> str:
    """Each shadow rollout under way (and the latest promoted one): how its candidate compares with
    the active model on the devices' sampled requests, fleet-wide and per device."""
    from .shadow import describe_agreement, shadow_report

    shadows = [r for r in store.rollouts() if r["kind"] == "shadow"]
    shown = [r for r in shadows if r["state"] in SHADOW_LIVE]
    promoted = [r for r in shadows if r["state"] == "promoted"]
    if promoted:
        shown.append(max(promoted, key=lambda r: r["updated"] or 0))
    if not shown:
        return ("<p class=empty>No shadow evaluation: push a candidate with "
                "<code>edgeml fleet push ART --fleet F --shadow</code> to run it beside the active model.</p>")
    out = []
    for r in shown:
        report = shadow_report(store, r["fleet"], rollout=r["id"])
        fw, target = report["fleet_wide"], r["plan"].get("target") or {}
        sample = (r["plan"].get("shadow") or {}).get("sample")
        head = (f"<div class=shadow-rollout data-rollout='{_e(r['id'])}'><h3>{_e(target.get('name'))} "
                f"v{_e(target.get('version'))} in fleet {_e(r['fleet'])} <span class=state>{_e(r['state'])}</span> "
                f"<span class=tick>{_e(r['id'][:16])}{'' if sample is None else f', sampling {100 * sample:g}%'}"
                f"</span></h3>")
        if not report["devices"]:
            out.append(head + "<p class=empty>No shadow window from its devices yet.</p></div>")
            continue
        ratio = "" if fw["latency_ratio"] is None else f", {fw['latency_ratio']:.2f}x"
        out.append(head + f"<p class=shadow-summary>{_agreement_bar(fw['agreement'])} <b class=agreement>"
                   f"{_e(describe_agreement(fw))}</b> over <span class=compared>{fw['compared']}</span> compared "
                   f"requests on {fw['devices']} devices; p50 <span class=shadow-p50>{_ms(fw['shadow_p50_ms'])}</span> "
                   f"(shadow) vs <span class=active-p50>{_ms(fw['active_p50_ms'])}</span> (active){ratio}; "
                   f"<span class='errors {'alert' if fw['errors'] else ''}'>{fw['errors']} errors</span>, "
                   f"{fw['dropped']} dropped</p>")
        rows = ["<table class=shadow-table><thead><tr><th>device</th><th>shadow vs active</th><th>compared</th>"
                "<th>agreement</th><th>active p50</th><th>shadow p50</th><th>ratio</th><th>errors</th><th>dropped</th>"
                "</tr></thead><tbody>"]
        for d in report["devices"]:
            ratio = "-" if d["latency_ratio"] is None else f"{d['latency_ratio']:.2f}x"
            rows.append(f"<tr data-device='{_e(d['device'])}'><td>{_e(d['device'])}</td>"
                        f"<td>v{_e(d['shadow_version'])} vs v{_e(d['active_version'])}</td><td>{d['compared']}</td>"
                        f"<td class=agreement>{_agreement_bar(d['agreement'])} {_e(describe_agreement(d))}</td>"
                        f"<td>{_ms(d['active_p50_ms'])}</td><td>{_ms(d['shadow_p50_ms'])}</td><td>{ratio}</td>"
                        f"<td class='{'alert' if d['errors'] else ''}'>{d['errors']}</td><td>{d['dropped']}</td></tr>")
        rows.append("</tbody></table></div>")
        out.append("\n".join(rows))
    return "\n".join(out)


def _agreement_bar(value) -> str:
    if value is None:
        return ""
    share = min(max(value, 0.0), 1.0)
    return (f"<svg width='60' height='10'><rect width='60' height='10' class=track />"
            f"<rect width='{share * 60:.0f}' height='10' class=done /></svg>")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3g} ms"


def _alerts(listed: List[dict]) -> str:
    if not listed:
        return "<p class=empty>No alert.</p>"
    rows = ["<table id=alerts-table><thead><tr><th>state</th><th>device</th><th>model</th><th>alert</th><th>since (UTC)</th>"
            "<th>worst features</th></tr></thead><tbody>"]
    for a in listed[:50]:
        worst = ", ".join(describe_feature(f) for f in a["features"][:3])
        since = time.strftime("%H:%M:%S", time.gmtime(a["since"])) if a["since"] else "-"
        rows.append(f"<tr class='{_e(a['state'])}'><td>{_e(a['state'])}</td><td>{_e(a['device'])}</td>"
                    f"<td>{_e(a['model'])} v{_e(a['version'])}</td><td>{_e(a['alert'])}</td><td>{since}</td>"
                    f"<td>{_e(worst)}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)



def _drift(rows: List[dict]) -> str:
    if not rows:
        return "<p class=empty>No drift window in the last hour.</p>"
    out = ["<table id=drift-table><thead><tr><th>fleet</th><th>device</th><th>model</th><th>samples</th><th>inputs</th>"
           "<th>predictions</th><th>JS max</th><th>worst</th></tr></thead><tbody>"]
    for r in rows:
        if not r.get("judged"):
            out.append(f"<tr><td>{_e(r['fleet'])}</td><td>{_e(r['group'])}</td><td>{_e(r['model'])} v{_e(r['version'])}</td>"
                       f"<td>{r['samples']}</td><td colspan=4>{_e(r.get('reason'))}</td></tr>")
            continue
        js, drifted = r.get("js_max"), r["input_drift"] or r["prediction_drift"]
        bar = "" if js is None else (f"<svg width='80' height='10'><rect width='80' height='10' class=track />"
                                     f"<rect width='{min(js, 1.0) * 80:.0f}' height='10' class='{'bad' if drifted else 'done'}' /></svg>")
        out.append(f"<tr><td>{_e(r['fleet'])}</td><td>{_e(r['group'])}</td><td>{_e(r['model'])} v{_e(r['version'])}</td>"
                   f"<td>{r['samples']}</td><td class='{'alert' if r['input_drift'] else ''}'>{'DRIFT' if r['input_drift'] else 'ok'}</td>"
                   f"<td class='{'alert' if r['prediction_drift'] else ''}'>{'DRIFT' if r['prediction_drift'] else 'ok'}</td>"
                   f"<td>{'-' if js is None else f'{js:.3f}'} {bar}</td><td>{_e(', '.join(describe_feature(f) for f in r['worst'][:3]))}</td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _traffic(store, now: float, minutes: int = 30) -> str:
    """Requests and errors per minute over the last ``minutes``, as SVG bars."""
    start = int(now // 60) - minutes + 1
    with store.transaction(write=False):
        rows = store._execute("SELECT kind, ts FROM telemetry WHERE kind IN ('inference', 'error') AND ts >= ?",
                              (start * 60.0,)).fetchall()
    ok, bad = [0] * minutes, [0] * minutes
    for kind, ts in rows:
        i = int(ts // 60) - start
        if 0 <= i < minutes:
            (ok if kind == "inference" else bad)[i] += 1
    top = max(max(o + b for o, b in zip(ok, bad)), 1)
    width, height, bar = 600, 120, 600 / minutes
    parts = [f"<svg id=traffic-chart width='{width}' height='{height + 20}' role='img' aria-label='requests per minute'>"]
    for i, (o, b) in enumerate(zip(ok, bad)):
        h_ok, h_bad = height * o / top, height * b / top
        x = i * bar
        parts.append(f"<rect x='{x + 1:.1f}' y='{height - h_ok - h_bad:.1f}' width='{bar - 2:.1f}' height='{h_ok:.1f}' "
                     f"class=done><title>{o} requests</title></rect>")
        if b:
            parts.append(f"<rect x='{x + 1:.1f}' y='{height - h_bad:.1f}' width='{bar - 2:.1f}' height='{h_bad:.1f}' "
                         f"class=bad><title>{b} errors</title></rect>")
    parts.append(f"<text x='0' y='{height + 16}' class=tick>-{minutes} min</text>"
                 f"<text x='{width}' y='{height + 16}' text-anchor='end' class=tick>now (peak {top}/min)</text></svg>")
    parts.append(f"<p class=total>{sum(ok)} requests, {sum(bad)} errors in the last {minutes} minutes</p>")
    return "\n".join(parts)


def page(store) -> str:
    body = "\n".join(f"<section><h2>{name}</h2><div id='{name}'>{html_}</div></section>"
                     for name, html_ in sections(store).items())
    return _PAGE.replace("{{sections}}", body)


_rendered: Dict[int, tuple] = {}  # id(store) -> (monotonic time, the event's bytes)
_render_lock = threading.Lock()
SHARED_S = 0.9  # pages open at once share one rendering this fresh (each reads every table)


def event(store) -> bytes:
    """One server-sent event: every section, re-rendered (at most once per ``SHARED_S`` for all
    the pages open, so ten viewers cost the store what one does)."""
    with _render_lock:
        hit = _rendered.get(id(store))
        if hit is not None and time.monotonic() - hit[0] < SHARED_S:
            return hit[1]
        data = f"event: update\ndata: {json.dumps(sections(store))}\n\n".encode()
        _rendered[id(store)] = (time.monotonic(), data)
        return data


def token_ok(given: Optional[str], token: Optional[str]) -> bool:
    return token is not None and given is not None and hmac.compare_digest(given.encode(), token.encode())


_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>edgeml fleet</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; text-transform: capitalize; margin: 1.4em 0 0.4em; }
h3 { font-size: 0.95em; font-weight: 600; margin: 0.8em 0 0.3em; } .shadow-summary { margin: 0.3em 0; }
table { border-collapse: collapse; } th, td { border-bottom: 1px solid #e3e3e3; padding: 3px 9px; text-align: left; }
td.online { color: #1a7f37; } td.offline { color: #888; } td.alert, tr.open td:first-child { color: #b42318; font-weight: 600; }
rect.track { fill: #eee; } rect.done { fill: #2f6fb0; } rect.bad { fill: #b42318; }
.empty { color: #777; } .tick { font-size: 11px; fill: #555; } #status { color: #777; font-size: 12px; }
button { margin-right: 4px; }
</style></head><body>
<h1>edgeml fleet <span id=status>connecting…</span></h1>
<p>Token for actions: <input id=token type=password size=24 autocomplete=off></p>
{{sections}}
<script>
// Live: each server-sent event carries every section, rendered by the server.
const status = document.getElementById("status");
const source = new EventSource("/events");
source.addEventListener("update", (e) => {
  const parts = JSON.parse(e.data);
  for (const [id, html] of Object.entries(parts)) {
    const el = document.getElementById(id);
    if (el && el.innerHTML !== html) el.innerHTML = html;
  }
  status.textContent = "live, updated " + new Date().toLocaleTimeString();
});
source.onerror = () => { status.textContent = "reconnecting…"; };
document.addEventListener("click", async (e) => {
  const b = e.target.closest("button[data-action]");
  if (!b) return;
  const r = await fetch(`/api/rollouts/${b.dataset.rollout}/${b.dataset.action}`, {method: "POST",
    headers: {"Authorization": "Bearer " + document.getElementById("token").value}});
  const body = await r.json().catch(() => ({}));
  status.textContent = r.ok ? `${b.dataset.action}: ${body.state}` : `refused (${r.status}): ${body.error || ""}`;
});
</script></body></html>
"""
