"""``edgeml-agent``: the device-side command.

For now it checks an artifact the way the update path will before it serves one: signature,
member hashes, then the self-test on this device's runtime. The daemon comes with its own issue.
"""
from __future__ import annotations

import argparse
import json
import sys

from edgeml.errors import EdgemlError, VerificationError

EXIT_CODES = "exit codes: 0 ok, 3 unreadable file, 5 runtime cannot load the model, 7 bad key, 8 verification or self-test failed"


def check(artifact_path, public_key) -> dict:
    """Verify and self-test an artifact with only the device's dependencies."""
    from edgeml.artifact import verify_artifact
    from edgeml.selftest import run_selftest

    art = verify_artifact(artifact_path, public_key)
    st = run_selftest(art)
    if not st.ok:
        raise VerificationError(
            f"self-test failed on output '{st.failed_output}' (max error {st.max_abs_error:.3g} > {st.atol:.3g}); "
            "do not serve this model on this device")
    return {"ok": True, "name": art.manifest["name"], "version": art.manifest["version"],
            "format": art.model_format, "key_id": art.key_id, "selftest": st.to_dict()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edgeml-agent", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify an artifact and run its self-test on this device")
    p.add_argument("artifact")
    p.add_argument("--public-key", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        result = check(args.artifact, args.public_key)
    except EdgemlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}))
        return exc.exit_code
    if args.json:
        print(json.dumps(result))
    else:
        print(f"OK: {result['name']} v{result['version']} ({result['format']}) verified and self-tested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
