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
