"""The ``edgeml`` command: the root group, and ``main``, which turns every error into one line and an
exit code (docs/cli.md lists them)."""
from __future__ import annotations

import logging
import os
import sys

import click

from edgeml.core.errors import EdgemlError

from . import artifact, fleet, keys, optimize, rollouts
from .common import emit

log = logging.getLogger("edgeml")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeml")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def cli(verbose: int) -> None:
    """Optimize, sign, inspect and measure models for small devices."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


for command in (keys.keys, optimize.optimize, artifact.inspect, artifact.verify, artifact.bench, artifact.report,
                fleet.fleet):
    cli.add_command(command)
for command in rollouts.COMMANDS:
    fleet.fleet.add_command(command)


def main(argv=None) -> int:
    """Entry point: runs the CLI and turns every error into one line and an exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ logs are noise to a user
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        cli.main(args=argv, prog_name="edgeml", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        if as_json:
            emit({"ok": False, "error": {"type": "UsageError", "message": exc.format_message(), "exit_code": exc.exit_code}})
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except EdgemlError as exc:
        click.echo(f"error: {exc}", err=True)
        if as_json and getattr(exc, "result", None) is None:  # else the command printed its result already
            emit({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}})
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, keep the traceback for -vv
        log.debug("internal error", exc_info=True)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (run with -vv for a traceback; please report it)", err=True)
        return 1
