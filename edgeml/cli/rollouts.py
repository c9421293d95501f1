"""``edgeml fleet push``, ``promote``, ``rollouts``, ``rollout show|pause|resume|abort``,
``rollback`` and ``group``: rollouts over the library in ``edgeml.fleet.rollouts``."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import click

from edgeml.core import update_contract as uc

from .common import emit, json_option, stdout_console
from .fleet import db_option

fleet_option = click.option("--fleet", "fleet_id", required=True, help="The fleet (as the agents' --fleet).")
targets_options = [
    click.option("--devices", help="Comma-separated device ids [default: every device of the fleet the store knows]."),
    click.option("--group", "group_name", help="A device group (edgeml fleet group add)."),
]


def _options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def _size(ctx, param, value):
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2}
    text = str(value).strip().lower()
    number = text.rstrip("abikm")
    try:
        return int(float(number) * units[text[len(number):]])
    except (KeyError, ValueError):
        raise click.BadParameter(f"{value!r} should look like 65536, 64KiB or 128KiB") from None


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command("push")
@click.argument("artifact")
@fleet_option
@click.option("--key", type=click.Path(path_type=Path), required=True,
              help="signing.key: checks the artifact and signs the rollback order an abort may need.")
@lambda c: _options(c, targets_options)
@click.option("--waves", default="1,10%,50%,100%", show_default=True,
              help="Cumulative wave sizes: device counts or shares of the targets.")
@click.option("--health-window", default="5m", show_default=True,
              help="How long each device watches the new model on live traffic before it commits.")
@click.option("--min-requests", type=int, default=0, show_default=True,
              help="Requests a device must serve in its window to count as evidence.")
@click.option("--abort-on", default=uc.DEFAULT_RULES, show_default=True,
              help="Rules: error_rate, latency_p95 (x or ms), nan_rate, class_shift judged per device; failed (%) "
                   "across the rollout.")
@click.option("--wave-timeout", help="How long a wave waits for its devices [default: 2 x health window + 10m].")
@click.option("--latency-budget", type=float, default=5.0, show_default=True,
              help="Self-test: the new model may be this many times slower than the old on its reference inputs.")
@click.option("--block-size", default="64KiB", callback=_size, show_default=True, help="Bytes per MQTT block.")
@click.option("--url", help="Devices fetch the artifact from this http(s) URL (Range requests) first; "
                            "{sha256} is replaced by the artifact's sha256.")
@click.option("--delta-base", type=click.Path(path_type=Path), multiple=True,
              help="An artifact devices may hold: they get a zstd patch from it when that is smaller (repeatable).")
@click.option("--no-delta", is_flag=True, help="Always send the whole artifact.")
@click.option("--shadow", is_flag=True,
              help="Do not switch: every target runs ARTIFACT beside its model on sampled live requests, off the "
                   "response path (see `edgeml fleet shadow`; `edgeml fleet promote` rolls it out).")
@click.option("--sample", type=float, default=None,
              help="With --shadow: the share of requests the candidate also runs on [default: 0.1].")
@db_option
@json_option
def fleet_push(artifact, fleet_id, key, devices, group_name, waves, health_window, min_requests, abort_on,
               wave_timeout, latency_budget, block_size, url, delta_base, no_delta, shadow, sample, db_url,
               as_json) -> None:
    """Roll ARTIFACT (a .edgeml file, or models:/NAME/VERSION registered in MLflow) out to a fleet
    in waves; each device commits only on live evidence. With --shadow, run it beside the
    fleet's model instead, to see how it would do."""
    from edgeml.fleet import open_store
    from edgeml.fleet.rollouts import push, push_registered
    from edgeml.tracking import is_mlflow_uri

    with open_store(db_url) as store:
        run = functools.partial(push_registered, store, artifact) if is_mlflow_uri(artifact) else \
            functools.partial(push, store, Path(artifact))
        result = run(fleet=fleet_id, key=key, devices=_split(devices), group=group_name,
                      waves=waves, health_window=health_window, min_requests=min_requests, abort_on=abort_on,
                      wave_timeout=wave_timeout, latency_budget=latency_budget, block_size=block_size, url=url,
                      delta_bases=delta_base, delta=not no_delta, **_shadow(shadow, sample))
    if as_json:
        emit(result)
        return
    if result["shadow"]:
        click.echo(f"shadow {result['rollout']}: {result['name']} v{result['version']} beside the model of "
                   f"{result['devices']} devices of {result['fleet']} on {result['shadow']['sample']:.0%} of their "
                   f"requests; `edgeml fleet shadow --fleet {result['fleet']}` shows how they agree")
        return
    deltas = ", ".join(f"from {b}: {n} bytes" for b, n in result["deltas"].items()) or "none"
    click.echo(f"rollout {result['rollout']}: {result['name']} v{result['version']} to {result['devices']} devices "
               f"of {result['fleet']}, waves {result['waves']}; artifact {result['artifact_bytes']} bytes, "
               f"patches {deltas}; rollback order {'signed' if result['rollback_order'] else 'not needed'}")
    if not result["controllers"]:
        click.echo("note: no `edgeml fleet serve` has been seen in the last 30 s; the rollout starts when one runs",
                   err=True)


