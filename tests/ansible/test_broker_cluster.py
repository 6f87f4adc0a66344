"""The broker_cluster role: three NATS members provisioned on localhost into temporary prefixes, twice (the second
run changes nothing), then started from the rendered files: they form one cluster that enforces the users."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from broker_config.nats import free_ports, mqtt_connects, require_nats_server
from shared.config import BrokerConfig
from shared.transport import MqttTransport
from tests.ansible.test_ansible import ANSIBLE_DIR, RunResult, _env, _parse_run, _tool
from tests.broker import Inbox

pytestmark = [pytest.mark.slow, pytest.mark.nats]
MEMBERS = ("nats-1", "nats-2", "nats-3")
NODE_ID = "jetson-nx-test"
PASSWORDS = {"coordinator": "coord-pw-7f3a", "monitor": "monitor-pw-19c2", NODE_ID: "node-pw-c81e"}


@dataclass
class Cluster:
    root: Path
    prefixes: dict[str, Path]
    mqtt_ports: dict[str, int]
    first: RunResult
    second: RunResult


def _playbook(tmp: Path, inventory: Path, extra_vars: Path) -> RunResult:
    proc = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), "-e", f"@{extra_vars}", "broker_cluster.yml"],
                          cwd=ANSIBLE_DIR, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    return _parse_run(proc.stdout)


@pytest.fixture(scope="module")
def provisioned() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the role sets root/nats ownership: run as root (CI does)")
    try:
        require_nats_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="fedspine-ansible-nats-", dir="/tmp"))
    try:
        root.chmod(0o755)
        inventory = root / "inventory"
        shutil.copytree(ANSIBLE_DIR / "inventory" / "lab" / "group_vars", inventory / "group_vars")
        ports = free_ports(3 * len(MEMBERS))  # outside the ephemeral range: still free when the members start
        hosts, prefixes, mqtt_ports = {}, {}, {}
        for i, name in enumerate(MEMBERS):
            prefixes[name] = root / name
            mqtt_ports[name] = ports[3 * i]
            hosts[name] = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                           "ansible_become": False, "ansible_host": "127.0.0.1",
                           "broker_cluster_prefix": str(prefixes[name]), "broker_cluster_mqtt_port": ports[3 * i],
                           "broker_cluster_client_port": ports[3 * i + 1], "broker_cluster_route_port": ports[3 * i + 2]}
        (inventory / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {
            "broker_cluster": {"hosts": hosts},
            "jetsons": {"children": {"nx": {"hosts": {NODE_ID: {"ansible_connection": "local"}}}}}}}}))
        extra = root / "test-vars.yml"
        extra.write_text(yaml.safe_dump({
            "vault_fedspine_mqtt_passwords": PASSWORDS, "vault_fedspine_nats_route_password": "route-pw-5d1e",
            "fedspine_lab_ca_dir": str(root / "lab-ca"), "broker_cluster_install_packages": False,
            "broker_cluster_manage_service": False, "broker_cluster_bcrypt_cost": 4,
            "broker_cluster_route_address": "127.0.0.1", "broker_cluster_mqtt_address": "127.0.0.1"}))
        first = _playbook(root, inventory, extra)
        second = _playbook(root, inventory, extra)
        yield Cluster(root, prefixes, mqtt_ports, first, second)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_cluster_role_second_run_changes_nothing(provisioned: Cluster) -> None:
    assert set(provisioned.first.stats) == set(MEMBERS)
    for host, counts in provisioned.first.stats.items():
        assert counts["failures"] == 0 and counts["changed"] > 0, host
    stats = provisioned.second.stats
    assert {h: c["changed"] for h, c in stats.items()} == dict.fromkeys(MEMBERS, 0), provisioned.second.changed_tasks
    assert all(c["failures"] == 0 for c in stats.values())


def test_cluster_role_files(provisioned: Cluster) -> None:
    for name, prefix in provisioned.prefixes.items():
        etc = prefix / "etc/nats"
        conf, auth = (etc / "nats.conf").read_text(), (etc / "nats-auth.conf").read_text()
        assert f'server_name: "{name}"' in conf and conf.count("nats-route://route:route-pw-5d1e@127.0.0.1:") == 3
        assert "stream_replicas: 3" in conf and 'include "nats-auth.conf"' in conf and "cert_file" in conf
        assert f'"fedspine.v1.node.{NODE_ID}.upload"' in auth and 'allowed_connection_types: ["MQTT"]' in auth
        text = "".join(p.read_text() for p in etc.rglob("*") if p.is_file())
        assert not any(pw in text for pw in PASSWORDS.values())  # bcrypt hashes only
        for f in ("nats.conf", "nats-auth.conf", "passwd", "certs/server.key"):
            assert stat.S_IMODE((etc / f).stat().st_mode) == 0o640, f
        unit = prefix / "etc/systemd/system/nats-server.service.d/fedspine.conf"
        assert f"ExecStart=/usr/sbin/nats-server -c {etc}/nats.conf" in unit.read_text()


@pytest.fixture(scope="module")
def running(provisioned: Cluster) -> Iterator[Cluster]:
    procs = []
    try:
        for prefix in provisioned.prefixes.values():
            log = open(prefix / "nats.log", "ab")  # noqa: SIM115 - owned by the process
            procs.append(subprocess.Popen(["nats-server", "-c", str(prefix / "etc/nats/nats.conf")], stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        ca = provisioned.root / "lab-ca" / "ca.crt"
        deadline = time.monotonic() + 180  # JetStream elects its meta leader first; slow on a loaded machine
        for name, port in provisioned.mqtt_ports.items():
            while not mqtt_connects("127.0.0.1", port, NODE_ID, PASSWORDS[NODE_ID], ca):
                assert time.monotonic() < deadline, (provisioned.prefixes[name] / "nats.log").read_text()[-3000:]
                time.sleep(0.3)
        yield provisioned
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_provisioned_members_form_one_cluster_that_enforces_the_users(running: Cluster) -> None:
    ca = str(running.root / "lab-ca" / "ca.crt")
    urls = [f"mqtts://127.0.0.1:{running.mqtt_ports[m]}" for m in MEMBERS]
    assert not mqtt_connects("127.0.0.1", running.mqtt_ports["nats-2"], NODE_ID, "wrong", Path(ca))
    inbox = Inbox()
    node = MqttTransport(BrokerConfig(url=(urls[2], *urls[:2]), username=NODE_ID, password=PASSWORDS[NODE_ID],
                                      ca_file=ca), "ansible-node")
    node.subscribe(f"fedspine/v1/node/{NODE_ID}/config", inbox)
    node.subscribe("fedspine/v1/node/other/config", inbox)  # refused by its permissions
    coord = MqttTransport(BrokerConfig(url=tuple(urls), username="coordinator", password=PASSWORDS["coordinator"],
                                       ca_file=ca), "ansible-coordinator")
    try:
        node.start(30)
        coord.start(30)
        coord.publish("fedspine/v1/node/other/config", b"theirs")
        coord.publish(f"fedspine/v1/node/{NODE_ID}/config", b"mine")  # member 0 -> member 2 over the routes
        assert inbox.wait_for(1, 15), "nothing crossed the cluster"
        time.sleep(0.5)
        assert inbox.items == [(f"fedspine/v1/node/{NODE_ID}/config", b"mine")]
    finally:
        node.stop(1)
        coord.stop(1)
