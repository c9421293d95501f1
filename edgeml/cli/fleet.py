"""``edgeml fleet``: the host's side of a fleet (``edgeml.fleet``)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import emit, json_option, stdout_console


@click.group()
def fleet() -> None:
    """Run a fleet: collect telemetry, push models in health-gated waves, roll back, list devices."""


db_option = click.option("--db", "db_url", required=True, metavar="URL",
                         help="sqlite:///path.db (sqlite:////abs/path.db) or postgresql://user@host:port/db.")


def broker_options(command):
    """--broker and the MQTT credentials, shared by collect and serve."""
    for option in reversed([
        click.option("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]."),
        click.option("--username", help="MQTT user name."),
        click.option("--password-file", type=click.Path(path_type=Path),
                     help="File whose first line is the MQTT password."),
        click.option("--ca-file", type=click.Path(path_type=Path), help="CA certificate to check the broker by (mqtts)."),
        click.option("--cert-file", type=click.Path(path_type=Path), help="Client certificate (mqtts)."),
        click.option("--key-file", type=click.Path(path_type=Path), help="Private key of the client certificate (mqtts)."),
        click.option("--group", default="collectors", show_default=True,
                     help="Shared-subscription group; collectors in one group split the telemetry."),
        click.option("--client-id", help="MQTT client id of the collector, the same on every restart "
                                         "[default: edgeml-collector-GROUP-HOST]."),
    ]):
        command = option(command)
    return command


@fleet.command("collect")
@broker_options
@db_option
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
        emit({"ok": True, **stats})
    else:
        click.echo(f"stopped: {_stats_line(stats)}")


def _read_token(path) -> str:
    from edgeml.core.errors import InputError, UsageError

    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InputError(f"cannot read --http-token-file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise UsageError(f"the token in {path} is {len(token)} characters; use at least 16 (e.g. openssl rand -hex 16)")
    return token


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


@fleet.command("serve")
@broker_options
@db_option
@click.option("--http", metavar="HOST:PORT", help="Also serve artifacts over HTTP (Range requests) and /metrics "
                                                 "(Prometheus text) here.")
@click.option("--alert-webhook", metavar="URL", help="POST every alert devices raise or clear here, as JSON.")
@click.option("--http-token-file", type=click.Path(path_type=Path),
              help="File holding the token the dashboard, /metrics and rollout actions need (required when --http "
                   "is not loopback; actions need it always).")
@click.option("--signing-key", type=click.Path(path_type=Path),
              help="signing.key: lets the dashboard promote a shadow (a promotion signs a rollback order).")
@json_option
def fleet_serve(broker, db_url, username, password_file, ca_file, cert_file, key_file, group, client_id, http,
                alert_webhook, http_token_file, signing_key, as_json) -> None:
    """Run the controller, the collector and the artifact server until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from edgeml.fleet.collector import parse_broker_url
    from edgeml.fleet.server import serve_fleet

    parse_broker_url(broker)
    if alert_webhook:
        from edgeml.fleet.alerting import check_webhook_url

        check_webhook_url(alert_webhook)
    password = _read_password(password_file, username)
    http_token = _read_token(http_token_file) if http_token_file else None
    if signing_key:
        from edgeml.core.signing import load_private_key

        load_private_key(signing_key)  # a bad key is refused now, not at the first promotion
    if http:
        from edgeml.fleet.server import check_http_binding

        check_http_binding(http, http_token)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def ready(info):
        click.echo(f"serving {broker}: controller {info['controller']}, collector {info['collector']}"
                   f"{', artifacts at ' + info['http'] if info['http'] else ''}; stop with SIGTERM or Ctrl-C", err=True)

    def progress(s):
        click.echo(f"{_stats_line(s)}; {s['desired_published']} desired published, {s['blocks_blocks']} blocks "
                   f"served ({s['blocks_bytes']} bytes)", err=True)

    try:
        stats = serve_fleet(broker, db_url, stop, http=http, username=username, password=password, ca_file=ca_file,
                            cert_file=cert_file, key_file=key_file, group=group, client_id=client_id,
                            alert_webhook=alert_webhook, http_token=http_token, signing_key=signing_key,
                            on_ready=ready,
                            on_progress=_every(10.0, progress))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if as_json:
        emit({"ok": True, **stats})
    else:
        click.echo(f"stopped: {_stats_line(stats)}; {stats['desired_published']} desired published")


