"""``edgeml keys``: signing keys."""
from __future__ import annotations

from pathlib import Path

import click

from .common import emit, json_option


@click.group()
def keys() -> None:
    """Manage Ed25519 signing keys."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("keys"), show_default=True,
              help="Folder for signing.key and signing.pub.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
@json_option
def keys_generate(out_dir: Path, force: bool, as_json: bool) -> None:
    """Write a new signing key pair (signing.key stays on the build machine)."""
    from edgeml.core.signing import generate_keys, key_id, load_public_key

    private, public = generate_keys(out_dir, force=force)
    info = {"ok": True, "private_key": str(private), "public_key": str(public),
            "key_id": key_id(load_public_key(public))}
    if as_json:
        emit(info)
    else:
        click.echo(f"wrote {private} (keep it secret) and {public} (give it to devices); key id {info['key_id']}")
