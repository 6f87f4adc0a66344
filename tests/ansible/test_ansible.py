"""The Ansible playbooks: syntax, ansible-lint production profile, and a real idempotent run into a temporary prefix.

The fleet of that run is regional (broker, coordinator, one region, its node) and every client gets a list of broker
URLs, as with a cluster; the lab inventory's own flat fleet is checked by templating its variables."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.config import CoordinatorConfig, LoraSettings, RegionConfig
from edge_node.config import NodeConfig
from shared.messages import RegionStatus, decode

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOKS = ("site.yml", "broker.yml", "broker_cluster.yml", "coordinator.yml", "regions.yml", "edge_nodes.yml")
NODE_ID = "jetson-nx-test"
REGION_ID = "region-test"  # the region host's inventory name, as the lab names its regions
PASSWORDS = {"coordinator": "coord-pw-7f3a", "monitor": "monitor-pw-19c2", NODE_ID: "node-pw-c81e",
             REGION_ID: "region-pw-4b90"}
ROOT = "fedspine/v1"
HOSTS = {"fleet-broker", "fleet-coordinator", REGION_ID, NODE_ID}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


# ---- static checks ------------------------------------------------------------------------------------------
def test_every_playbook_passes_syntax_check(tmp_path: Path) -> None:
    inventory = ANSIBLE_DIR / "inventory" / "lab"
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), "--syntax-check", *PLAYBOOKS],
                          cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for playbook in PLAYBOOKS:
        assert f"playbook: {playbook}" in proc.stdout


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    proc = subprocess.run([_tool("ansible-lint"), "--profile", "production", "--nocolor", "-f", "pep8"],
                          cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "0 failure(s), 0 warning(s)" in output, output


def test_no_secret_is_committed() -> None:
    vault_dir = ANSIBLE_DIR / "inventory" / "lab" / "group_vars" / "all"
    assert not (vault_dir / "vault.yml").exists() or (vault_dir / "vault.yml").read_text().startswith("$ANSIBLE_VAULT")
    example = yaml.safe_load((vault_dir / "vault.yml.example").read_text())
    assert set(example["vault_fedspine_mqtt_passwords"].values()) == {"CHANGE-ME"}


# ---- the password-file module -------------------------------------------------------------------------------
def _run_module(tmp: Path, path: Path, users: dict[str, str]) -> dict:
    args = json.dumps({"path": str(path), "users": users, "mode": "0640"})
    proc = subprocess.run(
        [_tool("ansible"), "localhost", "-c", "local", "-i", "localhost,", "-o",
         "-e", f"ansible_python_interpreter={sys.executable}", "-m", "mosquitto_users", "-a", args],
        env={**_env(tmp), "ANSIBLE_LIBRARY": str(ANSIBLE_DIR / "roles" / "broker" / "library")},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # One-line output: "localhost | CHANGED => {...}"
    return json.loads(proc.stdout.split("=>", 1)[1])


@pytest.mark.mosquitto
def test_mosquitto_users_module_is_idempotent_and_exclusive(tmp_path: Path) -> None:
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd is not installed")
    pwfile = tmp_path / "passwd"
    first = _run_module(tmp_path, pwfile, {"a": "pw-a", "b": "pw-b"})
    assert first["changed"] and first["added"] == ["a", "b"]
    assert [line.split(":")[0] for line in pwfile.read_text().splitlines()] == ["a", "b"]
    assert "pw-a" not in pwfile.read_text() and stat.S_IMODE(pwfile.stat().st_mode) == 0o640

    again = _run_module(tmp_path, pwfile, {"a": "pw-a", "b": "pw-b"})
    assert not again["changed"]

    before = dict(line.split(":", 1) for line in pwfile.read_text().splitlines())
    changed = _run_module(tmp_path, pwfile, {"b": "pw-b2", "c": "pw-c"})
    assert changed["changed"]
    assert (changed["added"], changed["updated"], changed["removed"]) == (["c"], ["b"], ["a"])
    after = dict(line.split(":", 1) for line in pwfile.read_text().splitlines())
    assert set(after) == {"b", "c"} and after["b"] != before["b"]


# ---- a real run into a temporary prefix ---------------------------------------------------------------------
@dataclass
class Provisioned:
    root: Path
    prefix: Path
    plain_port: int
    tls_port: int
    first: RunResult
    second: RunResult

    @property
    def urls(self) -> tuple[str, ...]:
        """The broker URL list every client was given: the one mosquitto by two names, as a cluster's members."""
        return (f"mqtts://localhost:{self.tls_port}", f"mqtts://127.0.0.1:{self.tls_port}")