@fleet.command("devices")
@db_option
@json_option
def fleet_devices(db_url: str, as_json: bool) -> None:
    """List the devices a collector has seen: presence, model, requests, errors, drops."""
    from edgeml.fleet import open_store

    with open_store(db_url, create=False) as store:
        devices = store.devices()
    if as_json:
        emit({"ok": True, "devices": devices})
        return
    from rich.table import Table

    table = Table(title=f"{len(devices)} devices")
    for col in ("fleet", "device", "presence", "model", "update", "target", "progress", "last seen (UTC)",
                "requests", "errors", "dropped"):
        table.add_column(col, justify="right" if col in ("requests", "errors", "dropped", "progress") else "left")
    for d in devices:
        model = "-" if d["model_name"] is None else f"{d['model_name']} v{d['model_version']}"
        seen = "-" if d["last_seen"] is None else d["last_seen"][:19].replace("T", " ")
        update = d["update_state"] or "-"
        if d["update_state"] == "idle" and d["update_result"]:
            update = d["update_result"]
        target = "-" if d["target_version"] is None else f"v{d['target_version']}"
        progress = "-"
        if d["progress"]:
            progress = f"{d['progress']['blocks_done']}/{d['progress']['blocks']} blocks"
        table.add_row(d["fleet"], d["device"], d["presence"] or "?", model, update, target, progress, seen,
                      str(d["requests"]), str(d["errors"]), str(d["dropped"]))
    stdout_console().print(table)


def _since(text: str):
    """'1h', '30m', '2d', '90s' or 'all' (None)."""
    from edgeml.core.errors import UsageError
    from edgeml.core.update_contract import parse_duration

    if text == "all":
        return None
    try:
        return parse_duration(text)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--since {text!r}: {exc}; use 90s, 30m, 1h, 2d or all") from exc


@fleet.command("drift")
@db_option
@click.option("--fleet", "fleet_id", required=True, help="The fleet to judge.")
@click.option("--by", type=click.Choice(["fleet", "device", "version", "wave"]), default="device", show_default=True,
              help="One row per device, per model version, for the whole fleet, or per wave of a rollout.")
@click.option("--rollout", help="With --by wave: the rollout whose waves to compare [default: the fleet's latest].")
@click.option("--since", "since", default="1h", show_default=True, help="Judge the windows of the last 90s, 30m, 1h, 2d, or all.")
@json_option
def fleet_drift_command(db_url, fleet_id, by, rollout, since, as_json) -> None:
    """Drift of inputs and predictions across devices: their window histograms added up and
    judged against the artifact's baseline (PSI, Jensen-Shannon, KS), as each device judges itself."""
    from edgeml.fleet import open_store
    from edgeml.fleet.drift import describe_feature, fleet_drift

    with open_store(db_url, create=False) as store:
        result = fleet_drift(store, fleet_id, by=by, since_s=_since(since), rollout=rollout)
    if as_json:
        emit({"ok": True, **result})
        return
    from rich.table import Table

    table = Table(title=f"drift in fleet {fleet_id} by {by}, windows of the last {since}")
    for col in (by, "model", "devices", "windows", "samples", "inputs", "predictions", "JS max", "PSI max",
                "confidence", "worst"):
        table.add_column(col, justify="right" if col in ("devices", "windows", "samples", "JS max", "PSI max") else "left")
    for r in result["rows"]:
        if not r["judged"]:
            table.add_row(r["group"], f"{r['model']} v{r['version']}", str(len(r["devices"])), str(r["windows"]),
                          str(r["samples"]), "-", "-", "-", "-", "-", r["reason"])
            continue
        conf = r.get("confidence")
        table.add_row(r["group"], f"{r['model']} v{r['version']}", str(len(r["devices"])), str(r["windows"]), str(r["samples"]),
                      "DRIFT" if r["input_drift"] else "ok", "DRIFT" if r["prediction_drift"] else "ok",
                      _num(r["js_max"]), _num(r["psi_max"]),
                      f"{conf['live']:.3f} (baseline {conf['baseline']:.3f})" if conf else "-",
                      ", ".join(describe_feature(f) for f in r["worst"][:3]))
    stdout_console().print(table)


