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
@click.option("--http", metavar="HOST:PORT", help="Also serve artifacts over HTTP (Range requests) here.")
@json_option
def fleet_serve(broker, db_url, username, password_file, ca_file, cert_file, key_file, group, client_id, http,
                as_json) -> None:
    """Run the controller, the collector and the artifact server until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from edgeml.fleet.collector import parse_broker_url
    from edgeml.fleet.server import serve_fleet

    parse_broker_url(broker)
    password = _read_password(password_file, username)
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
                            on_ready=ready, on_progress=_every(10.0, progress))
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
