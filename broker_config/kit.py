"""The provisioning kit: ``fedspine kit --fleet fleet.toml --out kit/`` writes everything a real fleet needs.

From a short fleet description (docs/examples/fleet.toml: the broker's host and port, TLS on or off, the node ids
and tiers, the label list, the model and data paths) it writes one folder per host::

    kit/broker/       mosquitto.conf, passwd, acl (+ ca.crt, server.crt, server.key with TLS)
    kit/broker/<member>/  with engine = "nats", instead: one folder per cluster member, nats.conf and nats-auth.conf
                      (+ ca.crt, server.crt, server.key with TLS)
    kit/coordinator/  coordinator.toml, password (+ ca.crt)
    kit/monitor/      monitor.toml, password (+ ca.crt)
    kit/nodes/<id>/   node.toml ([node] id == broker username == <id>), password (+ ca.crt)
    kit/regions/<rid>/ region.toml for `fedspine region` (broker username == <rid>), password (+ ca.crt);
                      only when the fleet has [[regions]]
    kit/ca/           the lab CA's key and certificate (TLS only; keep the key off the fleet)
    kit/README.md     which file goes where

The broker files come from the same templates and password tooling as ``fedspine broker`` and the Ansible
broker role (mosquitto.conf.j2, acl.j2, mosquitto_passwd).  Every generated TOML file is loaded back through the
services' own config classes before the kit is written, so a kit that is written is a kit that starts.  Passwords
are generated once: running the kit again over the same folder keeps every secret (and the CA) it finds.

Regions (hierarchical aggregation, docs/scale.md): ``[[regions]]`` declares each regional aggregator and every
node names its own with ``region = "<rid>"``.  The kit then adds each region's broker user (its ACL block from
``render_acl(region_users=...)``), its ``region.toml``, and writes its nodes' ``topic_root`` as
``<root>/region/<rid>``; the coordinator's configuration is the same as for a flat fleet.  A fleet without
``[[regions]]`` renders exactly as before regions existed (tests/shared/test_kit.py pins it).

NATS (docs/brokers.md, docs/examples/fleet-nats.toml): ``[broker] engine = "nats"`` and one ``[[broker.members]]``
table per cluster member replace mosquitto's single broker.  Each member's folder gets its ``nats.conf``
(``render_nats_config``: routes to every member, JetStream store, MQTT listener, with TLS its own certificate for
its host from the same lab CA) and the shared ``nats-auth.conf`` (``render_nats_auth``: bcrypt hashes of the same
passwords the services' password files hold, the permissions of ``fedspine broker render-nats-auth``).  Every
service's ``[broker] url`` lists every member, node k's starting with member k mod n, so sessions spread over the
members and fail over.  ``broker/passwd`` keeps the hashes and ``broker/route-password`` the members' route secret
across runs, like every other secret.  One member is a standalone server (no cluster block).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_config.fedspine_broker import RESERVED_USERS, add_user, readable_by, render_acl, render_config
from shared.config import ConfigError, load_toml
from shared.topics import DEFAULT_ROOT, TopicError, Topics, check_nats_name, check_node_id

SECTIONS = {"fleet", "broker", "nodes", "regions", "coordinator", "pruning", "lora", "bandit", "node", "train",
            "telemetry"}
BROKER_KEYS = {"engine", "host", "port", "tls", "bind", "run_user", "persistence", "cert_days", "members",
               "bcrypt_cost"}
ENGINE_KEYS = {"mosquitto": {"host", "port", "persistence"}, "nats": {"members", "bcrypt_cost"}}  # the others: both
MEMBER_KEYS = {"name", "host", "port", "route_port", "client_port", "store_dir"}
NODE_KEYS = {"id", "tier", "data_path", "test_path", "state_dir", "model_path", "region"}
REGION_KEYS = {"id", "deadline_s", "quorum"}
FLEET_KEYS = {"topic_root", "labels", "model_path", "data_dir", "state_root"}
COORDINATOR_EXTRA = ("pruning", "lora", "bandit")  # copied into coordinator.toml as they are, like [coordinator]


@dataclass
class Fleet:
    """A parsed fleet.toml (see docs/examples/fleet.toml for every key)."""

    host: str
    port: int
    tls: bool
    labels: list[str]
    model_path: str
    nodes: list[dict[str, Any]]
    topic_root: str = DEFAULT_ROOT
    bind: str = "0.0.0.0"
    run_user: str = "mosquitto"
    persistence: bool = True
    cert_days: int = 825
    state_root: str = ""
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)  # region id -> its [region] settings
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # [coordinator], [pruning], [lora], [node]…
    engine: str = "mosquitto"  # or "nats": then members replaces host, port and persistence
    members: list[dict[str, Any]] = field(default_factory=list)  # NATS: name, host, port, route_port, client_port,
    #                                                               store_dir (None: in the member's kit folder)
    bcrypt_cost: int | None = None  # NATS password hashes; None: broker_config.nats.DEFAULT_BCRYPT_COST

    @property
    def url(self) -> str:
        """The mosquitto broker's URL."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def member_urls(self) -> list[str]:
        return [f"{'mqtts' if self.tls else 'mqtt'}://{m['host']}:{m['port']}" for m in self.members]

    def client_url(self, first: int = 0) -> str | list[str]:
        """A service's ``[broker] url``: mosquitto's one URL, or every NATS member's starting with member
        ``first`` (mod n), so that the fleet's sessions spread over the members."""
        if self.engine != "nats":
            return self.url
        urls, k = self.member_urls, first % len(self.members)
        return urls[k:] + urls[:k]


