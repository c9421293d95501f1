"""Check an artifact's signature in a short-lived child process.

cryptography (OpenSSL and its Rust bindings) adds about 8 MiB to every process that imports
it. The daemon lives for months on small devices, so it verifies in a child that exits, then
reads the artifact itself and checks that the bytes it serves are the bytes the child verified
(the file's sha256). Run as ``python -m device_agent.verifier ARTIFACT PUBLIC_KEY``: one JSON
line on stdout, or one ``error:`` line on stderr and the error's exit code.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeml.core.errors import EdgemlError, InputError, KeyFileError, VerificationError

ERRORS = {InputError.exit_code: InputError, KeyFileError.exit_code: KeyFileError}


def verify_in_child(artifact_path, public_key, timeout: float = 120.0) -> dict:
    """``{"sha256", "key_id"}`` of the verified file; raises the child's error class otherwise."""
    proc = subprocess.run([sys.executable, "-m", "device_agent.verifier", str(artifact_path), str(public_key)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["the verifier failed without a message"]
        message = lines[-1].removeprefix("error: ")
        raise ERRORS.get(proc.returncode, VerificationError)(message)
    return json.loads(proc.stdout)


def verify_order_in_child(order: dict, public_key, timeout: float = 60.0) -> dict:
    """The body of a signed rollback order, checked in a child process; VerificationError otherwise."""
    proc = subprocess.run([sys.executable, "-m", "device_agent.verifier", "order", str(public_key)],
                          input=json.dumps(order), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["the verifier failed without a message"]
        raise ERRORS.get(proc.returncode, VerificationError)(lines[-1].removeprefix("error: "))
    return json.loads(proc.stdout)


def read_verified(artifact_path, public_key):
    """The artifact as read here, after a child verified exactly these bytes."""
    from edgeml.core.artifact import read_artifact

    verified = verify_in_child(artifact_path, public_key)
    artifact = read_artifact(artifact_path)
    if artifact.sha256 != verified["sha256"]:
        raise VerificationError(f"{artifact_path} changed while it was being verified; try again once it is complete")
    artifact.verified = True
    return artifact


def main(argv=None) -> int:
    from edgeml.core.artifact import verify_artifact
    from edgeml.core.orders import verify_order

    args = argv if argv is not None else sys.argv[1:]
    try:
        if args[0] == "order":  # a signed rollback order on stdin
            try:
                signed = json.loads(sys.stdin.read())
            except ValueError as exc:
                raise VerificationError(f"the rollback order is not JSON: {exc}") from exc
            print(json.dumps(verify_order(signed, Path(args[1]))))
            return 0
        artifact = verify_artifact(Path(args[0]), Path(args[1]))
    except EdgemlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"sha256": artifact.sha256, "key_id": artifact.key_id}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
