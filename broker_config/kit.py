"""The provisioning kit: ``fedspine kit --fleet fleet.toml --out kit/`` writes everything a real fleet needs.

From a short fleet description (docs/examples/fleet.toml: the broker's host and port, TLS on or off, the node ids
and tiers, the label list, the model and data paths) it writes one folder per host::

    kit/broker/       mosquitto.conf, passwd, acl (+ ca.crt, server.crt, server.key with TLS)
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
from shared.topics import DEFAULT_ROOT, TopicError, Topics, check_node_id

SECTIONS = {"fleet", "broker", "nodes", "regions", "coordinator", "bandit", "node", "train", "telemetry"}
BROKER_KEYS = {"host", "port", "tls", "bind", "run_user", "persistence", "cert_days"}
NODE_KEYS = {"id", "tier", "data_path", "test_path", "state_dir", "model_path", "region"}
REGION_KEYS = {"id", "deadline_s", "quorum"}
FLEET_KEYS = {"topic_root", "labels", "model_path", "data_dir", "state_root"}


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
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # [coordinator], [bandit], [node], [train]…

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


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
    if "host" not in broker:
        raise ConfigError("[broker] host is required (the name or address nodes reach the broker at)")
    tls = bool(broker.get("tls", True))
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
    extra = {k: dict(data[k]) for k in ("coordinator", "bandit", "node", "train", "telemetry") if k in data}
    tables = data.get("regions", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("regions: expected [[regions]] tables, each with an id")
    regions = _load_regions(tables, nodes, extra.get("coordinator", {}))
    return Fleet(host=str(broker["host"]), port=int(broker.get("port", 8883 if tls else 1883)), tls=tls,
                 labels=[str(x) for x in fleet["labels"]], model_path=str(fleet["model_path"]), nodes=nodes,
                 topic_root=fleet.get("topic_root", DEFAULT_ROOT), bind=str(broker.get("bind", "0.0.0.0")),
                 run_user=str(broker.get("run_user", "mosquitto")), persistence=bool(broker.get("persistence", True)),
                 cert_days=int(broker.get("cert_days", 825)), state_root=str(fleet.get("state_root", "")),
                 regions=regions, extra=extra)


def _load_regions(tables: list[dict], nodes: list[dict], coordinator: dict) -> dict[str, dict[str, Any]]:
    """Check ``[[regions]]`` and the nodes' ``region`` keys; returns region id -> its [region] settings.

    A region's broker user is its id, so the id may be neither a node's nor a reserved user's.  With regions
    every node needs one: the root's own nodes sit out while regions are online (coordinator/server.py)."""
    if not tables:
        if named := [n for n in nodes if "region" in n]:
            raise ConfigError(f"[[nodes]] {named[0]['id']}: unknown region {named[0]['region']!r}; declare it in a "
                              "[[regions]] table")
        return {}
    from coordinator.config import RoundSettings
    from coordinator.region import RegionSettings
    from coordinator.strategies import STRATEGIES

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
    method = coordinator.get("method", RoundSettings.method)
    if method in STRATEGIES and (why := STRATEGIES[method].per_node_policy):
        raise ConfigError(f"[coordinator] method {method!r} cannot run under regions ({why}); use a fleet-wide "
                          "method (uniform, prune_ft, ft_prune, fedlora) or a fleet without [[regions]]")
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