def _table_id(table: dict[str, Any], array: str, i: int, what: str) -> str:
    """The ``id`` of entry ``i`` of ``[[array]]``: a valid topic level that is not a reserved broker user (it is the
    node's or region's broker user name)."""
    try:
        tid = check_node_id(str(table.get("id", "")))
    except TopicError as exc:
        raise ConfigError(f"[[{array}]] #{i + 1} id: {exc}") from None
    if tid in RESERVED_USERS:
        raise ConfigError(f"[[{array}]] id {tid!r} is reserved for the {tid} broker user; name the {what} otherwise")
    return tid


def _unknown(table: dict, known: set, where: str) -> None:
    if bad := sorted(set(table) - known):
        raise ConfigError(f"{where}: unknown key(s) {bad}; known: {sorted(known)}")


def load_fleet(path: str | Path) -> Fleet:
    """Read and check a fleet description; errors name the key (ConfigError)."""
    data = load_toml(path)
    _unknown(data, SECTIONS, f"{path}")
    fleet, broker = dict(data.get("fleet", {})), dict(data.get("broker", {}))
    _unknown(fleet, FLEET_KEYS, "[fleet]")
    _unknown(broker, BROKER_KEYS, "[broker]")
    for key in ("labels", "model_path"):
        if key not in fleet:
            raise ConfigError(f"[fleet] {key} is required")
    engine = broker.get("engine", "mosquitto")
    if not isinstance(engine, str) or engine not in ENGINE_KEYS:
        raise ConfigError(f"[broker] engine: {engine!r} is not one of {sorted(ENGINE_KEYS)}")
    for other, keys in ENGINE_KEYS.items():
        if other != engine and (wrong := sorted(keys & set(broker))):
            raise ConfigError(f"[broker] {', '.join(wrong)}: only with engine = {other!r} (this fleet's engine is "
                              f"{engine!r})" + ("; each NATS member has its own [[broker.members]] host and port"
                                                if {"host", "port"} & set(wrong) else ""))
    if engine == "mosquitto" and "host" not in broker:
        raise ConfigError("[broker] host is required (the name or address nodes reach the broker at)")
    tls = bool(broker.get("tls", True))
    members = _load_members(broker.get("members"), tls) if engine == "nats" else []
    nodes = list(data.get("nodes", []))
    if not nodes:
        raise ConfigError("[[nodes]]: at least one node is needed")
    seen: set[str] = set()
    data_dir = Path(fleet["data_dir"]) if fleet.get("data_dir") else None
    for i, n in enumerate(nodes):
        _unknown(n, NODE_KEYS, f"[[nodes]] #{i + 1}")
        nid = _table_id(n, "nodes", i, "node")
        if nid in seen:
            raise ConfigError(f"[[nodes]] id {nid!r} appears twice")
        seen.add(nid)
        if "data_path" not in n:
            if data_dir is None:
                raise ConfigError(f"[[nodes]] {nid}: data_path is required (or set [fleet] data_dir)")
            n["data_path"] = str(data_dir / nid / "train.csv")
    try:
        Topics(fleet.get("topic_root", DEFAULT_ROOT))
    except TopicError as exc:
        raise ConfigError(f"[fleet] topic_root: {exc}") from None
    extra = {k: dict(data[k]) for k in ("coordinator", *COORDINATOR_EXTRA, "node", "train", "telemetry") if k in data}
    tables = data.get("regions", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("regions: expected [[regions]] tables, each with an id")
    regions = _load_regions(tables, nodes, extra.get("coordinator", {}))
    if engine == "nats":
        _check_nats_names(fleet.get("topic_root", DEFAULT_ROOT), nodes, regions)
        cost = broker.get("bcrypt_cost")
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int) or not 4 <= cost <= 31):
            raise ConfigError(f"[broker] bcrypt_cost must be an integer from 4 to 31, got {cost!r}")
    return Fleet(host=str(broker.get("host", "")), port=int(broker.get("port", 8883 if tls else 1883)), tls=tls,
                 labels=[str(x) for x in fleet["labels"]], model_path=str(fleet["model_path"]), nodes=nodes,
                 topic_root=fleet.get("topic_root", DEFAULT_ROOT), bind=str(broker.get("bind", "0.0.0.0")),
                 run_user=str(broker.get("run_user", "nats" if engine == "nats" else "mosquitto")),
                 persistence=bool(broker.get("persistence", True)),
                 cert_days=int(broker.get("cert_days", 825)), state_root=str(fleet.get("state_root", "")),
                 regions=regions, extra=extra, engine=engine, members=members, bcrypt_cost=broker.get("bcrypt_cost"))