@fleet.command("alerts")
@db_option
@click.option("--fleet", "fleet_id", help="Only this fleet's alerts.")
@click.option("--since", "since", default="all", show_default=True, help="Alerts raised in the last 30m, 1h, 2d, or all.")
@json_option
def fleet_alerts_command(db_url, fleet_id, since, as_json) -> None:
    """Alerts the devices raised (input drift, prediction drift, a confidence drop), open ones first."""
    from edgeml.fleet import open_store
    from edgeml.fleet.drift import alerts, describe_feature

    with open_store(db_url, create=False) as store:
        result = alerts(store, fleet_id, _since(since))
    if as_json:
        emit({"ok": True, **result})
        return
    from datetime import datetime, timezone

    from rich.table import Table

    def when(ts):
        return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    table = Table(title=f"{result['open']} open of {len(result['alerts'])} alerts")
    for col in ("state", "fleet", "device", "model", "alert", "since (UTC)", "cleared (UTC)", "worst"):
        table.add_column(col)
    for a in result["alerts"]:
        table.add_row(a["state"], a["fleet"], a["device"], f"{a['model']} v{a['version']}", a["alert"], when(a["since"]),
                      when(a["cleared"]), ", ".join(describe_feature(f) for f in a["features"][:3]))
    stdout_console().print(table)


@fleet.command("shadow")
@db_option
@click.option("--fleet", "fleet_id", help="Only this fleet's devices [default: every fleet].")
@click.option("--version", "version", type=int, help="Only this candidate version (the shadow model's).")
@click.option("--rollout", help="Only the windows of this shadow rollout (its id or a unique prefix).")
@click.option("--since", "since", default="all", show_default=True,
              help="Windows of the last 90s, 30m, 1h, 2d, or all.")
@json_option
def fleet_shadow_command(db_url, fleet_id, version, rollout, since, as_json) -> None:
    """How a candidate run beside the active model (a shadow push) compares on live requests:
    agreement, both models' latency on the same requests, errors and drops, per device and fleet-wide."""
    import time

    from edgeml.fleet import open_store
    from edgeml.fleet.shadow import describe_agreement, shadow_report

    seconds = _since(since)
    with open_store(db_url, create=False) as store:
        result = shadow_report(store, fleet_id, version=version, rollout=rollout,
                               since=None if seconds is None else time.time() - seconds)
    if as_json:
        emit(result)
        return
    if not result["devices"]:
        where = [f"fleet {fleet_id}" if fleet_id else "", f"v{version}" if version is not None else "",
                 f"rollout {result['rollout']}" if rollout else "", f"the last {since}" if seconds is not None else ""]
        where = " and ".join(w for w in where if w)
        click.echo(f"no shadow windows yet{' for ' + where if where else ''}: push a candidate with "
                   f"`edgeml fleet push ART --fleet {fleet_id or 'F'} --shadow`")
        return
    from rich.table import Table

    fw = result["fleet_wide"]
    table = Table(title=f"shadow evaluation{' in fleet ' + fleet_id if fleet_id else ''}, windows of "
                        f"{'all time' if seconds is None else 'the last ' + since}")
    for col in ("device", "shadow vs active", "compared", "agreement", "active p50", "shadow p50", "ratio", "errors",
                "dropped"):
        text = col in ("device", "shadow vs active", "agreement")
        table.add_column(col, justify="left" if text else "right", no_wrap=text)
    for d in result["devices"]:
        table.add_row(d["device"] if fleet_id else f"{d['fleet']}/{d['device']}",
                      f"{d['model']} v{d['shadow_version']} vs v{d['active_version']}", str(d["compared"]),
                      describe_agreement(d), _ms(d["active_p50_ms"]), _ms(d["shadow_p50_ms"]),
                      _ratio(d["latency_ratio"]), str(d["errors"]), str(d["dropped"]),
                      end_section=d is result["devices"][-1])
    versions = ", ".join(f"v{v}" for v in fw["shadow_versions"])
    table.add_row(f"fleet-wide, {fw['devices']} devices", versions, str(fw["compared"]), describe_agreement(fw),
                  _ms(fw["active_p50_ms"]), _ms(fw["shadow_p50_ms"]), _ratio(fw["latency_ratio"]), str(fw["errors"]),
                  str(fw["dropped"]), style="bold")
    stdout_console().print(table)
    if len(fw["shadow_versions"]) > 1:
        click.echo("the fleet-wide row adds up several candidate versions; pick one with --version N")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3g} ms"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"