@dataclass
class RunResult:
    """What one ansible-playbook run did: the recap per host and the tasks that changed something."""

    stats: dict[str, dict[str, int]]
    changed_tasks: list[str]
    output: str


_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")
_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\]")
_CHANGED = re.compile(r"^changed: \[([^\]]+)\]")


def _parse_run(output: str) -> RunResult:
    stats: dict[str, dict[str, int]] = {}
    changed: list[str] = []
    task = ""
    for line in output.splitlines():
        if m := _TASK.match(line):
            task = m.group(1)
        elif m := _CHANGED.match(line):
            changed.append(f"{m.group(1)}: {task}")
        elif m := _RECAP.match(line):
            ok, ch, unreachable, failed = (int(g) for g in m.groups()[1:])
            stats[m.group(1)] = {"ok": ok, "changed": ch, "unreachable": unreachable, "failures": failed}
    return RunResult(stats, changed, output)


def _playbook(tmp: Path, inventory: Path, extra_vars: Path) -> RunResult:
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), "-e", f"@{extra_vars}", "site.yml"],
                          cwd=ANSIBLE_DIR, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    return _parse_run(proc.stdout)


@pytest.fixture(scope="module")
def provisioned() -> Iterator[Provisioned]:
    if os.geteuid() != 0:
        pytest.skip("the roles set root/mosquitto ownership and mosquitto drops privileges: run as root (CI does)")
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd is not installed")
    # Under /tmp with mode 0755: mosquitto, started as root, drops to its own user and must reach the files.
    root = Path(tempfile.mkdtemp(prefix="fedspine-ansible-", dir="/tmp"))
    try:
        root.chmod(0o755)
        src = root / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for package in ("coordinator", "edge_node", "shared"):
            shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(root / "dist"), str(src)], check=True, capture_output=True, timeout=180)
        wheel = next((root / "dist").glob("fedspine_fleet-*.whl"))

        model = root / "model-src"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}\n')
        (model / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")

        inventory = root / "inventory"
        shutil.copytree(ANSIBLE_DIR / "inventory" / "lab" / "group_vars", inventory / "group_vars")
        local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "ansible_become": False, "ansible_host": "127.0.0.1"}
        hosts = {"all": {"children": {
            "broker": {"hosts": {"fleet-broker": local}},
            "coordinator": {"hosts": {"fleet-coordinator": local}},
            "regions": {"hosts": {REGION_ID: local}},
            "jetsons": {"children": {"nx": {"hosts": {NODE_ID: {**local, "fedspine_region": REGION_ID}}}}},
        }}}
        (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))

        prefix = root / "fs"
        plain_port, tls_port = _free_ports(2)
        extra = {
            "vault_fedspine_mqtt_passwords": PASSWORDS,
            "fedspine_broker_url": [f"mqtts://localhost:{tls_port}", f"mqtts://127.0.0.1:{tls_port}"],
            "fedspine_lab_ca_dir": str(root / "lab-ca"),
            "fedspine_app_wheel": str(wheel),
            "fedspine_app_prefix": str(prefix),
            "fedspine_app_python": sys.executable,
            "fedspine_app_install_system_packages": False,
            "fedspine_app_manage_user": False,
            "fedspine_app_user": "root",
            "fedspine_app_group": "root",
            "fedspine_app_pip_extra_args": "--no-deps --no-index",
            "broker_prefix": str(prefix),
            "broker_install_packages": False,
            "broker_manage_service": False,
            "broker_port": plain_port,
            "broker_tls_port": tls_port,
            "broker_tls_address": "127.0.0.1",
            "broker_log_dest": ["stdout"],
            "coordinator_manage_service": False,
            "region_manage_service": False,
            "edge_node_manage_service": False,
            "edge_node_install_torch": False,
            "edge_node_jetson_stats": False,
            "edge_node_require_cuda": False,
            "edge_node_model_src": str(model),
            "edge_node_model_dir": str(prefix / "opt/fedspine/models/base"),
            "edge_node_data_dir": str(prefix / "srv/fedspine/data"),
            "edge_node_data_file": str(prefix / "srv/fedspine/data/train.csv"),
        }
        extra_vars = root / "test-vars.yml"
        extra_vars.write_text(yaml.safe_dump(extra))

        first = _playbook(root, inventory, extra_vars)
        second = _playbook(root, inventory, extra_vars)
        yield Provisioned(root, prefix, plain_port, tls_port, first, second)
    finally:
        if os.environ.get("FEDSPINE_KEEP_ANSIBLE_TREE"):  # debugging: look at what the playbooks produced
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def test_first_run_changes_every_host_and_fails_none(provisioned: Provisioned) -> None:
    stats = provisioned.first.stats
    assert set(stats) == HOSTS
    for host, counts in stats.items():
        assert counts["failures"] == 0 and counts["unreachable"] == 0, host
        assert counts["changed"] > 0, host