def _shadow(shadow: bool, sample):
    if sample is not None and not shadow:
        raise click.UsageError("--sample goes with --shadow")
    return {"shadow": (0.1 if sample is None else sample)} if shadow else {}


@click.command("promote")
@fleet_option
@click.option("--shadow-version", type=int, required=True, help="The version running as a shadow.")
@click.option("--key", type=click.Path(path_type=Path), required=True,
              help="signing.key: checks the artifact and signs the rollback order an abort may need.")
@click.option("--waves", default="1,10%,50%,100%", show_default=True,
              help="Cumulative wave sizes: device counts or shares of the shadow's devices.")
@click.option("--health-window", default="5m", show_default=True,
              help="How long each device watches the new model on live traffic before it commits.")
@click.option("--min-requests", type=int, default=0, show_default=True,
              help="Requests a device must serve in its window to count as evidence.")
@click.option("--abort-on", default=uc.DEFAULT_RULES, show_default=True, help="Rules, as for push.")
@click.option("--wave-timeout", help="How long a wave waits for its devices [default: 2 x health window + 10m].")
@click.option("--latency-budget", type=float, default=5.0, show_default=True,
              help="Self-test: the new model may be this many times slower than the old on its reference inputs.")
@db_option
@json_option
def fleet_promote(fleet_id, shadow_version, key, waves, health_window, min_requests, abort_on, wave_timeout,
                  latency_budget, db_url, as_json) -> None:
    """Turn a running shadow into a staged rollout of the same artifact, without a second
    download: its devices hold the file and the loaded candidate already."""
    from edgeml.fleet import open_store
    from edgeml.fleet.rollouts import promote

    with open_store(db_url) as store:
        result = promote(store, fleet=fleet_id, key=key, shadow_version=shadow_version, waves=waves,
                         health_window=health_window, min_requests=min_requests, abort_on=abort_on,
                         wave_timeout=wave_timeout, latency_budget=latency_budget)
    if as_json:
        emit(result)
        return
    click.echo(f"rollout {result['rollout']}: {result['name']} v{result['version']}, promoted from shadow "
               f"{result['promoted_from']}, to {result['devices']} devices of {result['fleet']}, waves {result['waves']}")


