"""The shadow's own process: runs the candidate on the requests the agent hands it and counts how
its outputs compare with the active model's (``edgeml.core.shadow``).

A separate process because a thread of the agent's would share its interpreter lock: the
candidate's validation, runtime calls and comparison, on every sampled request, would hold up
the answers of the active model (measured: +140% p50 in-process at sample 1.0 as a thread).

Protocol on stdin/stdout, frames of ``len (4 bytes, big endian) + pickle``. In: ``("req",
[(inputs, outputs, active_ms), ...])``, ``("flush",)``, ``("stop",)``; out: ``("ready", info)``
once the candidate is loaded, or ``("failed", message)``, then one ``("counts", window)`` per
flush or stop. It reads the artifact the agent verified, checked by its sha256.

Run by ``ShadowRunner``: ``python -m device_agent.shadow.worker PATH SHA256 THREADS``.
"""
from __future__ import annotations

import os
import sys

def empty() -> dict:
    return {"compared": 0, "errors": 0, "rows": 0, "agreed": 0, "cosine_n": 0, "cosine_sum": 0.0,
            "cosine_min": None, "active_ms": {}, "shadow_ms": {}, "first_error": None}


def main(argv=None) -> int:
    from edgeml.core import shadow as sh
    from edgeml.core.artifact import read_artifact
    from edgeml.core.errors import first_line

    from ..serving import ModelService
    from .frames import read_frame, write_frame
    from .runner import class_outputs, pair

    path, sha256, threads = (argv or sys.argv[1:])[:3]
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    try:
        os.nice(10)  # the agent's answers come first on a busy device
    except OSError:
        pass

    def verified(p, _key):
        art = read_artifact(p)
        if art.sha256 != sha256:
            raise ValueError(f"{p} is not the artifact the agent verified")
        return art

    try:
        candidate = ModelService.load(path, None, num_threads=int(threads), verify=verified)
    except Exception as exc:
        write_frame(out, ("failed", first_line(str(exc), 300)))
        return 1
    classes = class_outputs(candidate)
    write_frame(out, ("ready", {"version": candidate.version}))
    w = empty()
    while True:
        message = read_frame(inp)
        if message is None or message[0] == "stop":
            write_frame(out, ("counts", w))
            return 0
        if message[0] == "flush":
            write_frame(out, ("counts", w))
            w = empty()
            continue
        for inputs, outputs, active_ms, active_classes in message[1]:
            try:
                result = candidate.infer(inputs)
                shadow_ms = candidate.last_run_ms()
                paired, cls = pair(outputs, result, classes)
                found = sh.compare(outputs, paired, cls | (set(active_classes) & set(outputs)))
            except Exception as exc:  # the candidate's failure is a finding
                w["errors"] += 1
                if w["first_error"] is None:
                    w["first_error"] = first_line(getattr(exc, "message", None) or str(exc), 300)
                continue
            w["compared"] += 1
            sh.add_window(w, found)
            for key, ms in (("active_ms", active_ms), ("shadow_ms", shadow_ms)):
                if ms is not None:
                    b = str(sh.bucket(ms))
                    w[key][b] = w[key].get(b, 0) + 1


if __name__ == "__main__":
    sys.exit(main())