def test_second_run_changes_nothing(provisioned: Provisioned) -> None:
    stats = provisioned.second.stats
    assert set(stats) == HOSTS
    assert {host: counts["changed"] for host, counts in stats.items()} == dict.fromkeys(stats, 0), \
        provisioned.second.changed_tasks
    assert all(counts["failures"] == 0 for counts in stats.values())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_broker_files(provisioned: Provisioned) -> None:
    etc = provisioned.prefix / "etc/mosquitto"
    conf = (etc / "mosquitto.conf").read_text()
    assert f"listener {provisioned.plain_port} 127.0.0.1" in conf
    assert f"listener {provisioned.tls_port} 127.0.0.1" in conf
    assert f"password_file {etc}/fedspine.passwd" in conf and f"acl_file {etc}/fedspine.acl" in conf
    assert "allow_anonymous false" in conf
    users = [line.split(":")[0] for line in (etc / "fedspine.passwd").read_text().splitlines()]
    assert sorted(users) == sorted(PASSWORDS)
    assert not any(pw in (etc / "fedspine.passwd").read_text() for pw in PASSWORDS.values())
    acl = (etc / "fedspine.acl").read_text()
    assert "user coordinator" in acl and "user monitor" in acl and f"pattern write {ROOT}/node/%u/upload" in acl
    assert f"user {REGION_ID}" in acl and f"topic write {ROOT}/region/{REGION_ID}/upload" in acl
    for name in ("fedspine.passwd", "fedspine.acl", "certs/server.key"):
        assert _mode(etc / name) == 0o640 and (etc / name).stat().st_gid == _gid("mosquitto"), name
    assert not (provisioned.root / "lab-ca" / "ca.key").exists() or _mode(provisioned.root / "lab-ca" / "ca.key") == 0o600


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid


