"""``edgeml fleet``: the host's side of a fleet (``edgeml.fleet``)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import emit, json_option, stdout_console


@click.group()
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
    for col in ("fleet", "device", "presence", "model", "last seen (UTC)", "requests", "errors", "dropped"):
        table.add_column(col, justify="right" if col in ("requests", "errors", "dropped") else "left")
    for d in devices:
        model = "-" if d["model_name"] is None else f"{d['model_name']} v{d['model_version']}"
        seen = "-" if d["last_seen"] is None else d["last_seen"][:19].replace("T", " ")
        table.add_row(d["fleet"], d["device"], d["presence"] or "?", model, seen, str(d["requests"]),
                      str(d["errors"]), str(d["dropped"]))
    stdout_console().print(table)