@click.command("rollouts")
@click.option("--fleet", "fleet_id", help="Only this fleet.")
@db_option
@json_option
def fleet_rollouts(fleet_id, db_url, as_json) -> None:
    """List rollouts with their state and where their devices are."""
    from edgeml.fleet import open_store
    from edgeml.fleet.rollouts import list_rollouts

    with open_store(db_url, create=False) as store:
        result = list_rollouts(store, fleet_id)
    if as_json:
        emit(result)
        return
    from rich.table import Table

    table = Table(title=f"{len(result['rollouts'])} rollouts")
    for col in ("id", "fleet", "model", "state", "wave", "devices", "where they are", "created (UTC)", "reason"):
        table.add_column(col)
    for r in result["rollouts"]:
        table.add_row(r["id"], r["fleet"], f"{r['name']} v{r['version']}", r["state"], f"{r['wave']}/{r['waves']}",
                      str(r["devices"]), ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created"])), r["reason"] or "")
    stdout_console().print(table)


@click.group("rollout")
def fleet_rollout() -> None:
    """Show, pause, resume or abort one rollout (an id, or a unique start of one)."""


@fleet_rollout.command("show")
@click.argument("rollout_id")
@db_option
@json_option
def rollout_show(rollout_id, db_url, as_json) -> None:
    """A rollout's waves, each device's state and evidence, and what it waits for."""
    from edgeml.fleet import open_store
    from edgeml.fleet.rollouts import show

    with open_store(db_url, create=False) as store:
        result = show(store, rollout_id)
    if as_json:
        emit(result)
        return
    from rich.table import Table

    out = stdout_console()
    out.print(f"[bold]{result['id']}[/] {result['kind']} of {result['name']} v{result['version']} to {result['fleet']}: "
              f"{result['state']}, wave {result['wave']}/{result['waves']} (sizes {result['plan']['waves']}), "
              f"health window {result['plan']['health']['window_s']:g} s, min requests "
              f"{result['plan']['health']['min_requests']}, rules {result['plan']['health']['rules'] or 'none'}")
    if result["reason"]:
        out.print(f"reason: {result['reason']}")
    for w in result["waiting"]:
        offline = f" ({', '.join(w['offline'])} offline)" if w["offline"] else ""
        out.print(f"wave {w['wave']} waits for {', '.join(w['devices'])}{offline}; "
                  f"wave timeout in {max(w['timeout_in_s'], 0):.0f} s")
    table = Table()
    for col in ("device", "wave", "state", "presence", "from", "now", "evidence / error"):
        table.add_column(col)
    for d in result["devices"]:
        ev = d.get("evidence") or {}
        said = d.get("error") or (f"{ev.get('requests')} requests, p95 {ev.get('latency_p95_ms') or 0:.2f} ms, "
                                  f"errors {ev.get('error_rate') or 0:.3f}" if ev else "")
        if d.get("progress") and d["state"] == "downloading":
            said = f"{d['progress']['blocks_done']}/{d['progress']['blocks']} blocks"
        table.add_row(d["device"], str(d["wave"]), d["state"], d["presence"] or "?",
                      f"v{d['from_version']}" if d["from_version"] is not None else "-",
                      f"v{d['model_version']}" if d["model_version"] is not None else "-", said)
    out.print(table)


@fleet_rollout.command("compare")
@click.argument("rollout_id")
@db_option
@json_option
def rollout_compare(rollout_id, db_url, as_json) -> None:
    """A/B: the rollout's devices on the new version against those still on the old one (latency,
    error rate, predicted classes since the rollout began), each with a significance test."""
    from edgeml.fleet import open_store
    from edgeml.fleet.compare import compare_rollout

    with open_store(db_url, create=False) as store:
        result = compare_rollout(store, rollout_id)
    if as_json:
        emit(result)
        return
    from rich.table import Table

    out = stdout_console()
    t = result["target"]
    out.print(f"[bold]{result['rollout']}[/] {t['name']} v{t['version']} in {result['fleet']}: {result['state']}, "
              f"wave {result['wave']}")
    table = Table()
    for col in ("cohort", "devices", "requests", "errors", "error rate", "p50 ms", "p95 ms"):
        table.add_column(col, justify="left" if col in ("cohort", "devices") else "right")
    for name, c in result["cohorts"].items():
        table.add_row(name, ", ".join(c["devices"]) or "-", str(c["requests"]), str(c["errors"]),
                      f"{c['error_rate']:.4f}", "-" if c["latency_p50_ms"] is None else f"{c['latency_p50_ms']:.3f}",
                      "-" if c["latency_p95_ms"] is None else f"{c['latency_p95_ms']:.3f}")
    out.print(table)
    if result.get("reason"):
        out.print(result["reason"])
    for name, test in result["tests"].items():
        p = "-" if test.get("p") is None else f"{test['p']:.3g}"
        out.print(f"{name}: {test['verdict']} ({test['test']}, p {p}, at p < {result['alpha']})")


def _action(action):
    @click.argument("rollout_id")
    @db_option
    @json_option
    def command(rollout_id, db_url, as_json) -> None:
        from edgeml.fleet import open_store
        from edgeml.fleet.rollouts import set_state

        with open_store(db_url, create=False) as store:
            result = set_state(store, rollout_id, action)
        if as_json:
            emit(result)
        else:
            click.echo(f"rollout {result['rollout']}: {result['state']}")

    command.__doc__ = {"pause": "Start no new wave; devices updating now go on.",
                       "resume": "Go on with a paused rollout (a timed-out wave stops waiting).",
                       "abort": "Stop, and send the devices already updated back to the model they had."}[action]
    return fleet_rollout.command(action)(command)


for _name in ("pause", "resume", "abort"):
    _action(_name)


@click.command("rollback")
@fleet_option
@click.option("--to", "to_version", type=int, required=True, help="The version to go back to.")
@click.option("--key", type=click.Path(path_type=Path), required=True, help="signing.key: signs the rollback order.")
@click.option("--name", help="The model's name [default: the one model the fleet runs].")
@click.option("--artifact", type=click.Path(path_type=Path),
              help="The artifact of that version, when it was never pushed through this store.")
@lambda c: _options(c, targets_options)
@click.option("--waves", default="100%", show_default=True, help="Cumulative wave sizes.")
@click.option("--health-window", default="30s", show_default=True, help="Health window on the way back.")
@click.option("--wave-timeout", help="How long a wave waits for its devices [default: 2 x health window + 10m].")
@click.option("--expires", default="7d", show_default=True, help="The order is void after this long.")
@db_option
@json_option
def fleet_rollback(fleet_id, to_version, key, name, artifact, devices, group_name, waves, health_window, wave_timeout,
                   expires, db_url, as_json) -> None:
    """Send a fleet back to an earlier version: a signed order, the only way a device goes lower."""
    from edgeml.fleet import open_store
    from edgeml.fleet.rollouts import rollback

    with open_store(db_url) as store:
        result = rollback(store, fleet=fleet_id, key=key, to=to_version, name=name, artifact=artifact,
                          devices=_split(devices), group=group_name, waves=waves, health_window=health_window,
                          wave_timeout=wave_timeout, expires=expires)
    if as_json:
        emit(result)
        return
    click.echo(f"rollout {result['rollout']}: back to {result['name']} v{result['version']} on {result['devices']} "
               f"devices of {result['fleet']}; the order expires "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(result['order_expires']))}")
    if not result["controllers"]:
        click.echo("note: no `edgeml fleet serve` has been seen in the last 30 s; the rollout starts when one runs",
                   err=True)