def test_node_config_points_at_the_broker(provisioned: Provisioned) -> None:
    etc = provisioned.prefix / "etc/fedspine"
    cfg = NodeConfig.load(etc / "node.toml")
    assert cfg.broker.urls == provisioned.urls
    assert cfg.broker.username == NODE_ID and cfg.node.id == NODE_ID and cfg.node.device_type == "nx"
    assert cfg.broker.resolved_password() == PASSWORDS[NODE_ID]
    assert cfg.broker.ca_file and Path(cfg.broker.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert cfg.broker.topic_root == f"{ROOT}/region/{REGION_ID}"  # its region is its coordinator
    assert cfg.telemetry.provider == "jtop"
    assert cfg.node.model_path == str(provisioned.prefix / "opt/fedspine/models/base")
    assert (Path(cfg.node.model_path) / "config.json").exists()
    assert Path(cfg.node.data_path).parent.is_dir() and _mode(Path(cfg.node.data_path).parent) == 0o750
    assert cfg.train.batch_size == 16 and cfg.train.max_length == 128
    assert cfg.node.labels == ("negative", "neutral", "positive")  # the fleet's list, whatever this node's data holds
    assert _mode(etc / "node.password") == 0o600 and _mode(etc / "node.toml") == 0o640
    unit = (provisioned.prefix / "etc/systemd/system/fedspine-node.service").read_text()
    venv = provisioned.prefix / "opt/fedspine/venv"
    assert f"ExecStart={venv}/bin/fedspine --log-format json node --config {etc}/node.toml" in unit
    assert "Restart=always" in unit and "StartLimitIntervalSec=0" in unit
    assert (venv / "bin/fedspine").exists()


def test_coordinator_config(provisioned: Provisioned) -> None:
    etc = provisioned.prefix / "etc/fedspine"
    cfg = CoordinatorConfig.load(etc / "coordinator.toml")
    assert cfg.broker.urls == provisioned.urls and cfg.broker.username == "coordinator"
    assert cfg.broker.resolved_password() == PASSWORDS["coordinator"]
    assert cfg.coordinator.rounds == 30 and cfg.coordinator.min_nodes == 3
    assert cfg.coordinator.labels == ("negative", "neutral", "positive")
    assert cfg.coordinator.state_dir == str(provisioned.prefix / "var/lib/fedspine/coordinator")
    assert Path(cfg.coordinator.state_dir).is_dir()
    assert cfg.pruning.target_sparsity == 0.3 and cfg.pruning.cap("tx2") == 0.6 and cfg.lora == LoraSettings()
    assert cfg.bandit.ranks == (2, 4, 8, 16)
    unit = (provisioned.prefix / "etc/systemd/system/fedspine-coordinator.service").read_text()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=2 3" in unit


def test_region_config(provisioned: Provisioned) -> None:
    etc = provisioned.prefix / "etc/fedspine"
    cfg = RegionConfig.load(etc / "region.toml")
    assert cfg.broker.urls == provisioned.urls and cfg.broker.username == REGION_ID
    assert cfg.broker.resolved_password() == PASSWORDS[REGION_ID]
    assert cfg.broker.ca_file and Path(cfg.broker.ca_file).read_text().startswith("-----BEGIN CERTIFICATE-----")
    # The root's topic root: the region serves its nodes' <root>/region/<rid> itself.
    assert cfg.broker.topic_root == ROOT
    assert cfg.broker.topics.region_root(REGION_ID).root == NodeConfig.load(etc / "node.toml").broker.topic_root
    # The lab's region waits as long as its coordinator (group_vars/regions.yml).
    assert (cfg.region.region_id, cfg.region.deadline_s, cfg.region.quorum) == (REGION_ID, 900.0, 0.5)
    assert _mode(etc / "region.password") == 0o600 and _mode(etc / "region.toml") == 0o640
    state = provisioned.prefix / "var/lib/fedspine/region"
    assert state.is_dir() and _mode(state) == 0o750
    unit = (provisioned.prefix / "etc/systemd/system/fedspine-region.service").read_text()
    venv = provisioned.prefix / "opt/fedspine/venv"
    assert f"ExecStart={venv}/bin/fedspine --log-format json region --config {etc}/region.toml" in unit
    assert "Restart=always" in unit and "RestartPreventExitStatus=2\n" in unit and "StartLimitIntervalSec=0" in unit
    assert f"WorkingDirectory={state}" in unit and f"ReadWritePaths={state}" in unit


# ---- the lab inventory's variables (templated, no host touched) -----------------------------------------------
def _lab_copy(tmp: Path, region: bool) -> Path:
    """The lab inventory; with ``region``, one region (region-a) and nx-01 under it, as hosts.yml describes."""
    inventory = tmp / "inventory"
    shutil.copytree(ANSIBLE_DIR / "inventory" / "lab", inventory)
    if region:
        hosts = yaml.safe_load((inventory / "hosts.yml").read_text())
        hosts["all"]["children"]["regions"]["hosts"] = {"region-a": {"ansible_host": "192.168.50.12"}}
        hosts["all"]["children"]["jetsons"]["children"]["nx"]["hosts"]["nx-01"]["fedspine_region"] = "region-a"
        (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    return inventory


def _lab_var(tmp: Path, inventory: Path, host: str, var: str):
    proc = subprocess.run([_tool("ansible"), "-i", str(inventory), host, "-o", "-m", "ansible.builtin.debug",
                           "-a", f"var={var}", "-e", json.dumps({"vault_fedspine_mqtt_passwords": {"region-a": "pw-a"}})],
                          cwd=ANSIBLE_DIR, env=_env(tmp), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.split("=>", 1)[1])[var]


def test_lab_inventory_is_flat_until_it_has_regions(tmp_path: Path) -> None:
    flat = ANSIBLE_DIR / "inventory" / "lab"
    assert _lab_var(tmp_path, flat, "nx-01", "edge_node_topic_root") == ROOT
    assert _lab_var(tmp_path, flat, "broker-01", "broker_region_users") == []

    regional = _lab_copy(tmp_path, region=True)
    assert _lab_var(tmp_path, regional, "nx-01", "edge_node_topic_root") == f"{ROOT}/region/region-a"
    assert _lab_var(tmp_path, regional, "nx-02", "edge_node_topic_root") == ROOT
    assert _lab_var(tmp_path, regional, "broker-01", "broker_region_users") == ["region-a"]
    assert _lab_var(tmp_path, regional, "region-a", "region_mqtt_password") == "pw-a"


@pytest.mark.parametrize(("name", "message"), [
    ("region.a", "region_id must be set: 1-64 of [A-Za-z0-9_-]"),  # '.' is refused: NATS splits subjects on it
    ("nx-02", "it must differ from every Jetson's inventory name"),  # one MQTT user for a region and a node
])
def test_regions_play_refuses_a_bad_region_id(tmp_path: Path, name: str, message: str) -> None:
    inventory = _lab_copy(tmp_path, region=False)
    hosts = yaml.safe_load((inventory / "hosts.yml").read_text())
    hosts["all"]["children"]["regions"]["hosts"] = {name: {"ansible_host": "192.168.50.12"}}
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), "regions.yml", "--limit", "regions",
                           "-e", json.dumps({"vault_fedspine_mqtt_passwords": {name: "pw"}})],
                          cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout


