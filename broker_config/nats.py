"""NATS as the fleet's clustered MQTT engine: render member and permission configs, and run a local cluster.

``render_nats_config`` and ``render_nats_auth`` render ``nats.conf.j2`` (one member: MQTT listener, JetStream
with replicated MQTT state, routes, TLS) and ``nats-auth.conf.j2`` (users and per-node permissions, the
equivalent of ``acl.j2``).  Passwords are stored as bcrypt hashes in a ``user:hash`` file (``set_password``).

``LocalNatsCluster`` starts real ``nats-server`` members from those templates on free loopback ports, each
with its own store directory, for tests, benchmarks and local runs; ``kill(i)`` and ``start_member(i)`` take
a member down and bring it back::

    with LocalNatsCluster(users) as cluster:
        cfg = cluster.broker_config("node-a")      # url = every member's mqtt://127.0.0.1:port
        cluster.kill(0)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2

from broker_config.local import DEFAULT_TEST_USERS, make_lab_ca
from shared.config import BrokerConfig
from shared.topics import DEFAULT_ROOT, TopicError, Topics, check_nats_name

TEMPLATE_DIR = Path(__file__).resolve().parent
DEFAULT_BCRYPT_COST = 11  # what `nats server passwd` uses; every connect verifies one hash
AUTH_FILE = "nats-auth.conf"


class NatsError(RuntimeError):
    """A NATS configuration that cannot be rendered, or a member that does not start."""


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def render_nats_config(**variables: Any) -> str:
    """Render ``nats.conf.j2`` for one member (``server_name``, ``store_dir`` and ``routes`` are required)."""
    missing = [k for k in ("server_name", "store_dir", "routes") if k not in variables]
    if missing:
        raise NatsError(f"render_nats_config needs {missing}")
    return _env().get_template("nats.conf.j2").render(**variables)


def render_nats_auth(password_hashes: Mapping[str, str], topic_root: str = DEFAULT_ROOT,
                     coordinator_users: Iterable[str] = ("coordinator",), monitor_users: Iterable[str] = (),
                     node_users: Iterable[str] | None = None, region_users: Iterable[str] = ()) -> str:
    """Render ``nats-auth.conf.j2``.  ``node_users`` defaults to every user of ``password_hashes`` that is
    neither a coordinator, a monitor nor a regional aggregator.  Names and the root must be NATS-safe (no '.')."""
    coordinators, monitors, regions = list(coordinator_users), list(monitor_users), list(region_users)
    nodes = ([u for u in password_hashes if u not in coordinators + monitors + regions] if node_users is None
             else list(node_users))
    Topics(topic_root)
    if "." in topic_root:
        raise NatsError(f"topic root {topic_root!r} contains '.', which NATS refuses in MQTT topics")
    if not coordinators:
        raise NatsError("at least one coordinator user is needed")
    users = coordinators + monitors + regions + nodes
    if len(set(users)) != len(users):
        raise NatsError(f"a user has two roles: {sorted(u for u in set(users) if users.count(u) > 1)}")
    for u in users:
        try:
            check_nats_name(u, "user name")
        except TopicError as exc:
            raise NatsError(str(exc)) from None
        if not _is_bcrypt(password_hashes.get(u, "")):
            raise NatsError(f"user {u!r} has no bcrypt password hash")
    return _env().get_template("nats-auth.conf.j2").render(
        topic_root=topic_root, coordinator_users=coordinators, monitor_users=monitors, node_users=nodes,
        region_users=regions, password_hashes=dict(password_hashes))


# ---- passwords (bcrypt, as nats-server verifies them) ------------------------------------------------------
def _is_bcrypt(h: str) -> bool:
    return len(h) == 60 and h[:4] in ("$2a$", "$2b$", "$2y$")


def hash_password(password: str, cost: int = DEFAULT_BCRYPT_COST) -> str:
    import bcrypt  # the broker tools' own dependency (extra "broker")

    if not password or any(c in password for c in "\n\r\0"):
        raise NatsError("password must be non-empty and on one line")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def password_matches(hashed: str, password: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:
        return False


def read_passwords(path: str | Path) -> dict[str, str]:
    """User -> bcrypt hash of a ``user:hash`` file (blank lines and ``#`` comments skipped)."""
    p = Path(path)
    if not p.exists():
        return {}
    out = {}
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, h = line.split(":", 1)
            out[user] = h
    return out


def write_passwords(path: str | Path, hashes: Mapping[str, str]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in hashes.items()))
    os.chmod(tmp, 0o640)
    os.replace(tmp, p)


