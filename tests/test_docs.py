"""The docs name every command and option the CLI has, and the README opens with the two commands."""
from pathlib import Path

import click

from edgeml.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def _commands(group, prefix=""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def test_every_command_and_option_is_in_docs_cli():
    text = (ROOT / "docs" / "cli.md").read_text()
    for name, cmd in _commands(cli):
        assert f"edgeml {name}" in text, f"docs/cli.md lacks 'edgeml {name}'"
        for param in cmd.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"docs/cli.md lacks {opt} of 'edgeml {name}'"


def test_readme_starts_with_the_two_commands_and_shows_every_command():
    readme = (ROOT / "README.md").read_text()
    head = readme[:600]
    assert "make quickstart" in head and "make test" in head
    for name, _ in _commands(cli):
        assert f"edgeml {name}" in readme, f"README lacks 'edgeml {name}'"


def test_exit_codes_in_docs_match_the_exceptions():
    import edgeml.core.errors as errors

    text = (ROOT / "docs" / "cli.md").read_text()
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.EdgemlError) and cls is not errors.EdgemlError:
            assert f"| {cls.exit_code} |" in text and f"`{cls.__name__}`" in text, cls.__name__