def test_edge_nodes_play_refuses_a_node_outside_the_regions(tmp_path: Path) -> None:
    """With regions the root's own nodes sit out: nx-02, under no region, stops the play before anything is done
    to it (the check runs on the controller, so the lab's unreachable address is never tried)."""
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(_lab_copy(tmp_path, region=True)), "edge_nodes.yml",
                           "--limit", "nx-02", "-e", json.dumps({"vault_fedspine_mqtt_passwords": {}})],
                          cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "every Jetson names its region in fedspine_region" in proc.stdout + proc.stderr, proc.stdout


# ---- the rendered broker config runs a mosquitto that enforces auth and the ACL -------------------------------
@pytest.fixture(scope="module")
def broker(provisioned: Provisioned) -> Iterator[Provisioned]:
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed")
    conf = provisioned.prefix / "etc/mosquitto/mosquitto.conf"
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                socket.create_connection(("127.0.0.1", provisioned.tls_port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("mosquitto did not open its TLS listener")
        yield provisioned
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Client:
    """A small synchronous paho wrapper: connect, subscribe, publish, collect messages."""

    def __init__(self, port: int, username: str | None, password: str | None, ca_file: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connect_rc: mqtt.ReasonCode | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file)
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connect_rc", rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("localhost", port, keepalive=10)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while self.connect_rc is None and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def connected(self) -> bool:
        return self.connect_rc is not None and not self.connect_rc.is_failure

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.mosquitto
def test_rendered_broker_refuses_anonymous_and_wrong_passwords(broker: Provisioned) -> None:
    anonymous = Client(broker.plain_port, None, None)
    wrong = Client(broker.plain_port, NODE_ID, "not-the-password")
    try:
        assert anonymous.connect_rc is not None and anonymous.connect_rc.is_failure
        assert wrong.connect_rc is not None and wrong.connect_rc.is_failure
    finally:
        anonymous.close()
        wrong.close()


@pytest.mark.mosquitto
def test_rendered_broker_enforces_the_acl_over_tls(broker: Provisioned) -> None:
    ca_file = str(broker.prefix / "etc/fedspine/broker-ca.crt")
    coordinator = Client(broker.tls_port, "coordinator", PASSWORDS["coordinator"], ca_file)
    node = Client(broker.tls_port, NODE_ID, PASSWORDS[NODE_ID], ca_file)
    monitor = Client(broker.plain_port, "monitor", PASSWORDS["monitor"])
    try:
        assert coordinator.connected and node.connected and monitor.connected
        coordinator.subscribe(f"{ROOT}/node/+/upload")
        monitor.subscribe(f"{ROOT}/node/+/config")
        node.subscribe(f"{ROOT}/node/+/config")

        node.publish(f"{ROOT}/node/other-node/upload", b"forged")
        node.publish(f"{ROOT}/node/{NODE_ID}/upload", b"own")
        assert _wait_for(lambda: (f"{ROOT}/node/{NODE_ID}/upload", b"own") in coordinator.messages)
        time.sleep(0.5)
        assert [m for m in coordinator.messages if m[1] == b"forged"] == []

        coordinator.publish(f"{ROOT}/node/other-node/config", b"theirs")
        coordinator.publish(f"{ROOT}/node/{NODE_ID}/config", b"mine")
        assert _wait_for(lambda: (f"{ROOT}/node/{NODE_ID}/config", b"mine") in node.messages)
        time.sleep(0.5)
        assert [m for m in node.messages if m[1] == b"theirs"] == []
        assert monitor.messages == []  # monitors read status and telemetry only
    finally:
        for client in (coordinator, node, monitor):
            client.close()


@pytest.mark.mosquitto
def test_provisioned_region_joins_the_broker(broker: Provisioned) -> None:
    """The region service as its unit starts it (the project's code, the rendered config, password file and CA)
    announces itself to the root over TLS, and says offline when stopped."""
    unit = (broker.prefix / "etc/systemd/system/fedspine-region.service").read_text()
    args = re.search(r"^ExecStart=\S+/bin/fedspine (.+)$", unit, re.M).group(1).split()
    ca_file = str(broker.prefix / "etc/fedspine/broker-ca.crt")
    coordinator = Client(broker.tls_port, "coordinator", PASSWORDS["coordinator"], ca_file)
    region = subprocess.Popen([sys.executable, "-c", "import sys; from shared.cli import main; sys.exit(main())",
                               *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def states() -> list[str]:
        return [decode(p, RegionStatus).state for t, p in coordinator.messages if t.endswith("/status")]

    try:
        assert coordinator.connected
        coordinator.subscribe(f"{ROOT}/region/{REGION_ID}/status")
        assert _wait_for(lambda: "online" in states() or region.poll() is not None, timeout=90), "no region status"
        assert region.poll() is None, region.stdout.read()
        region.terminate()
        assert region.wait(timeout=30) == 0
        assert _wait_for(lambda: states()[-1:] == ["offline"]), states()
    finally:
        if region.poll() is None:
            region.kill()
            region.wait()
        coordinator.close()
