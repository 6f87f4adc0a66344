"""The provisioning kit and the example configs: every example loads through the services' own config classes
(so docs/examples cannot go stale), and the kit writes consistent users, identities and file modes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker_config.fedspine_broker import users_in
from broker_config.kit import build_kit, load_fleet, main
from coordinator.config import CoordinatorConfig
from edge_node.config import NodeConfig
from shared.config import ConfigError

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
    from coordinator.region import RegionConfig

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
    ('method = "uniform"', 'method = "fedspine"', "method 'fedspine' cannot run under regions"),
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