def _load_members(tables: Any, tls: bool) -> list[dict[str, Any]]:
    """Check ``[[broker.members]]`` of a NATS fleet; returns each member with its ports filled in.

    A member's name is its ``server_name`` and its folder ``kit/broker/<name>/``; ``host`` is where the clients and
    the other members reach it (and what its certificate names).  Names must be unique, and so must every listener
    (MQTT ``port``, ``route_port``, NATS ``client_port``) on one host."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ConfigError('[broker] members: engine = "nats" needs at least one [[broker.members]] table (name, host, '
                          "port, route_port)")
    members: list[dict[str, Any]] = []
    listeners: dict[tuple[str, int], str] = {}  # (host, port) -> "<member>'s <key>"
    for i, t in enumerate(tables):
        if "tls" in t:
            raise ConfigError(f"[[broker.members]] #{i + 1}: tls is fleet-wide ([broker] tls): clients fail over "
                              "between members and never fall back to plain text")
        _unknown(t, MEMBER_KEYS, f"[[broker.members]] #{i + 1}")
        name = t.get("name")
        try:
            check_nats_name(name, "member name")
        except TopicError:
            raise ConfigError(f"[[broker.members]] #{i + 1} name: {name!r} is not a member name (its server_name and "
                              "folder): use 1-64 of [A-Za-z0-9_-], starting alphanumeric") from None
        if any(m["name"] == name for m in members):
            raise ConfigError(f"[[broker.members]] name {name!r} appears twice")
        host = t.get("host")
        if not isinstance(host, str) or not host or any(c in host for c in ":/@ \t"):
            raise ConfigError(f"[[broker.members]] {name}: host is required, a host name or IPv4 address (where the "
                              f"clients and the other members reach it), got {host!r}")
        store = t.get("store_dir")
        if store is not None and not (isinstance(store, str) and store.startswith("/")):
            raise ConfigError(f"[[broker.members]] {name}: store_dir must be an absolute path on the member's host, "
                              f"got {store!r}")
        member: dict[str, Any] = {"name": name, "host": host, "store_dir": store}
        for key, default in (("port", 8883 if tls else 1883), ("route_port", 6222), ("client_port", 4222)):
            port = t.get(key, default)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"[[broker.members]] {name}: {key} must be a port number (1-65535), got {port!r}")
            if (host, port) in listeners:
                raise ConfigError(f"[[broker.members]] {name}: {key} {host}:{port} is already {listeners[host, port]}")
            listeners[host, port] = f"{name}'s {key}"
            member[key] = port
        members.append(member)
    return members


def _check_nats_names(topic_root: str, nodes: list[dict], regions: dict) -> None:
    """NATS carries MQTT topic levels as subject tokens separated by '.': the root and every id used as a topic
    level (node ids, region ids) must be without one (mosquitto fleets keep the wider rule)."""
    if "." in topic_root:
        raise ConfigError(f"[fleet] topic_root {topic_root!r}: NATS refuses '.' in MQTT topics (engine = \"nats\")")
    for array, ids in (("nodes", [n["id"] for n in nodes]), ("regions", list(regions))):
        if dotted := [tid for tid in ids if "." in tid]:
            raise ConfigError(f"[[{array}]] id {dotted[0]!r}: NATS refuses '.' in MQTT topics, and the id is a topic "
                              "level (engine = \"nats\"); use [A-Za-z0-9_-] only")


def _load_regions(tables: list[dict], nodes: list[dict], coordinator: dict) -> dict[str, dict[str, Any]]:
    """Check ``[[regions]]`` and the nodes' ``region`` keys; returns region id -> its [region] settings.

    A region's broker user is its id, so the id may be neither a node's nor a reserved user's.  With regions
    every node needs one: the root's own nodes sit out while regions are online (coordinator/server.py)."""
    if not tables:
        if named := [n for n in nodes if "region" in n]:
            raise ConfigError(f"[[nodes]] {named[0]['id']}: unknown region {named[0]['region']!r}; declare it in a "
                              "[[regions]] table")
        return {}
    from coordinator.config import RegionSettings, RoundSettings

    node_ids = {n["id"] for n in nodes}
    regions: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(tables):
        _unknown(r, REGION_KEYS, f"[[regions]] #{i + 1}")
        rid = _table_id(r, "regions", i, "region")
        if rid in node_ids:
            raise ConfigError(f"[[regions]] id {rid!r} is also a node id: a region's broker user is its id, so it "
                              "must differ from every node's")
        if rid in regions:
            raise ConfigError(f"[[regions]] id {rid!r} appears twice")
        # The root waits deadline_s (+30 s) for a region's partial: by default a region waits as long for its nodes.
        try:
            settings = RegionSettings(region_id=rid, quorum=float(r.get("quorum", RegionSettings.quorum)),
                                      deadline_s=float(r.get("deadline_s", coordinator.get(
                                          "deadline_s", RoundSettings.deadline_s))))
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"[[regions]] {rid}: {str(exc).removeprefix('[region] ')}") from None
        regions[rid] = vars(settings)
    for n in nodes:
        rid = n.get("region")
        if rid is None:
            raise ConfigError(f"[[nodes]] {n['id']}: region is required when the fleet has [[regions]] (the "
                              f"root's own nodes sit out while regions run); one of {sorted(regions)}")
        if not isinstance(rid, str):
            raise ConfigError(f"[[nodes]] {n['id']}: region must be one region id (a node belongs to one region), "
                              f"got {rid!r}")
        if rid not in regions:
            raise ConfigError(f"[[nodes]] {n['id']}: unknown region {rid!r}; [[regions]] declares {sorted(regions)}")
    if empty := [rid for rid in regions if not any(n["region"] == rid for n in nodes)]:
        raise ConfigError(f"[[regions]] {empty[0]}: no node names this region (region = {empty[0]!r})")
    return regions


