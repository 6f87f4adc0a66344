"""The provisioning kit and the example configs: every example loads through the services' own config classes
(so docs/examples cannot go stale), and the kit writes consistent users, identities and file modes, for one
mosquitto or for a NATS cluster (whose rendered members are also started and tried, marked nats)."""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from broker_config.fedspine_broker import users_in
from broker_config.kit import Fleet, build_kit, load_fleet, main
from broker_config.nats import (
    LocalNatsCluster,
    free_ports,
    mqtt_connects,
    password_matches,
    read_passwords,
    render_nats_auth,
    require_nats_server,
)
from coordinator.config import CoordinatorConfig
from edge_node.config import NodeConfig
from shared.config import BrokerConfig, ConfigError, from_mapping, load_toml
from shared.topics import NODE_WRITES
from shared.transport import MqttTransport
from tests.broker import Inbox

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_example_configs_load() -> None:
    coord = CoordinatorConfig.load(EXAMPLES / "coordinator.toml")
    node = NodeConfig.load(EXAMPLES / "node.toml")
    assert node.node.id == node.broker.username and coord.broker.username == "coordinator"
    assert coord.coordinator.labels == node.node.labels
    fleet = load_fleet(EXAMPLES / "fleet.toml")
    assert [n["id"] for n in fleet.nodes] == ["jetson-01", "jetson-02"] and fleet.tls
    assert fleet.engine == "mosquitto" and fleet.run_user == "mosquitto"
    fleet = load_fleet(EXAMPLES / "fleet-nats.toml")
    assert fleet.engine == "nats" and fleet.run_user == "nats" and fleet.tls
    assert [(m["name"], m["port"], m["route_port"], m["client_port"]) for m in fleet.members] == [
        ("nats-1", 8883, 6222, 4222), ("nats-2", 8883, 6222, 4222), ("nats-3", 8883, 6222, 4222)]


def test_the_kit_writes_matching_identities_users_and_modes(tmp_path: Path) -> None:
    fleet = load_fleet(EXAMPLES / "fleet.toml")
    fleet.tls, fleet.port = False, 1883  # TLS: tests/integration/test_kit.py
    build_kit(fleet, tmp_path / "kit")
    kit = tmp_path / "kit"
    assert sorted(users_in(kit / "broker" / "passwd")) == ["coordinator", "jetson-01", "jetson-02", "monitor"]
    assert _mode(kit / "broker" / "passwd") == 0o640 and _mode(kit / "broker" / "acl") == 0o640
    conf = (kit / "broker" / "mosquitto.conf").read_text()
    assert f"password_file {kit / 'broker' / 'passwd'}" in conf and "listener 1883 0.0.0.0" in conf
    for nid in ("jetson-01", "jetson-02"):
        cfg = NodeConfig.load(kit / "nodes" / nid / "node.toml")
        assert cfg.node.id == cfg.broker.username == nid
        assert cfg.broker.resolved_password() and _mode(kit / "nodes" / nid / "password") == 0o600
        assert cfg.node.state_dir == str(kit / "nodes" / nid / "state")
    coord = CoordinatorConfig.load(kit / "coordinator" / "coordinator.toml")
    assert coord.coordinator.min_nodes == 2 and coord.coordinator.labels == ("negative", "positive")
    assert coord.coordinator.rounds == 20  # the fleet's [coordinator] table is copied
    assert "monitor" in (kit / "monitor" / "monitor.toml").read_text()
    assert "nodes/jetson-02/" in (kit / "README.md").read_text()
    # again over the same folder: every secret is kept
    before = (kit / "nodes" / "jetson-01" / "password").read_text()
    build_kit(fleet, kit)
    assert (kit / "nodes" / "jetson-01" / "password").read_text() == before


@pytest.mark.parametrize(("edit", "message"), [
    ('id = "jetson-01"', "appears twice"),
    ('id = "monitor"', "reserved"),
    ('tier = "nx"\nspeed = 3', "unknown key"),
])
def test_a_bad_fleet_is_refused_naming_the_problem(tmp_path: Path, edit: str, message: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES / "fleet.toml").read_text()
    bad = tmp_path / "fleet.toml"
    bad.write_text(text.replace('id = "jetson-02"', edit) if "id" in edit else text.replace('tier = "nx"', edit))
    with pytest.raises(ConfigError, match=message):
        load_fleet(bad)
    assert main(["--fleet", str(bad), "--out", str(tmp_path / "kit")]) == 2
    assert message in capsys.readouterr().err


