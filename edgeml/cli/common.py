"""What every command shares: ``--json`` (one JSON object on stdout, nothing else) and the consoles."""
from __future__ import annotations

import json

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout, nothing else.")


def emit(obj) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def stderr_console():
    """Rich console for progress and logs: stderr, so stdout stays the result."""
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    """Rich console for results; wide enough for the tables when stdout is a file or a pipe."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=150)
