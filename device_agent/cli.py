"""``edgeml-agent``: the device-side command.

``run`` is the daemon (see ``device_agent.daemon``); ``check`` verifies an artifact the way the
daemon does before it serves one: signature, member hashes, then the self-test on this device's
runtime.
"""
from __future__ import annotations

import argparse
import json
import sys

from edgeml.core.errors import EdgemlError

EXIT_CODES = ("exit codes: 0 ok (run: stopped by SIGTERM/SIGINT), 1 internal error, 2 bad option or config, "
              "3 unreadable file, 5 runtime cannot load the model, 7 bad key, 8 verification or self-test failed")
RUN_FLAGS = (  # (flag, config key, type, help)
    ("--artifact", "artifact", str, "the .edgeml artifact to serve"),
    ("--public-key", "public_key", str, "signing.pub the artifact must verify against"),
    ("--data-dir", "data_dir", str, "folder for the telemetry queue"),
    ("--device-id", "device_id", str, "this device's id"),
    ("--fleet", "fleet", str, "the fleet it belongs to [default: default]"),
    ("--api", "api", str, "HOST:PORT of the local KServe v2 API, or off [default: 127.0.0.1:8500]"),
    ("--threads", "threads", int, "runtime threads [default: 1]"),
    ("--log-level", "log_level", str, "debug, info, warning or error [default: info]"),
    ("--broker", "broker", str, "mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; leave out to run offline"),
    ("--username", "username", str, "MQTT user name"),
    ("--password-file", "password_file", str, "file holding the MQTT password"),
    ("--ca-file", "ca_file", str, "CA certificate for TLS"),
    ("--cert-file", "cert_file", str, "client certificate for mutual TLS"),
    ("--key-file", "key_file", str, "client key for mutual TLS"),
    ("--ack-timeout", "ack_timeout_s", float, "seconds without the host's ack before telemetry is sent again [default: 30]"),
    ("--queue-max-bytes", "queue_max_bytes", int, "telemetry queue bound; the oldest records go first [default: 64 MiB]"),
    ("--stats-window", "stats_window_s", float, "seconds per input-statistics record [default: 60]"),
    ("--system-interval", "system_interval_s", float, "seconds between system records [default: 30]"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body; larger get 413 [default: 16 MiB]"),
    ("--fetch-timeout", "fetch_timeout_s", float, "seconds before an unanswered block request is repeated, doubling "
                                                  "[default: 5]"),
    ("--fetch-attempts", "fetch_attempts", int, "requests per block before a download is reported failed [default: 6]"),
    ("--drift", "drift", lambda text: _on_off(text), "on or off: count requests into the baseline's bins [default: on]"),
    ("--drift-window", "drift_window_s", float, "seconds per drift window sent to the host [default: 60]"),
    ("--drift-windows", "drift_windows", int, "windows an alert judges, the latest ones [default: 10]"),
    ("--drift-min-samples", "drift_min_samples", int, "samples those windows need before any judgement [default: 200]"),
    ("--js-threshold", "js_threshold", float, "Jensen-Shannon distance past which a feature drifted [default: 0.1]"),
    ("--psi-threshold", "psi_threshold", float, "PSI past which a feature drifted [default: 0.2]"),
    ("--confidence-drop", "confidence_drop", float, "drop of mean top-1 confidence that alerts [default: 0.1]"),
    ("--clear-ratio", "clear_ratio", float, "an alert clears below this share of its threshold [default: 0.7]"),
    ("--feedback", "feedback", lambda text: _on_off(text), "on or off: keep requests for ground truth [default: off]"),
    ("--feedback-sample", "feedback_sample", float, "share of requests kept waiting for a label [default: 1.0]"),
    ("--feedback-pending", "feedback_pending", int, "requests waiting for a label at most [default: 1000]"),
    ("--feedback-max-bytes", "feedback_max_bytes", int, "bound of the labelled-sample reservoir [default: 16 MiB]"),
    ("--api-token-file", "token_file", str, "bearer tokens for the API, one per line (required beyond loopback)"),
    ("--open-health", "open_health", lambda text: _on_off(text), "on: /v2/health/* need no token [default: off]"),
    ("--tls-cert-file", "tls_cert_file", str, "HTTPS: the API's certificate (with --tls-key-file)"),
    ("--tls-key-file", "tls_key_file", str, "HTTPS: the API's private key"),
    ("--tls-client-ca-file", "tls_client_ca_file", str, "mutual TLS: clients need a certificate this CA signed"),
    ("--backlog", "backlog", int, "connections the kernel queues before they are accepted [default: 128]"),
    ("--max-connections", "max_connections", int, "connections open at once; beyond, 503 [default: 128]"),
    ("--workers", "workers", int, "requests running the model at once; beyond, 503 with Retry-After [default: 8]"),
    ("--request-timeout", "request_timeout_s", float, "seconds for a request's headers and body to arrive [default: 10]"),
    ("--instances", "instances", int, "interpreters of the model, one thread each [default: 1]"),
    ("--max-batch", "max_batch", int, "dynamic batching: rows merged from concurrent requests, 0 off [default: 0]"),
    ("--max-delay-ms", "max_delay_ms", float, "dynamic batching: longest wait for more requests [default: 1.0]"),
    ("--cache-bytes", "cache_bytes", int, "response cache bound in bytes, 0 off [default: 0]"),
)


def _on_off(text: str) -> bool:
    value = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off")
    return value


def check(artifact_path, public_key) -> dict:
    """Verify and self-test an artifact with only the device's dependencies."""
    from edgeml.core.artifact import verify_artifact
    from edgeml.core.selftest import run_selftest

    art = verify_artifact(artifact_path, public_key)
    st = run_selftest(art).require_ok("do not serve this model on this device")
    return {"ok": True, "name": art.manifest["name"], "version": art.manifest["version"],
            "format": art.model_format, "key_id": art.key_id, "selftest": st.to_dict()}


def run(args) -> dict:
    """Start the daemon and block until SIGTERM/SIGINT."""
    import logging

    from .config import load_config
    from .daemon import Agent

    flags = {key: getattr(args, key) for _, key, _, _ in RUN_FLAGS}
    config = load_config(args.config, flags)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(config, flags).catch_signals().start()
    print(f"ready: {agent.service.name} v{agent.service.version} on {agent.api_url or 'no API'}", file=sys.stderr,
          flush=True)
    agent.run_forever()
    return {"ok": True, "stopped": True, **agent.status()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edgeml-agent", description=__doc__.splitlines()[0], epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="verify an artifact and run its self-test on this device")
    p.add_argument("artifact")
    p.add_argument("--public-key", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r = sub.add_parser("run", help="serve an artifact and keep its telemetry (the daemon)", epilog=EXIT_CODES)
    r.add_argument("--config", help="TOML config file; flags override it")
    for flag, key, kind, text in RUN_FLAGS:
        r.add_argument(flag, dest=key, type=kind, help=text)
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout when it stops")
    args = parser.parse_args(argv)
    try:
        result = check(args.artifact, args.public_key) if args.command == "check" else run(args)
    except EdgemlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}))
        return exc.exit_code
    except Exception as exc:  # a bug: one line, not a traceback
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=str))
    elif args.command == "check":
        print(f"OK: {result['name']} v{result['version']} ({result['format']}) verified and self-tested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