def test_a_run_user_missing_here_is_said_not_passed_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """mosquitto started as root with `user <missing>` stops ("Unable to drop privileges"): the kit says so when it
    runs, and its README tells what to do instead of claiming the files' group was set."""
    fleet_toml = tmp_path / "fleet.toml"
    fleet_toml.write_text((EXAMPLES / "fleet.toml").read_text()
                          .replace('run_user = "mosquitto"', 'run_user = "fedspine-no-such-user"'))
    assert main(["--fleet", str(fleet_toml), "--out", str(tmp_path / "kit")]) == 0
    err = capsys.readouterr().err
    assert "run_user 'fedspine-no-such-user' does not exist on this machine" in err
    readme = (tmp_path / "kit" / "README.md").read_text()
    assert "there is no user `fedspine-no-such-user`" in readme and "(the kit does it when run as root)" not in readme
    assert "set `[broker] run_user`" in readme


DATA = Path(__file__).resolve().parent / "data"
FLAT_FILES = ("README.md", "broker/mosquitto.conf", "broker/acl", "coordinator/coordinator.toml",
              "monitor/monitor.toml", "nodes/jetson-01/node.toml", "nodes/jetson-02/node.toml")


def test_a_flat_fleet_renders_exactly_as_before_regions(tmp_path: Path) -> None:
    """data/kit-flat.txt was written by the kit before it knew regions (the example fleet, TLS on, kit paths
    replaced by <KIT>); a fleet without [[regions]] must still render it byte for byte, and no other file.  A change
    meant for every fleet rewrites kit-flat.txt in the same commit."""
    fleet = load_fleet(DATA / "kit-flat-fleet.toml")
    fleet.run_user = "fedspine-no-such-user"  # the README names the run user's group: one that exists nowhere
    kit = tmp_path / "kit"
    build_kit(fleet, kit)
    got = "".join(f"=== {f}\n" + (kit / f).read_text().replace(str(kit), "<KIT>") for f in FLAT_FILES)
    assert got == (DATA / "kit-flat.txt").read_text()
    assert sorted(str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file()) == sorted([
        *FLAT_FILES, "broker/passwd", "broker/ca.crt", "broker/server.crt", "broker/server.key", "ca/ca.crt",
        "ca/ca.key", "ca/ca.srl", *(f"{d}/{f}" for d in ("coordinator", "monitor", "nodes/jetson-01",
                                                         "nodes/jetson-02") for f in ("ca.crt", "password"))])


def _regions_fleet(tmp_path: Path, edit=None):
    text = (EXAMPLES / "fleet-regions.toml").read_text()
    path = tmp_path / "fleet.toml"
    path.write_text(edit(text) if edit else text)
    fleet = load_fleet(path)
    fleet.tls, fleet.port = False, 1883
    return fleet