@fleet.group("feedback")
def fleet_feedback() -> None:
    """The labelled samples devices kept (feedback reservoirs), for retraining."""


@fleet_feedback.command("pull")
@click.option("--fleet", "fleet_id", required=True, help="The fleet whose devices to ask.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .npz to write.")
@click.option("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port].")
@db_option
@click.option("--devices", help="Comma-separated device ids [default: the fleet's online devices].")
@click.option("--timeout", "timeout", default="30s", show_default=True, help="How long to wait for the devices' answers.")
@click.option("--username", help="MQTT user name.")
@click.option("--password-file", type=click.Path(path_type=Path), help="File whose first line is the MQTT password.")
@click.option("--ca-file", type=click.Path(path_type=Path), help="CA certificate to check the broker by (mqtts).")
@click.option("--cert-file", type=click.Path(path_type=Path), help="Client certificate (mqtts).")
@click.option("--key-file", type=click.Path(path_type=Path), help="Private key of the client certificate (mqtts).")
@json_option
def feedback_pull(fleet_id, output, broker, db_url, devices, timeout, username, password_file, ca_file, cert_file,
                  key_file, as_json) -> None:
    """Ask devices for their labelled samples and write them as one .npz that optimize --train/--eval takes."""
    from edgeml.core.errors import UsageError
    from edgeml.fleet import open_store
    from edgeml.fleet.feedback import online_devices, pull, write_npz
    from edgeml.optimizer.config import check_writable

    check_writable(output.parent)
    try:
        wait = parse_duration_text(timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout {timeout!r}: {exc}") from exc
    if devices:
        targets = [d.strip() for d in devices.split(",") if d.strip()]
    else:
        with open_store(db_url, create=False) as store:
            targets = online_devices(store, fleet_id)
    password = _read_password(password_file, username)
    result = pull(broker, fleet_id, targets, timeout_s=wait, username=username, password=password, ca_file=ca_file,
                  cert_file=cert_file, key_file=key_file)
    arrays = result["arrays"]
    write_npz(arrays, output)
    summary = {"ok": True, "output": str(output), "samples": int(len(arrays.get("y", ()))),
               "inputs": sorted(k for k in arrays if k != "y" and not k.startswith("_")),
               "per_device": result["samples"], "answered": result["answered"], "missing": result["missing"]}
    if as_json:
        emit(summary)
        return
    click.echo(f"wrote {output}: {summary['samples']} labelled samples from {len(result['answered'])} devices"
               + (f"; no answer within {timeout} from {', '.join(result['missing'])}" if result["missing"] else ""))


def parse_duration_text(text: str) -> float:
    from edgeml.core.update_contract import parse_duration

    return parse_duration(text)
