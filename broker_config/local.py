"""A real mosquitto started from the project's templates in a temp dir (tests, benchmarks, local runs).

``LocalMosquitto`` renders the production ``mosquitto.conf.j2`` and ``acl.j2`` with test values (a free
port on 127.0.0.1, files in its own directory, no persistence, ``user root`` when run as root so the
password and ACL files stay readable), creates users with ``mosquitto_passwd``, optionally generates a
lab CA and a server certificate with ``openssl`` for a TLS listener, starts ``mosquitto -c`` in the
foreground and waits until it accepts connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker_config.fedspine_broker import add_user, render_acl, render_config
from broker_config.kit import make_lab_ca
from shared.config import BrokerConfig
from shared.topics import DEFAULT_ROOT

DEFAULT_TEST_USERS = {"coordinator": "coord-secret", "node-a": "node-a-secret", "node-b": "node-b-secret",
                      "monitor": "monitor-secret"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with code {proc.returncode} during start-up")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {host}:{port} within {timeout_s} s")


class LocalMosquitto:
    """``with LocalMosquitto() as b:`` a mosquitto with the project's config, auth and ACL on a free port."""

    def __init__(self, users: Mapping[str, str] | None = None, *, root: str = DEFAULT_ROOT,
                 coordinator_users: tuple[str, ...] = ("coordinator",), monitor_users: tuple[str, ...] = ("monitor",),
                 region_users: tuple[str, ...] = (), tls: bool = False, workdir: str | Path | None = None,
                 host: str = "127.0.0.1", **overrides: Any) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto binary not found: install the mosquitto package")
        self.users = dict(DEFAULT_TEST_USERS if users is None else users)
        self.root = root
        self.host = host
        self.port = free_port(host)
        self.tls_port = None
        while tls and self.tls_port in (None, self.port):  # the kernel may hand the same free port out twice
            self.tls_port = free_port(host)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedspine-mosquitto-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password_file = self.dir / "passwd"
        self.acl_file = self.dir / "acl"
        self.conf_file = self.dir / "mosquitto.conf"
        self.log_file = self.dir / "mosquitto.log"
        self.cafile: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._coordinators, self._monitors, self._regions = coordinator_users, monitor_users, region_users
        self._overrides = overrides
        self._tls = tls

    def render(self) -> None:
        for name, password in self.users.items():
            add_user(self.password_file, name, password)
        self.acl_file.write_text(render_acl(self.root, self._coordinators, self._monitors, self._regions))
        variables: dict[str, Any] = {
            "listen_address": self.host, "port": self.port, "password_file": str(self.password_file),
            "acl_file": str(self.acl_file), "persistence": False, "log_dest": ["stderr"],
            "log_types": ["error", "warning", "notice", "information"],
            "run_user": "root" if os.geteuid() == 0 else os.environ.get("USER", "mosquitto"),
        }
        if self._tls:
            self.cafile, cert, key = make_lab_ca(self.dir / "tls", self.host)
            variables.update(tls_port=self.tls_port, tls_address=self.host, tls_cafile=str(self.cafile),
                             tls_certfile=str(cert), tls_keyfile=str(key))
        variables.update(self._overrides)
        self.conf_file.write_text(render_config(**variables))

    def start(self, timeout_s: float = 10.0) -> LocalMosquitto:
        self.render()
        log = open(self.log_file, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf_file)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        try:
            _wait_port(self.host, self.port, self.proc, timeout_s)
            if self.tls_port:
                _wait_port(self.host, self.tls_port, self.proc, timeout_s)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- mosquitto log ---\n{self.log()}") from None
        return self

    def add_user(self, name: str, password: str) -> None:
        """Add a user to the running broker (mosquitto re-reads the password file on SIGHUP)."""
        add_user(self.password_file, name, password)
        self.users[name] = password
        self.reload()

    def reload(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            before = self.log().count("Reloading config")
            self.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self.log().count("Reloading config") <= before:
                time.sleep(0.02)

    def url(self, tls: bool = False) -> str:
        if tls:
            if not self.tls_port:
                raise RuntimeError("this broker was started without TLS")
            return f"mqtts://{self.host}:{self.tls_port}"
        return f"mqtt://{self.host}:{self.port}"

    def broker_config(self, username: str | None, *, tls: bool = False, **kw: Any) -> BrokerConfig:
        """A BrokerConfig for ``username`` with its known password (None: anonymous)."""
        password = self.users.get(username) if username else None
        return BrokerConfig(url=self.url(tls), username=username, password=password,
                            ca_file=str(self.cafile) if tls and self.cafile else None, topic_root=self.root, **kw)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
