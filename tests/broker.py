"""A real Mosquitto broker per test, on a free port, that tests can stop, restart and misconfigure.

``make test`` installs Debian's mosquitto when it is missing. Each broker gets its own folder
(config, persistence, log, password and ACL files, TLS material) under the test's tmp_path.
"""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional


def mosquitto_binary(name: str = "mosquitto") -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None)
    if not found:
        raise RuntimeError(f"{name} is not installed; `make test` installs it (apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """``users`` {name: password} turns on password auth; ``acl`` is the text of an ACL file;
    ``tls`` {cafile, certfile, keyfile, require_certificate} adds a TLS listener (``tls_port``)."""

    def __init__(self, folder: Path, *, users: Optional[Dict[str, str]] = None, acl: Optional[str] = None,
                 tls: Optional[dict] = None, extra: str = "", persistence: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.users, self.acl, self.tls, self.extra, self.persistence = users, acl, tls, extra, persistence
        self.process: Optional[subprocess.Popen] = None
        self.config = self.folder / "mosquitto.conf"
        self._write_config()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def _write_config(self) -> None:
        lines = [
            f"user {getpass.getuser()}",  # run as root, mosquitto would drop to a user who can't read tmp_path
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if self.users else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            f"log_dest file {self.folder / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 0",  # the tests fill the broker while a subscriber is away
        ]
        if self.users:
            passwords = self.folder / "passwords"
            passwords.write_text("")
            for user, password in self.users.items():
                subprocess.run([mosquitto_binary("mosquitto_passwd"), "-b", str(passwords), user, password],
                               check=True, capture_output=True)
            lines.append(f"password_file {passwords}")
        if self.acl is not None:
            acl = self.folder / "acl"
            acl.write_text(self.acl)
            lines.append(f"acl_file {acl}")
        if self.tls:
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.tls['cafile']}",
                      f"certfile {self.tls['certfile']}", f"keyfile {self.tls['keyfile']}"]
            if self.tls.get("require_certificate"):
                lines += ["require_certificate true", "use_identity_as_username true"]
        if self.extra:
            lines.append(self.extra)
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        if self.process and self.process.poll() is None:
            return self
        self.process = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start: {self.process.stderr.read().decode()[-500:]} "
                                   f"{self.log()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a power cut would: what the broker had only in memory is gone."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""