def build_kit(fleet: Fleet, out: str | Path) -> dict[str, Path]:
    """Write the kit for ``fleet`` under ``out``; returns the main file of each part (broker, coordinator,
    monitor, node ids).  Every TOML file is checked by loading it with the service's own config class."""
    from coordinator.config import CoordinatorConfig
    from edge_node.config import NodeConfig

    out = Path(out).resolve()
    broker_dir, coord_dir, mon_dir = out / "broker", out / "coordinator", out / "monitor"
    for d in (broker_dir, coord_dir, mon_dir):
        d.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    ca = None
    if fleet.tls:
        ca, cert, key = make_lab_ca(broker_dir, fleet.host, days=fleet.cert_days, ca_dir=out / "ca")
        shutil.copyfile(ca, broker_dir / "ca.crt")
        for p in (broker_dir / "ca.crt", cert):
            readable_by(p, fleet.run_user, 0o644)
        readable_by(key, fleet.run_user, 0o640)

    # Users: one password file for the broker, each secret beside the process that uses it.
    passwd = broker_dir / "passwd"
    passwd.unlink(missing_ok=True)  # rebuilt from the secrets below: a removed node loses its user
    users = {"coordinator": coord_dir / "password", "monitor": mon_dir / "password"}
    users.update({n["id"]: out / "nodes" / n["id"] / "password" for n in fleet.nodes})
    users.update({rid: out / "regions" / rid / "password" for rid in fleet.regions})
    for name, secret_file in users.items():
        add_user(passwd, name, _secret(secret_file))
        if ca is not None:
            shutil.copyfile(ca, secret_file.parent / "ca.crt")
            os.chmod(secret_file.parent / "ca.crt", 0o644)
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
        (broker_dir / "data").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            try:
                u = pwd.getpwnam(fleet.run_user)
                os.chown(broker_dir / "data", u.pw_uid, u.pw_gid)
            except KeyError:
                pass
    (broker_dir / "mosquitto.conf").write_text(render_config(**variables))
    os.chmod(broker_dir / "mosquitto.conf", 0o644)
    written["broker"] = broker_dir / "mosquitto.conf"

    def broker_section(user: str, folder: Path, topic_root: str = fleet.topic_root) -> dict:
        return {"url": fleet.url, "username": user, "password_file": str(folder / "password"),
                "ca_file": str(folder / "ca.crt") if fleet.tls else None, "topic_root": topic_root}

    state_root = Path(fleet.state_root) if fleet.state_root else None
    coord = {"labels": fleet.labels, "min_nodes": len(fleet.nodes),
             "state_dir": str((state_root or coord_dir) / ("coordinator" if state_root else "state")),
             **fleet.extra.get("coordinator", {})}
    sections = {"broker": broker_section("coordinator", coord_dir), "coordinator": coord,
                "bandit": fleet.extra.get("bandit", {})}
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
        from coordinator.region import RegionConfig
    for rid, settings in fleet.regions.items():
        folder = out / "regions" / rid
        sections = {"broker": broker_section(rid, folder), "region": settings}
        RegionConfig.from_dict(sections)
        _write_toml(folder / "region.toml", f"fedspine region --config region.toml   (region {rid})\n"
                    "Written by `fedspine kit`: region_id is this aggregator's broker user name; its nodes'\n"
                    f"topic_root is {fleet.topic_root}/region/{rid} (docs/scale.md, docs/configuration.md).", sections)
        written[f"region {rid}"] = folder / "region.toml"

    for n in fleet.nodes:
        nid, folder = n["id"], out / "nodes" / n["id"]
        root = Topics(fleet.topic_root).region_root(n["region"]).root if "region" in n else fleet.topic_root
        node = {"id": nid, "device_type": n.get("tier", "generic"), "model_path": n.get("model_path", fleet.model_path),
                "data_path": n["data_path"], "test_path": n.get("test_path"), "labels": fleet.labels,
                "state_dir": n.get("state_dir") or str((state_root / nid) if state_root else folder / "state"),
                **fleet.extra.get("node", {})}
        sections = {"broker": broker_section(nid, folder, root), "node": node, "train": fleet.extra.get("train", {}),
                    "telemetry": fleet.extra.get("telemetry", {})}
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
    tls = fleet.tls
    node_ids = [n["id"] for n in fleet.nodes]
    lines = [
        "# FedSpine fleet kit",
        "",
        f"Written by `fedspine kit` for {len(node_ids)} node(s) on broker {fleet.url}. The paths inside the files",
        f"are absolute ({out}): copy each folder to the same path on its host, or run `fedspine kit` again with",
        "the hosts' paths in fleet.toml (secrets and the CA are kept).",
        "",
        "| folder | host | start with |",
        "|---|---|---|",
        "| `broker/` | the broker | `mosquitto -c broker/mosquitto.conf` |",
        "| `coordinator/` | the coordinator | `fedspine coordinator --config coordinator/coordinator.toml` |",
        "| `monitor/` | any operator machine | `fedspine monitor --config monitor/monitor.toml [--once]` |",
        *(f"| `regions/{rid}/` | region {rid}'s aggregator | `fedspine region --config regions/{rid}/region.toml` |"
          for rid in fleet.regions),
        *(f"| `nodes/{nid}/` | node {nid}{_in_region(n)} | `fedspine node --config nodes/{nid}/node.toml` |"
          for nid, n in zip(node_ids, fleet.nodes, strict=True)),
        "",
        "Each `password` file (mode 0600) is that process's broker secret; `broker/passwd` holds their hashes.",
        f"`broker/passwd`, `broker/acl`{' and `broker/server.key`' if tls else ''} are mode 0640: mosquitto, started "
        f"as root, drops to `{fleet.run_user}`,",
        f"so they must belong to its group: `chgrp {_group_of(fleet.run_user)} broker/passwd broker/acl"
        f"{' broker/server.key' if tls else ''}` (the kit does it when run as root).",
    ]
    if tls:
        lines += ["", "`ca/ca.key` signs the broker's certificate: keep it off the fleet. Every process trusts "
                      "`ca.crt` in its folder."]
    if fleet.regions:
        lines += ["", f"Regions: each region's nodes talk to its aggregator on `{fleet.topic_root}/region/<rid>`, the "
                  "aggregator to the coordinator.", "Start the broker, then each region and its nodes, then the "
                  "coordinator: while any region is online it runs", "hierarchical rounds (docs/scale.md). Each "
                  "region's broker user is its id; `broker/acl` confines it to its own topics."]
    lines += ["", "Nodes read the base model from `model_path` and never the network: run them with",
              "`HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1`. A node whose `[node] id` is not its broker user stops",
              "within seconds (exit 2) naming both.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="fedspine kit", description="Write a fleet's broker, coordinator, monitor "
                                 "and node configuration, users and certificates from a fleet description.")
    ap.add_argument("--fleet", required=True, help="fleet description (a copy of docs/examples/fleet.toml)")
    ap.add_argument("--out", required=True, help="kit folder (created; secrets and CA found there are kept)")
    a = ap.parse_args(argv)
    try:
        written = build_kit(load_fleet(a.fleet), a.out)
    except (ConfigError, RuntimeError, OSError) as exc:
        print(f"fedspine kit: {exc}", file=sys.stderr)
        return 2
    for part, path in written.items():
        print(f"{part}: {path}")
    print(f"which file goes where: {Path(a.out).resolve() / 'README.md'}")
    return 0