def set_password(path: str | Path, user: str, password: str, cost: int = DEFAULT_BCRYPT_COST) -> bool:
    """Add ``user`` or change its password in the ``user:hash`` file; False when the hash already matched."""
    try:
        check_nats_name(user, "user name")
    except TopicError as exc:
        raise NatsError(str(exc)) from None
    hashes = read_passwords(path)
    if user in hashes and password_matches(hashes[user], password):
        return False
    hashes[user] = hash_password(password, cost)
    write_passwords(path, hashes)
    return True


# ---- a local cluster ----------------------------------------------------------------------------------------
def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free now and outside the kernel's ephemeral range: a member killed and started
    again must find its ports unused, and any outgoing connection may take an ephemeral one meanwhile."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65000) if not low <= p <= high]
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    out: list[int] = []
    while len(out) < count:
        port = rng.choice(candidates)
        if port in out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        out.append(port)
    return out


def require_nats_server() -> str:
    """The nats-server binary, or a RuntimeError saying how to install it (tests fail, never skip)."""
    exe = shutil.which("nats-server")
    if exe is None:
        raise RuntimeError("nats-server not found: install it (apt-get install nats-server, version 2.9 or "
                           "later) to run the tests marked 'nats'")
    return exe


class LocalNatsCluster:
    """``with LocalNatsCluster() as c:`` ``members`` nats-servers with MQTT, JetStream (MQTT state replicated
    on every member), the project's users and permissions, on free 127.0.0.1 ports, each with its own store
    directory.  ``c.urls`` lists every member's MQTT URL; ``broker_config(user)`` gives a client config."""

    def __init__(self, users: Mapping[str, str] | None = None, *, members: int = 3, root: str = DEFAULT_ROOT,
                 coordinator_users: tuple[str, ...] = ("coordinator",), monitor_users: tuple[str, ...] = ("monitor",),
                 region_users: tuple[str, ...] = (), tls: bool = False, workdir: str | Path | None = None,
                 host: str = "127.0.0.1", bcrypt_cost: int = 4, **overrides: Any) -> None:
        self.binary = require_nats_server()
        self.users = dict(DEFAULT_TEST_USERS if users is None else users)
        self.root, self.host, self.n = root, host, members
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedspine-nats-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * members, host)
        self.mqtt_ports, self.client_ports, self.route_ports = ports[:members], ports[members:2 * members], ports[2 * members:]
        self.cafile: Path | None = None
        self.procs: list[subprocess.Popen | None] = [None] * members
        self._coordinators, self._monitors, self._regions = coordinator_users, monitor_users, region_users
        self._tls, self._cost, self._overrides = tls, bcrypt_cost, overrides

    # ---- files --------------------------------------------------------------------------------------------
    def member_dir(self, i: int) -> Path:
        return self.dir / f"member-{i}"

    def conf_file(self, i: int) -> Path:
        return self.member_dir(i) / "nats.conf"

    def log_file(self, i: int) -> Path:
        return self.member_dir(i) / "nats.log"

    def render(self) -> None:
        hashes = {u: hash_password(pw, self._cost) for u, pw in self.users.items()}
        auth = render_nats_auth(hashes, self.root, self._coordinators, self._monitors, region_users=self._regions)
        tls: dict[str, str] = {}
        if self._tls:
            self.cafile, cert, key = make_lab_ca(self.dir / "tls", self.host)
            tls = {"tls_cafile": str(self.cafile), "tls_certfile": str(cert), "tls_keyfile": str(key)}
        routes = [f"{self.host}:{p}" for p in self.route_ports]
        for i in range(self.n):
            d = self.member_dir(i)
            d.mkdir(parents=True, exist_ok=True)
            (d / AUTH_FILE).write_text(auth)
            variables: dict[str, Any] = {
                "server_name": f"fs-{i}", "listen_address": self.host, "client_port": self.client_ports[i],
                "mqtt_address": self.host, "mqtt_port": self.mqtt_ports[i], "store_dir": str(d),
                "cluster_name": "fedspine-test", "cluster_address": self.host, "cluster_port": self.route_ports[i],
                "routes": routes, "route_user": "route", "route_password": "route-secret",
                "stream_replicas": min(3, self.n), "max_file_store": 1 << 30, **tls, **self._overrides}
            self.conf_file(i).write_text(render_nats_config(**variables))

    # ---- processes ----------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> LocalNatsCluster:
        self.render()
        for i in range(self.n):
            self._spawn(i)
        try:
            self.wait_ready(range(self.n), timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> None:
        with open(self.log_file(i), "ab") as log:
            self.procs[i] = subprocess.Popen([self.binary, "-c", str(self.conf_file(i))], stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def start_member(self, i: int, timeout_s: float = 60.0) -> None:
        """Bring member ``i`` back (same config and store: it rejoins the cluster and catches up)."""
        if self.alive(i):
            return
        self._spawn(i)
        self.wait_ready([i], timeout_s)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``: its clients lose their connection without a goodbye."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self.procs[i] = None

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def wait_ready(self, members: Iterable[int], timeout_s: float) -> None:
        """Until each member accepts an authenticated MQTT session (which needs the JetStream meta leader and
        the MQTT streams): a plain TCP connect succeeds long before that."""
        user = self._coordinators[0]
        deadline = time.monotonic() + timeout_s
        for i in members:
            while True:
                if not self.alive(i):
                    code = self.procs[i].returncode if self.procs[i] is not None else None
                    raise RuntimeError(f"nats-server member {i} exited during start-up (exit code {code}, "
                                       f"config {self.conf_file(i)})\n{self.log(i)[-4000:]}")
                if mqtt_connects(self.host, self.mqtt_ports[i], user, self.users[user], self.cafile):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server member {i} did not accept MQTT sessions within {timeout_s} s\n"
                                       f"{self.log(i)[-4000:]}")
                time.sleep(0.2)

    def reload(self) -> None:
        """Make every running member re-read its configuration (users and permissions)."""
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
            self.procs[i] = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalNatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- clients ------------------------------------------------------------------------------------------
    def url(self, i: int) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.mqtt_ports[i]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(self.n)]

    def broker_config(self, username: str | None, *, first: int = 0, **kw: Any) -> BrokerConfig:
        """A BrokerConfig for ``username`` listing every member, member ``first`` first (None: anonymous)."""
        urls = self.urls[first:] + self.urls[:first]
        password = self.users.get(username) if username else None
        return BrokerConfig(url=tuple(urls), username=username, password=password,
                            ca_file=str(self.cafile) if self.cafile else None, topic_root=self.root, **kw)

    def member_of(self, url: str) -> int:
        return self.urls.index(url)

    def log(self, i: int | None = None) -> str:
        members = range(self.n) if i is None else [i]
        out = []
        for m in members:
            try:
                out.append(f"--- member {m} ---\n" + self.log_file(m).read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)


def mqtt_connects(host: str, port: int, user: str, password: str, cafile: Path | None) -> bool:
    """One MQTT 3.1.1 CONNECT with a bare paho client: True on a successful CONNACK within 2 s."""
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ready-{time.monotonic_ns()}", protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    if cafile is not None:
        c.tls_set(ca_certs=str(cafile), cert_reqs=ssl.CERT_REQUIRED)
    ok = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: ok.set() if not rc.is_failure else None
    try:
        c.connect(host, port, keepalive=10)
    except OSError:
        return False
    end = time.monotonic() + 2.0
    try:
        while not ok.is_set() and time.monotonic() < end:
            if c.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except OSError:
        return False
    finally:
        try:
            c.disconnect()
        except OSError:
            pass
    return ok.is_set()