def make_lab_ca(directory: Path, host: str = "127.0.0.1", *, days: int = 2, ca_dir: Path | None = None
                ) -> tuple[Path, Path, Path]:
    """A lab CA (kept in ``ca_dir``, default ``directory``; reused when it exists) and a server certificate for
    ``host`` (an IP or DNS subject alternative name, plus localhost); returns (cafile, certfile, keyfile)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: needed for the TLS listener")
    d, cd = Path(directory), Path(ca_dir or directory)
    d.mkdir(parents=True, exist_ok=True)
    cd.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = cd / "ca.key", cd / "ca.crt"
    key, csr, crt, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"
    try:
        san = f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        san = f"DNS:{host}"
    ext.write_text(f"subjectAltName={san},DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        res = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.strip()}")

    if not (ca_key.exists() and ca_crt.exists()):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
            "-days", str(max(days, 2) * 2), "-subj", "/CN=fedspine-lab-ca")
        os.chmod(ca_key, 0o600)
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", str(days), "-extfile", str(ext))
    csr.unlink(missing_ok=True)
    ext.unlink(missing_ok=True)
    return ca_crt, crt, key


def _secret(path: Path) -> str:
    """The password stored in ``path`` (mode 0600), generated on first use."""
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    path.write_text(password + "\n")
    os.chmod(path, 0o600)
    return password


def run_user_missing(run_user: str) -> bool:
    """Whether ``run_user`` does not exist on this machine (the kit then leaves the broker files' group alone)."""
    try:
        pwd.getpwnam(run_user)
    except KeyError:
        return True
    return False


def _run_user_note(fleet: Fleet, files: str, host: str, mosquitto: bool) -> list[str]:
    """What the kit did about the broker files' group, and what is left to the operator on ``host``."""
    group = _group_of(fleet.run_user)
    if not run_user_missing(fleet.run_user):
        return [f"so they must belong to its group: `chgrp {group} {files}` (the kit does it when run as root)."]
    lines = [f"so they must belong to its group; there is no user `{fleet.run_user}` on the machine that wrote this "
             f"kit, which left their group alone: on {host}",
             f"create that user and run `chgrp {group} {files}` there, or set `[broker] run_user` in fleet.toml to the "
             "user the broker runs as."]
    if mosquitto:
        lines += ["mosquitto started as root stops if that user is missing; started as another user it stays that "
                  "user (it ignores `user`", "in mosquitto.conf), which must read the files."]
    return lines


def _group_of(run_user: str) -> str:
    try:
        return grp.getgrgid(pwd.getpwnam(run_user).pw_gid).gr_name
    except KeyError:
        return run_user


def _write_toml(path: Path, header: str, sections: dict[str, dict]) -> None:
    from coordinator.simulate import write_toml

    write_toml(path, sections)
    path.write_text("".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + "\n"
                    + path.read_text())
    os.chmod(path, 0o644)


def _server_files(folder: Path, host: str, fleet: Fleet, ca_dir: Path) -> tuple[Path, Path, Path]:
    """The lab CA's ``ca.crt`` and a server certificate for ``host`` in a broker's ``folder``, readable by the
    broker's run user; returns (cafile, certfile, keyfile)."""
    ca, cert, key = make_lab_ca(folder, host, days=fleet.cert_days, ca_dir=ca_dir)
    shutil.copyfile(ca, folder / "ca.crt")
    for p in (folder / "ca.crt", cert):
        readable_by(p, fleet.run_user, 0o644)
    readable_by(key, fleet.run_user, 0o640)
    return folder / "ca.crt", cert, key


def _store_dir(path: Path, run_user: str) -> None:
    """A broker's data directory, owned by its run user when the kit runs as root."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        try:
            u = pwd.getpwnam(run_user)
            os.chown(path, u.pw_uid, u.pw_gid)
        except KeyError:  # the kit is written on an admin host without that user: the member's host sets ownership
            return


def _write_private(path: Path, text: str, run_user: str) -> None:
    """``text`` in ``path``, mode 0640 before anything is written (it holds secrets or hashes), readable by the
    broker's run user."""
    path.touch(mode=0o640)
    os.chmod(path, 0o640)
    path.write_text(text)
    readable_by(path, run_user)


def _mosquitto_broker(fleet: Fleet, broker_dir: Path, ca_dir: Path, passwords: dict[str, str]) -> Path:
    """``broker/``: mosquitto.conf, passwd, acl (+ ca.crt, server.crt, server.key with TLS)."""
    if fleet.tls:
        _server_files(broker_dir, fleet.host, fleet, ca_dir)
    passwd = broker_dir / "passwd"
    passwd.unlink(missing_ok=True)  # rebuilt from the secrets: a removed node loses its user
    for name, password in passwords.items():
        add_user(passwd, name, password)
    readable_by(passwd, fleet.run_user)
    acl = broker_dir / "acl"
    acl.write_text(render_acl(fleet.topic_root, ["coordinator"], ["monitor"], list(fleet.regions)))
    readable_by(acl, fleet.run_user)
    variables: dict[str, Any] = {
        "password_file": str(passwd), "acl_file": str(acl), "run_user": fleet.run_user,
        "persistence": fleet.persistence, "persistence_location": str(broker_dir / "data") + "/",
        "log_dest": ["stderr"],
    }
    if fleet.tls:
        variables.update(port=0, tls_port=fleet.port, tls_address=fleet.bind, tls_cafile=str(broker_dir / "ca.crt"),
                         tls_certfile=str(broker_dir / "server.crt"), tls_keyfile=str(broker_dir / "server.key"))
    else:
        variables.update(port=fleet.port, listen_address=fleet.bind)
    if fleet.persistence:
        _store_dir(broker_dir / "data", fleet.run_user)
    (broker_dir / "mosquitto.conf").write_text(render_config(**variables))
    os.chmod(broker_dir / "mosquitto.conf", 0o644)
    return broker_dir / "mosquitto.conf"


def _nats_broker(fleet: Fleet, broker_dir: Path, ca_dir: Path, passwords: dict[str, str]) -> dict[str, Path]:
    """``broker/<member>/`` for every NATS member: nats.conf and the shared nats-auth.conf (+ ca.crt, server.crt,
    server.key with TLS).  ``broker/passwd`` keeps the bcrypt hashes (a hash is recomputed only for a changed
    password, so a second run leaves nats-auth.conf as it was) and ``broker/route-password`` the route secret."""
    from broker_config import nats

    try:
        import bcrypt  # noqa: F401
    except ImportError:
        raise RuntimeError("engine = \"nats\" hashes passwords with bcrypt: pip install 'fedspine-fleet[broker]'") from None
    old = nats.read_passwords(broker_dir / "passwd")
    cost = fleet.bcrypt_cost or nats.DEFAULT_BCRYPT_COST
    hashes = {u: old[u] if u in old and nats.password_matches(old[u], pw) else nats.hash_password(pw, cost)
              for u, pw in passwords.items()}  # a removed node loses its user
    nats.write_passwords(broker_dir / "passwd", hashes)
    auth = nats.render_nats_auth(hashes, fleet.topic_root, ["coordinator"], ["monitor"],
                                 node_users=[n["id"] for n in fleet.nodes], region_users=list(fleet.regions))
    routes = [f"{m['host']}:{m['route_port']}" for m in fleet.members]
    clustered = len(fleet.members) > 1  # NATS refuses a JetStream cluster of one: a single member runs standalone
    route_password = _secret(broker_dir / "route-password")
    written: dict[str, Path] = {}
    for m in fleet.members:
        folder = broker_dir / m["name"]
        folder.mkdir(parents=True, exist_ok=True)
        store = m["store_dir"]
        if store is None:  # in the member's folder, like mosquitto's broker/data
            store = str(folder / "data")
            _store_dir(folder / "data", fleet.run_user)
        variables: dict[str, Any] = {
            "server_name": m["name"], "client_port": m["client_port"], "mqtt_address": fleet.bind,
            "mqtt_port": m["port"], "store_dir": store, "stream_replicas": min(3, len(fleet.members)),
            "cluster_address": fleet.bind, "cluster_port": m["route_port"] if clustered else 0, "routes": routes,
            "route_user": "route", "route_password": route_password, "auth_file": nats.AUTH_FILE}
        if fleet.tls:
            ca, cert, key = _server_files(folder, m["host"], fleet, ca_dir)
            variables.update(tls_cafile=str(ca), tls_certfile=str(cert), tls_keyfile=str(key))
        _write_private(folder / nats.AUTH_FILE, auth, fleet.run_user)  # the hashes
        _write_private(folder / "nats.conf", nats.render_nats_config(**variables), fleet.run_user)  # the route secret
        written[f"broker {m['name']}"] = folder / "nats.conf"
    return written


def build_kit(fleet: Fleet, out: str | Path) -> dict[str, Path]:
    """Write the kit for ``fleet`` under ``out``; returns the main file of each part (broker or each NATS member,
    coordinator, monitor, regions, node ids).  Every TOML file is checked by loading it with the service's own
    config class."""
    from coordinator.config import CoordinatorConfig
    from edge_node.config import NodeConfig

    out = Path(out).resolve()
    broker_dir, coord_dir, mon_dir = out / "broker", out / "coordinator", out / "monitor"
    for d in (broker_dir, coord_dir, mon_dir):
        d.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    # Users: each secret beside the process that uses it, their hashes on the broker.
    users = {"coordinator": coord_dir / "password", "monitor": mon_dir / "password"}
    users.update({n["id"]: out / "nodes" / n["id"] / "password" for n in fleet.nodes})
    users.update({rid: out / "regions" / rid / "password" for rid in fleet.regions})
    passwords = {name: _secret(secret_file) for name, secret_file in users.items()}
    if fleet.engine == "nats":
        written.update(_nats_broker(fleet, broker_dir, out / "ca", passwords))
    else:
        written["broker"] = _mosquitto_broker(fleet, broker_dir, out / "ca", passwords)
    if fleet.tls:
        for secret_file in users.values():
            shutil.copyfile(out / "ca" / "ca.crt", secret_file.parent / "ca.crt")
            os.chmod(secret_file.parent / "ca.crt", 0o644)

    def broker_section(user: str, folder: Path, topic_root: str = fleet.topic_root, first: int = 0) -> dict:
        return {"url": fleet.client_url(first), "username": user, "password_file": str(folder / "password"),
                "ca_file": str(folder / "ca.crt") if fleet.tls else None, "topic_root": topic_root}

    state_root = Path(fleet.state_root) if fleet.state_root else None
    coord = {"labels": fleet.labels, "min_nodes": len(fleet.nodes),
             "state_dir": str((state_root or coord_dir) / ("coordinator" if state_root else "state")),
             **fleet.extra.get("coordinator", {})}
    sections = {"broker": broker_section("coordinator", coord_dir), "coordinator": coord,
                **{k: fleet.extra.get(k, {}) for k in COORDINATOR_EXTRA}}
    CoordinatorConfig.from_dict(sections)
    _write_toml(coord_dir / "coordinator.toml", "fedspine coordinator --config coordinator.toml\n"
                "Written by `fedspine kit`; every key is explained in docs/examples/coordinator.toml.", sections)
    written["coordinator"] = coord_dir / "coordinator.toml"

    monitor = {"broker": broker_section("monitor", mon_dir)}
    from shared.config import BrokerConfig, from_mapping

    from_mapping(BrokerConfig, monitor["broker"], "broker")
    _write_toml(mon_dir / "monitor.toml", "fedspine monitor --config monitor.toml [--once]\n"
                "Written by `fedspine kit`: the read-only monitor user.", monitor)
    written["monitor"] = mon_dir / "monitor.toml"

    if fleet.regions:
        from coordinator.config import RegionConfig
    for k, (rid, settings) in enumerate(fleet.regions.items()):
        folder = out / "regions" / rid
        sections = {"broker": broker_section(rid, folder, first=k), "region": settings}
        RegionConfig.from_dict(sections)
        _write_toml(folder / "region.toml", f"fedspine region --config region.toml   (region {rid})\n"
                    "Written by `fedspine kit`: region_id is this aggregator's broker user name; its nodes'\n"
                    f"topic_root is {fleet.topic_root}/region/{rid} (docs/scale.md, docs/configuration.md).", sections)
        written[f"region {rid}"] = folder / "region.toml"

    for k, n in enumerate(fleet.nodes):
        nid, folder = n["id"], out / "nodes" / n["id"]
        root = Topics(fleet.topic_root).region_root(n["region"]).root if "region" in n else fleet.topic_root
        node = {"id": nid, "device_type": n.get("tier", "generic"), "model_path": n.get("model_path", fleet.model_path),
                "data_path": n["data_path"], "test_path": n.get("test_path"), "labels": fleet.labels,
                "state_dir": n.get("state_dir") or str((state_root / nid) if state_root else folder / "state"),
                **fleet.extra.get("node", {})}
        sections = {"broker": broker_section(nid, folder, root, first=k), "node": node,
                    "train": fleet.extra.get("train", {}), "telemetry": fleet.extra.get("telemetry", {})}
        NodeConfig.from_dict(sections)
        _write_toml(folder / "node.toml", f"fedspine node --config node.toml   (node {nid})\n"
                    "Written by `fedspine kit`: [node] id is this node's broker user name; every key is explained\n"
                    "in docs/examples/node.toml.", sections)
        written[nid] = folder / "node.toml"
    (out / "README.md").write_text(kit_readme(fleet, out))
    return written


def _in_region(node: dict) -> str:
    return f" (region {node['region']})" if "region" in node else ""


def kit_readme(fleet: Fleet, out: Path) -> str:
    tls, nats = fleet.tls, fleet.engine == "nats"
    node_ids = [n["id"] for n in fleet.nodes]
    if nats:
        on = f"a {len(fleet.members)}-member NATS cluster"
        brokers = [f"| `broker/{m['name']}/` | NATS member {m['name']} ({m['host']}:{m['port']}) | "
                   f"`nats-server -c broker/{m['name']}/nats.conf` |" for m in fleet.members]
    else:
        on = f"broker {fleet.url}"
        brokers = ["| `broker/` | the broker | `mosquitto -c broker/mosquitto.conf` |"]
    lines = [
        "# FedSpine fleet kit",
        "",
        f"Written by `fedspine kit` for {len(node_ids)} node(s) on {on}. The paths inside the files",
        f"are absolute ({out}): copy each folder to the same path on its host, or run `fedspine kit` again with",
        "the hosts' paths in fleet.toml (secrets and the CA are kept).",
        "",
        "| folder | host | start with |",
        "|---|---|---|",
        *brokers,
        "| `coordinator/` | the coordinator | `fedspine coordinator --config coordinator/coordinator.toml` |",
        "| `monitor/` | any operator machine | `fedspine monitor --config monitor/monitor.toml [--once]` |",
        *(f"| `regions/{rid}/` | region {rid}'s aggregator | `fedspine region --config regions/{rid}/region.toml` |"
          for rid in fleet.regions),
        *(f"| `nodes/{nid}/` | node {nid}{_in_region(n)} | `fedspine node --config nodes/{nid}/node.toml` |"
          for nid, n in zip(node_ids, fleet.nodes, strict=True)),
        "",
    ]
    lines += _nats_readme(fleet) if nats else [
        "Each `password` file (mode 0600) is that process's broker secret; `broker/passwd` holds their hashes.",
        f"`broker/passwd`, `broker/acl`{' and `broker/server.key`' if tls else ''} are mode 0640: mosquitto, started "
        f"as root, drops to `{fleet.run_user}`,",
        *_run_user_note(fleet, f"broker/passwd broker/acl{' broker/server.key' if tls else ''}",
                        "the broker's host", mosquitto=True),
    ]
    if tls:
        lines += ["", "`ca/ca.key` signs the members' certificates (each names its member's host): keep it off the "
                      "fleet.\nEvery process trusts `ca.crt` in its folder." if nats else "`ca/ca.key` signs the broker's "
                      "certificate: keep it off the fleet. Every process trusts `ca.crt` in its folder."]
    if fleet.regions:
        lines += ["", f"Regions: each region's nodes talk to its aggregator on `{fleet.topic_root}/region/<rid>`, the "
                  "aggregator to the coordinator.", "Start the broker, then each region and its nodes, then the "
                  "coordinator: while any region is online it runs", "hierarchical rounds (docs/scale.md). Each "
                  f"region's broker user is its id; `{'nats-auth.conf' if nats else 'broker/acl'}` confines it to its "
                  "own topics."]
    lines += ["", "Nodes read the base model from `model_path` and never the network: run them with",
              "`HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1`. A node whose `[node] id` is not its broker user stops",
              "within seconds (exit 2) naming both.", ""]
    return "\n".join(lines)


def _nats_readme(fleet: Fleet) -> list[str]:
    n = len(fleet.members)
    files = "nats.conf nats-auth.conf" + (" server.key" if fleet.tls else "")
    if n == 1:
        cluster = ["One member: a standalone NATS server (JetStream refuses a cluster of one). Add members to",
                   "fleet.toml and run the kit again for a cluster; three survive the loss of any one."]
    else:
        cluster = [f"Start every member on its host, in any order: the members accept MQTT sessions once {n // 2 + 1} "
                   f"of the {n} are up",
                   "(JetStream's majority), and the cluster keeps serving while a majority is"
                   + (" (two members survive no loss: use three)." if n == 2 else "."),
                   "Routes between members are plain TCP with the route secret: keep the route ports on a private "
                   "network."]
    return [
        *cluster,
        "",
        "Every process lists every member in `[broker] url` and moves to the next one when its member goes away",
        "(docs/brokers.md); node k (and region k) starts with member k mod n, so the sessions spread over them.",
        "",
        "Each `password` file (mode 0600) is that process's broker secret; every member's `nats-auth.conf` holds",
        "their bcrypt hashes and the permissions (`fedspine broker render-nats-auth`). `broker/passwd` (the hashes)",
        "and `broker/route-password` (the members' route secret) stay here: the kit keeps both across runs. After",
        "adding or removing a node or a region, run the kit again, copy `nats-auth.conf` to every member and reload",
        "each (`nats-server --signal reload=<pid>`).",
        "",
        f"In each member folder `nats.conf` (the route secret), `nats-auth.conf`{' and `server.key`' if fleet.tls else ''}"
        " are mode 0640:",
        f"nats-server run as `{fleet.run_user}` (Debian's unit) must read them,",
        *_run_user_note(fleet, files, "each member's host", mosquitto=False),
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="fedspine kit", description="Write a fleet's broker, coordinator, monitor "
                                 "and node configuration, users and certificates from a fleet description.")
    ap.add_argument("--fleet", required=True, help="fleet description (a copy of docs/examples/fleet.toml)")
    ap.add_argument("--out", required=True, help="kit folder (created; secrets and CA found there are kept)")
    a = ap.parse_args(argv)
    try:
        fleet = load_fleet(a.fleet)
        written = build_kit(fleet, a.out)
    except (ConfigError, RuntimeError, OSError) as exc:
        print(f"fedspine kit: {exc}", file=sys.stderr)
        return 2
    for part, path in written.items():
        print(f"{part}: {path}")
    print(f"which file goes where: {Path(a.out).resolve() / 'README.md'}")
    if run_user_missing(fleet.run_user):
        stops = "; mosquitto started here as root would stop" if fleet.engine == "mosquitto" else ""
        print(f"fedspine kit: note: [broker] run_user {fleet.run_user!r} does not exist on this machine, so the broker "
              f"files keep their group{stops} (README.md in the kit says what to do)", file=sys.stderr)
    return 0