@click.group("group")
def fleet_group() -> None:
    """Device groups a push can target."""


@fleet_group.command("add")
@click.argument("name")
@click.argument("devices", nargs=-1, required=True)
@fleet_option
@db_option
@json_option
def group_add(name, devices, fleet_id, db_url, as_json) -> None:
    """Add DEVICES to group NAME."""
    from edgeml.core.errors import UsageError
    from edgeml.core.mqtt_contract import check_id
    from edgeml.fleet import open_store

    try:
        for value, what in [(fleet_id, "fleet"), (name, "group"), *((d, "device") for d in devices)]:
            check_id(value, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    with open_store(db_url) as store:
        store.add_to_group(fleet_id, name, devices)
        members = store.groups(fleet_id).get(name, [])
    if as_json:
        emit({"ok": True, "fleet": fleet_id, "group": name, "devices": members})
    else:
        click.echo(f"group {name} of {fleet_id}: {', '.join(members)}")


@fleet_group.command("remove")
@click.argument("name")
@click.argument("devices", nargs=-1, required=True)
@fleet_option
@db_option
@json_option
def group_remove(name, devices, fleet_id, db_url, as_json) -> None:
    """Take DEVICES out of group NAME."""
    from edgeml.fleet import open_store

    with open_store(db_url, create=False) as store:
        removed = store.remove_from_group(fleet_id, name, devices)
        members = store.groups(fleet_id).get(name, [])
    if as_json:
        emit({"ok": True, "fleet": fleet_id, "group": name, "removed": removed, "devices": members})
    else:
        click.echo(f"group {name} of {fleet_id}: {', '.join(members) or 'empty'} ({removed} removed)")


@fleet_group.command("list")
@click.option("--fleet", "fleet_id", help="Only this fleet.")
@db_option
@json_option
def group_list(fleet_id, db_url, as_json) -> None:
    """The groups and their devices."""
    from edgeml.fleet import open_store

    with open_store(db_url, create=False) as store:
        groups = store.groups(fleet_id)
    if as_json:
        emit({"ok": True, "groups": groups})
    else:
        for name, members in groups.items():
            click.echo(f"{name}: {', '.join(members)}")


COMMANDS = (fleet_push, fleet_promote, fleet_rollouts, fleet_rollout, fleet_rollback, fleet_group)