def test_the_kit_writes_each_region_its_user_acl_config_and_its_nodes_topic_root(tmp_path: Path) -> None:
    from coordinator.config import RegionConfig

    fleet = _regions_fleet(tmp_path)
    assert {rid: s["deadline_s"] for rid, s in fleet.regions.items()} == {"east": 600.0, "west": 600.0}
    kit = tmp_path / "kit"
    written = build_kit(fleet, kit)
    assert sorted(users_in(kit / "broker" / "passwd")) == ["coordinator", "east", "jetson-01", "jetson-02",
                                                           "jetson-03", "monitor", "west"]
    acl = (kit / "broker" / "acl").read_text()
    for rid in ("east", "west"):  # the region's block: its own upward topics and its sub-tree, nothing else
        block = acl.split(f"\nuser {rid}\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert f"topic write fedspine/v1/region/{rid}/upload" in block
        assert f"topic read fedspine/v1/region/{rid}/config" in block
        assert f"topic readwrite fedspine/v1/region/{rid}/node/#" in block
        assert f"topic deny fedspine/v1/node/{rid}/#" in block
        assert not any("fedspine/v1/#" in line or "region/+/upload" in line for line in block)
        cfg = RegionConfig.load(kit / "regions" / rid / "region.toml")
        assert cfg.region.region_id == cfg.broker.username == rid and written[f"region {rid}"].parent.name == rid
        assert cfg.broker.topic_root == "fedspine/v1" and cfg.region.deadline_s == 600.0
        assert cfg.broker.resolved_password() and _mode(kit / "regions" / rid / "password") == 0o600
    for nid, rid in (("jetson-01", "east"), ("jetson-02", "east"), ("jetson-03", "west")):
        cfg = NodeConfig.load(kit / "nodes" / nid / "node.toml")
        assert cfg.broker.topic_root == f"fedspine/v1/region/{rid}" and cfg.broker.username == cfg.node.id == nid
        assert cfg.node.data_path == f"/var/lib/fedspine/data/{nid}/train.csv"
    coord = CoordinatorConfig.load(kit / "coordinator" / "coordinator.toml")  # one coordinator, at the root
    assert coord.broker.topic_root == "fedspine/v1" and coord.coordinator.min_nodes == 3
    readme = (kit / "README.md").read_text()
    assert "fedspine region --config regions/west/region.toml" in readme and "node jetson-03 (region west)" in readme


def test_a_region_may_set_its_own_deadline_and_quorum(tmp_path: Path) -> None:
    fleet = _regions_fleet(tmp_path, lambda t: t.replace('id = "west"\n', 'id = "west"\ndeadline_s = 90\nquorum = 1\n')
                           .replace("rounds = 20", "rounds = 20\ndeadline_s = 120"))
    assert fleet.regions["west"] == {"region_id": "west", "deadline_s": 90.0, "quorum": 1.0}
    assert fleet.regions["east"]["deadline_s"] == 120.0  # the coordinator's deadline_s


@pytest.mark.parametrize("method", ["hetlora", "fedspine"])
def test_every_method_may_run_under_regions(tmp_path: Path, method: str) -> None:
    """HetLoRA's tier ranks travel with each round to the regions, and FedSpine's bandit runs in each region for its
    own nodes (docs/scale.md): the kit writes the regional fleet of either."""
    fleet = _regions_fleet(tmp_path, lambda t: t.replace('method = "uniform"', f'method = "{method}"'))
    build_kit(fleet, tmp_path / "kit")
    coord = CoordinatorConfig.load(tmp_path / "kit" / "coordinator" / "coordinator.toml")
    assert coord.coordinator.method == method and set(fleet.regions) == {"east", "west"}


@pytest.mark.parametrize(("old", "new", "message"), [
    ('region = "west"', 'region = "wset"', "jetson-03: unknown region 'wset'"),
    ('region = "west"', 'region = ["east", "west"]', "jetson-03: region must be one region id"),
    ('region = "west"', "", "jetson-03: region is required"),
    ('[[regions]]\nid = "west"\n', "", "jetson-03: unknown region 'west'"),
    ('id = "west"', 'id = "east"', "'east' appears twice"),
    ('id = "west"', 'id = "jetson-03"', "is also a node id"),
    ('id = "west"', 'id = "monitor"', "reserved"),
    ('id = "west"', 'id = "we/st"', "#2 id"),
    ('id = "west"', 'id = "west"\nnodes = ["jetson-03"]', "unknown key"),
    ('id = "west"', 'id = "west"\nquorum = 0', "[[regions]] west: deadline_s"),
    ('id = "west"', 'id = "west"\n[[regions]]\nid = "north"', "[[regions]] north: no node"),
])
def test_a_bad_region_is_refused_naming_the_problem(tmp_path: Path, old: str, new: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES / "fleet-regions.toml").read_text()
    assert text.count(old) == 1
    bad = tmp_path / "fleet.toml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_fleet(bad)
    assert main(["--fleet", str(bad), "--out", str(tmp_path / "kit")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()  # nothing written


def test_a_node_naming_a_region_in_a_flat_fleet_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text((EXAMPLES / "fleet.toml").read_text().replace('tier = "nx"', 'tier = "nx"\nregion = "east"'))
    with pytest.raises(ConfigError, match="jetson-02: unknown region 'east'; declare it"):
        load_fleet(bad)
    bad.write_text('regions = ["east"]\n' + (EXAMPLES / "fleet.toml").read_text())
    with pytest.raises(ConfigError, match=r"expected \[\[regions\]\] tables"):
        load_fleet(bad)


# ---- NATS: engine = "nats" ----------------------------------------------------------------------------------------
NODES = ("jetson-01", "jetson-02", "jetson-03")  # docs/examples/fleet-nats.toml
ROOT = "fedspine/v1"


def _fast(text: str) -> str:
    """The cheapest bcrypt cost: the tests hash and verify many passwords."""
    assert text.count("# bcrypt_cost = 11") == 1
    return text.replace("# bcrypt_cost = 11", "bcrypt_cost = 4")


def _nats_fleet(tmp_path: Path, edit: Callable[[str], str] | None = _fast,
                members: list[tuple[str, str, int, int, int]] | None = None) -> Path:
    """docs/examples/fleet-nats.toml, edited; ``members`` (name, host, port, route_port, client_port) replace its
    [[broker.members]] tables."""
    text = (EXAMPLES / "fleet-nats.toml").read_text()
    if members is not None:
        head, rest = text.split("\n[[broker.members]]\n", 1)
        tables = "".join(f'[[broker.members]]\nname = "{n}"\nhost = "{h}"\nport = {p}\nroute_port = {r}\n'
                         f"client_port = {c}\n\n" for n, h, p, r, c in members)
        text = head + "\n" + tables + rest[rest.index("\n[[nodes]]\n") + 1:]
    path = tmp_path / "fleet.toml"
    path.write_text(edit(text) if edit else text)
    return path


def _openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def test_a_nats_kit_gives_each_member_its_folder_and_every_service_every_member(tmp_path: Path) -> None:
    fleet = load_fleet(_nats_fleet(tmp_path))
    kit = tmp_path / "kit"
    written = build_kit(fleet, kit)
    broker = kit / "broker"
    assert not (broker / "mosquitto.conf").exists() and not (broker / "acl").exists()

    # Users: the hashes are of the services' own passwords, with render-nats-auth's permissions, in every member.
    secrets = {"coordinator": kit / "coordinator" / "password", "monitor": kit / "monitor" / "password",
               **{n: kit / "nodes" / n / "password" for n in NODES}}
    hashes = read_passwords(broker / "passwd")
    assert sorted(hashes) == sorted(secrets)
    assert all(password_matches(hashes[u], f.read_text().strip()) for u, f in secrets.items())
    assert all(h.startswith("$2b$04$") for h in hashes.values())  # [broker] bcrypt_cost
    auth = render_nats_auth(hashes, ROOT, ["coordinator"], ["monitor"], node_users=list(NODES))
    route = (broker / "route-password").read_text().strip()
    assert route and _mode(broker / "route-password") == 0o600

    for m in fleet.members:  # nats-1..3 on nats-<i>.lan: MQTT 8883, routes 6222
        d = broker / m["name"]
        assert written[f"broker {m['name']}"] == d / "nats.conf"
        assert (d / "nats-auth.conf").read_text() == auth
        conf = (d / "nats.conf").read_text()
        assert f'server_name: "{m["name"]}"' in conf and 'include "nats-auth.conf"' in conf
        assert 'listen: "0.0.0.0:8883"' in conf and 'listen: "0.0.0.0:6222"' in conf and "stream_replicas: 3" in conf
        assert f'store_dir: "{d / "data"}"' in conf and (d / "data").is_dir()
        assert [f'"nats-route://route:{route}@nats-{i}.lan:6222"' in conf for i in (1, 2, 3)] == [True] * 3
        assert f'cert_file: "{d / "server.crt"}"' in conf and f'ca_file: "{d / "ca.crt"}"' in conf
        assert [_mode(d / f) for f in ("nats.conf", "nats-auth.conf", "server.key")] == [0o640] * 3
        # its own certificate, naming its host, from the kit's lab CA (the one every client trusts)
        assert f"DNS:{m['host']}" in _openssl("x509", "-in", str(d / "server.crt"), "-noout", "-ext",
                                              "subjectAltName").stdout
        assert _openssl("verify", "-CAfile", str(kit / "ca" / "ca.crt"), str(d / "server.crt")).returncode == 0

    # Every service lists every member (node k from member k mod 3), and every file loads through its config class.
    urls = [f"mqtts://nats-{i}.lan:8883" for i in (1, 2, 3)]
    assert list(CoordinatorConfig.load(kit / "coordinator" / "coordinator.toml").broker.urls) == urls
    monitor = from_mapping(BrokerConfig, load_toml(kit / "monitor" / "monitor.toml")["broker"], "broker")
    assert list(monitor.urls) == urls and monitor.username == "monitor"
    for k, nid in enumerate(NODES):
        cfg = NodeConfig.load(kit / "nodes" / nid / "node.toml")
        assert list(cfg.broker.urls) == urls[k:] + urls[:k] and cfg.broker.username == cfg.node.id == nid
        assert cfg.broker.ca_file == str(kit / "nodes" / nid / "ca.crt")
    readme = (kit / "README.md").read_text()
    assert all(f"| NATS member {m['name']} ({m['host']}:8883) | `nats-server -c broker/{m['name']}/nats.conf` |"
               in readme for m in fleet.members)

    # Again over the same folder: secrets, hashes and the route secret are kept, so the members' files stay as they are.
    kept = [*secrets.values(), broker / "passwd", broker / "route-password", *broker.glob("*/nats*.conf")]
    before = {p: p.read_bytes() for p in kept}
    build_kit(fleet, kit)
    assert {p: p.read_bytes() for p in kept} == before


def test_one_nats_member_runs_standalone_and_regions_get_their_users(tmp_path: Path) -> None:
    def edit(text: str) -> str:
        broker = text.split("[broker]\n", 1)[1].split("\n\n", 1)[0]
        return text.replace(broker, 'engine = "nats"\ntls = false\nbcrypt_cost = 4\n\n[[broker.members]]\n'
                            'name = "solo"\nhost = "broker.lan"\nroute_port = 6222\n'
                            'store_dir = "/var/lib/nats"')

    text = (EXAMPLES / "fleet-regions.toml").read_text()
    (tmp_path / "fleet.toml").write_text(edit(text))
    fleet = load_fleet(tmp_path / "fleet.toml")
    kit = tmp_path / "kit"
    build_kit(fleet, kit)
    conf = (kit / "broker" / "solo" / "nats.conf").read_text()
    assert "cluster {" not in conf and "stream_replicas: 1" in conf and 'listen: "0.0.0.0:1883"' in conf
    assert 'store_dir: "/var/lib/nats"' in conf and "tls {" not in conf and not (kit / "broker" / "solo" / "data").exists()
    hashes = read_passwords(kit / "broker" / "passwd")
    assert (kit / "broker" / "solo" / "nats-auth.conf").read_text() == render_nats_auth(
        hashes, ROOT, ["coordinator"], ["monitor"], node_users=list(NODES), region_users=["east", "west"])
    from coordinator.config import RegionConfig

    assert RegionConfig.load(kit / "regions" / "west" / "region.toml").broker.urls == ("mqtt://broker.lan:1883",)
    assert "`nats-auth.conf` confines it" in (kit / "README.md").read_text()


@pytest.mark.parametrize(("old", "new", "message"), [
    ('engine = "nats"', 'engine = "rabbitmq"', "[broker] engine: 'rabbitmq' is not one of"),
    ('engine = "nats"', "", "[broker] bcrypt_cost, members: only with engine = 'nats' (this fleet's engine is "
                           "'mosquitto')"),
    ('engine = "nats"', 'engine = "nats"\nhost = "broker.lan"', "[broker] host: only with engine = 'mosquitto' (this "
     "fleet's engine is 'nats'); each NATS member has its own [[broker.members]] host and port"),
    ('engine = "nats"', 'engine = "nats"\npersistence = true', "[broker] persistence: only with engine = 'mosquitto'"),
    ("bcrypt_cost = 4", "bcrypt_cost = 2", "[broker] bcrypt_cost must be an integer from 4 to 31"),
    ('name = "nats-2"', 'name = "nats-1"', "[[broker.members]] name 'nats-1' appears twice"),
    ('name = "nats-3"', 'name = "nats.3"', "[[broker.members]] #3 name: 'nats.3' is not a member name"),
    ('name = "nats-3"', 'name = "nats-3"\ntls = false', "[[broker.members]] #3: tls is fleet-wide"),
    ('name = "nats-3"', 'name = "nats-3"\nweight = 2', "[[broker.members]] #3: unknown key(s) ['weight']"),
    ('name = "nats-3"', 'name = "nats-3"\nstore_dir = "data"', "nats-3: store_dir must be an absolute path"),
    ('host = "nats-3.lan"\n', "", "[[broker.members]] nats-3: host is required"),
    ('host = "nats-3.lan"\nport = 8883', 'host = "nats-3.lan"\nport = 70000', "nats-3: port must be a port number"),
    ('host = "nats-2.lan"', 'host = "nats-1.lan"', "nats-2: port nats-1.lan:8883 is already nats-1's port"),
    ('host = "nats-2.lan"\nport = 8883', 'host = "nats-1.lan"\nport = 6222',
     "nats-2: port nats-1.lan:6222 is already nats-1's route_port"),
    ('id = "jetson-03"', 'id = "jetson.03"', "[[nodes]] id 'jetson.03': NATS refuses '.'"),
    ('topic_root = "fedspine/v1"', 'topic_root = "fedspine/v1.2"', "[fleet] topic_root 'fedspine/v1.2': NATS refuses"),
])
def test_a_bad_nats_fleet_is_refused_naming_the_key(tmp_path: Path, old: str, new: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def edit(text: str) -> str:
        text = _fast(text)
        assert text.count(old) == 1
        return text.replace(old, new)

    bad = _nats_fleet(tmp_path, edit)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_fleet(bad)
    assert main(["--fleet", str(bad), "--out", str(tmp_path / "kit")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()  # nothing written


def test_a_nats_fleet_needs_a_member(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape('[broker] members: engine = "nats" needs at least one')):
        load_fleet(_nats_fleet(tmp_path, members=[]))


class KitCluster(LocalNatsCluster):
    """LocalNatsCluster's start-up check, logs and shutdown, on the member folders a kit wrote (it renders nothing)."""

    def __init__(self, kit: Path, fleet: Fleet, coordinator_password: str) -> None:
        super().__init__({"coordinator": coordinator_password}, members=len(fleet.members), workdir=kit / "broker",
                         tls=fleet.tls)
        self.names = [m["name"] for m in fleet.members]
        self.mqtt_ports = [m["port"] for m in fleet.members]
        self.client_ports = [m["client_port"] for m in fleet.members]
        self.route_ports = [m["route_port"] for m in fleet.members]
        self.cafile = kit / "ca" / "ca.crt" if fleet.tls else None

    def member_dir(self, i: int) -> Path:
        return self.dir / self.names[i]

    def render(self) -> None:
        """The kit wrote every member's nats.conf and nats-auth.conf."""


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.parametrize("members", [3, 1])
def test_the_nats_kit_starts_and_its_node_keeps_to_its_own_topics(tmp_path: Path, members: int) -> None:
    """The kit's member configs, as rendered (TLS from the lab CA), started on free loopback ports: a node's kit
    password opens every member, and what the node may publish is its own topics, not another node's."""
    from tests.reliability.test_security import _connect_raw, _only_allowed_arrive

    try:
        require_nats_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    ports = free_ports(3 * members)
    rows = [(f"m{i}", "127.0.0.1", *ports[3 * i:3 * i + 3]) for i in range(members)]
    path = _nats_fleet(tmp_path, lambda t: _fast(t).replace('bind = "0.0.0.0"', 'bind = "127.0.0.1"'), rows)
    fleet = load_fleet(path)
    kit = tmp_path / "kit"
    build_kit(fleet, kit)
    coordinator = CoordinatorConfig.load(kit / "coordinator" / "coordinator.toml").broker
    node = NodeConfig.load(kit / "nodes" / "jetson-02" / "node.toml").broker  # starts on the second member of 3
    assert len(node.urls) == members and set(node.urls) == set(coordinator.urls)
    cluster = KitCluster(kit, fleet, coordinator.resolved_password() or "")
    cluster.start(timeout_s=60)
    observer, made = Inbox(), []
    try:
        for port in cluster.mqtt_ports:  # each member's certificate names 127.0.0.1; each has the node's hash
            assert mqtt_connects("127.0.0.1", port, "jetson-02", node.resolved_password() or "", cluster.cafile)
        assert _connect_raw("127.0.0.1", cluster.mqtt_ports[0], user="jetson-02", password="not-its-password",
                            tls_ca=str(cluster.cafile)).startswith(("refused", "failed"))
        made = [MqttTransport(coordinator, "kit-coordinator"), MqttTransport(node, "kit-jetson-02")]
        made[0].subscribe(f"{ROOT}/#", observer)
        for t in made:
            t.start(timeout_s=30)
        assert made[0].subscribed.wait(15)
        assert members == 1 or made[0].member != made[1].member  # permissions hold across the route
        forbidden = [f"{ROOT}/node/jetson-01/{k}" for k in NODE_WRITES] + [f"{ROOT}/broadcast/command"]
        _only_allowed_arrive(made[1], observer, forbidden, [f"{ROOT}/node/jetson-02/status"], timeout_s=15,
                             settle_s=0.5)
    except BaseException:
        print(f"\n--- NATS logs ---\n{cluster.log()[-8000:]}")
        raise
    finally:
        for t in made:
            t.stop(flush_s=1.0)
        cluster.close()
