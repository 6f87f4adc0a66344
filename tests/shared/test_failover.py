"""Broker member lists: the [broker] config, the NATS renderings (no server), and the transport's failover and
presence guard on real mosquittos (two single brokers stand for two members; NATS itself: tests/reliability)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker_config.fedspine_broker import main as broker_main
from broker_config.nats import NatsError, hash_password, read_passwords, render_nats_auth, render_nats_config
from coordinator.simulate import write_toml
from shared import transport
from shared.config import BrokerConfig, ConfigError, from_mapping
from shared.topics import (
    NODE_READS,
    NODE_WRITES,
    REGION_READS,
    REGION_WRITES,
    TopicError,
    check_nats_name,
    nats_subject,
)
from shared.transport import MqttTransport
from tests.broker import Inbox, running_broker

REPO = Path(__file__).resolve().parents[2]


# ---- [broker] --------------------------------------------------------------------------------------------------
def test_url_is_one_string_or_a_list_of_members() -> None:
    one = from_mapping(BrokerConfig, {"url": "mqtt://b:1883"}, "broker")
    assert one.urls == ("mqtt://b:1883",) and one.endpoints == (("b", 1883),)
    many = from_mapping(BrokerConfig, {"url": ["mqtts://a:8883", "mqtts://b"]}, "broker")
    assert many.urls == ("mqtts://a:8883", "mqtts://b") and many.endpoints == (("a", 8883), ("b", 8883)) and many.tls
    for bad, msg in [([], "at least one"), (["mqtt://a:1883", "mqtts://b:8883"], "plain text"),
                     (["mqtt://a:1883", "mqtt://a:1883"], "twice"), (["http://a"], "must look like"),
                     (["mqtt://a:99999"], "invalid port")]:
        with pytest.raises(ConfigError, match=msg):
            from_mapping(BrokerConfig, {"url": bad}, "broker")


def test_only_real_options_remain_and_each_has_help() -> None:
    fields = dataclasses.fields(BrokerConfig)
    assert [f.name for f in fields] == ["url", "username", "password", "password_file", "ca_file", "topic_root",
                                        "chunk_size"]
    assert all(f.metadata.get("help") for f in fields)
    for gone in ("keepalive_s", "max_inflight", "reconnect_min_s", "reconnect_max_s"):
        with pytest.raises(ConfigError, match="unknown key"):
            from_mapping(BrokerConfig, {gone: 1}, "broker")


# ---- NATS names and renderings ------------------------------------------------------------------------------
def test_nats_names_and_subjects() -> None:
    assert check_nats_name("jetson-07_a") == "jetson-07_a"
    with pytest.raises(TopicError, match="'.'"):
        check_nats_name("jetson.07")
    assert nats_subject("fedspine/v1/node/+/telemetry/#") == "fedspine.v1.node.*.telemetry.>"
    with pytest.raises(TopicError):
        nats_subject("fedspine/v1/node/a.b/status")


def _users(auth: str) -> dict[str, str]:
    """user -> its block of the rendered authorization file."""
    blocks = auth.split("    {\n")[1:]
    return {b.split('user: "', 1)[1].split('"', 1)[0]: b for b in blocks}


def test_nats_permissions_match_the_mosquitto_acl() -> None:
    h = hash_password("pw", cost=4)
    auth = _users(render_nats_auth({"coordinator": h, "grafana": h, "n1": h, "n2": h, "east": h}, "fleet/v1",
                                   ["coordinator"], ["grafana"], region_users=["east"]))
    assert set(auth) == {"coordinator", "grafana", "n1", "n2", "east"}
    assert all('allowed_connection_types: ["MQTT"]' in b and "$2b$04$" in b for b in auth.values())
    n1 = auth["n1"]
    pub, sub = n1.split("publish:")[1].split("subscribe:")
    trees = ("fleet.v1", "fleet.v1.region.*")  # the root's nodes, and those under a regional aggregator
    assert {f"{t}.node.n1.{nats_subject(k)}" for t in trees for k in NODE_WRITES} == set(pub.split('"')[1::2])
    assert set(sub.split('"')[1::2]) == {*(f"{t}.node.n1.{k}" for t in trees for k in (*NODE_READS, "status")),
                                          *(f"{t}.{k}" for t in trees for k in ("broadcast", "broadcast.>",
                                                                                 "coordinator.status")),
                                          "$MQTT.sub.>"}
    pub, sub = auth["east"].split("publish:")[1].split("subscribe:")
    assert set(pub.split('"')[1::2]) == {*(f"fleet.v1.region.east.{k}" for k in REGION_WRITES),
                                         "fleet.v1.region.east.node.>", "fleet.v1.region.east.broadcast.>",
                                         "fleet.v1.region.east.coordinator.status"}
    assert set(sub.split('"')[1::2]) == {*(f"fleet.v1.region.east.{k}" for k in REGION_READS),
                                         "fleet.v1.region.east.node.>", "$MQTT.sub.>"}
    assert "n2" not in n1
    monitor_sub = auth["grafana"].split("subscribe:")[1]
    assert 'publish: { deny: [">"] }' in auth["grafana"]
    assert not any(k in monitor_sub for k in ("download", "config", "upload", "resend", "missing"))
    assert 'subscribe: { allow: ["fleet.v1", "fleet.v1.>", "$MQTT.sub.>"] }' in auth["coordinator"]
    with pytest.raises(NatsError, match="'.'"):
        render_nats_auth({"coordinator": h, "n.1": h})
    with pytest.raises(NatsError, match="no bcrypt"):
        render_nats_auth({"coordinator": h, "n1": "clear"})
    with pytest.raises(NatsError, match="'.'"):
        render_nats_auth({"coordinator": h}, "fleet.v1")


def test_nats_member_config_and_cli(tmp_path) -> None:
    conf = render_nats_config(server_name="m1", store_dir="/js", routes=["10.0.0.1:6222", "10.0.0.2:6222"],
                              route_user="r", route_password="s", tls_certfile="/c", tls_keyfile="/k", tls_cafile="/a")
    assert 'server_name: "m1"' in conf and "stream_replicas: 3" in conf and 'cert_file: "/c"' in conf
    assert '"nats-route://r:s@10.0.0.2:6222"' in conf and 'include "nats-auth.conf"' in conf
    with pytest.raises(NatsError, match="needs"):
        render_nats_config(server_name="m1")
    pw = tmp_path / "passwd"
    assert broker_main(["nats-passwd", "coordinator", "--passwords", str(pw), "--password", "c", "--cost", "4"]) == 0
    assert broker_main(["nats-passwd", "node-1", "--passwords", str(pw), "--cost", "4",
                        "--secret-out", str(tmp_path / "n1.secret")]) == 0
    assert broker_main(["nats-passwd", "node.2", "--passwords", str(pw), "--password", "x", "--cost", "4"]) == 2
    assert sorted(read_passwords(pw)) == ["coordinator", "node-1"] and (pw.stat().st_mode & 0o777) == 0o640
    out = tmp_path / "nats-auth.conf"
    assert broker_main(["render-nats-auth", "--passwords", str(pw), "--out", str(out)]) == 0
    assert set(_users(out.read_text())) == {"coordinator", "node-1"}
    assert broker_main(["render-nats", "--server-name", "m2", "--route", "h:6222", "--set", "mqtt_port=8883",
                        "--out", str(tmp_path / "nats.conf")]) == 0
    assert 'listen: "0.0.0.0:8883"' in (tmp_path / "nats.conf").read_text()


# ---- the transport on two mosquittos ---------------------------------------------------------------------------
@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "RECONNECT_MIN_S", 0.2)
    monkeypatch.setattr(transport, "RECONNECT_MAX_S", 1.0)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_client_skips_an_unreachable_member_and_fails_over_on_loss(quick, tmp_path) -> None:
    users = {"coordinator": "c-pw", "node-a": "a-pw"}
    with running_broker(tls=False, users=users) as a, running_broker(tls=False, users=users) as b:
        dead = "mqtt://127.0.0.1:1"  # nothing listens there
        cfg = BrokerConfig(url=(dead, a.url(), b.url()), username="node-a", password="a-pw")
        births = Inbox()
        inbox = Inbox()
        with capture_logs() as logs:
            t = MqttTransport(cfg, "fo-node", on_connect=lambda: births("birth", b""))
            t.subscribe("fedspine/v1/node/node-a/config", inbox)
            t.start(timeout_s=15)
            assert t.member == a.url()
            a.stop()  # the member in use goes away
            deadline = time.monotonic() + 15
            while t.connects < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert t.connects == 2 and t.member == b.url() and t.connected.is_set()
            sender = MqttTransport(BrokerConfig(url=b.url(), username="coordinator", password="c-pw"), "fo-coord")
            sender.start(10)
            sender.publish("fedspine/v1/node/node-a/config", b"after failover")
            assert inbox.wait_for(1, 5)  # re-subscribed on the new member
            sender.stop(1)
            t.stop(1)
    connected = [e for e in logs if e["event"] == "broker_connected" and e.get("client_id") == "fo-node"]
    assert [e["url"] for e in connected] == [a.url(), b.url()] and "reconnect_s" in connected[1]
    assert [src for src, _, _ in t.failovers] == [a.url()] and len(births.items) == 2  # birth on every connect
    assert any(e["event"] == "broker_next_member" and e["failed"] == dead for e in logs)


@pytest.mark.mosquitto
def test_own_will_seen_while_connected_is_answered_with_a_new_birth(mqtt_transport) -> None:
    """A member publishing the will of a connection this client already left must not leave it 'offline'."""
    topic = "fedspine/v1/node/node-a/status"
    statuses = Inbox()
    mqtt_transport("coordinator", subscriptions={topic: statuses})
    node = mqtt_transport("node-a", will=(topic, b"offline-will"), start=False)
    node.on_connect = lambda: node.publish(topic, b"online", retain=True)
    node.start(10)
    assert statuses.wait_for(1, 5)
    coord = mqtt_transport("coordinator")
    coord.publish(topic, b"someone else's offline", retain=True)  # not our will: left alone
    coord.publish(topic, b"offline-will", retain=True)  # our own will, as a stale member would publish it
    assert statuses.wait_for(4, 5), statuses.items
    time.sleep(0.3)
    assert [p for _, p in statuses.items] == [b"online", b"someone else's offline", b"offline-will", b"online"]


# ---- leaving when every member is gone -------------------------------------------------------------------------
@pytest.mark.mosquitto
def test_stop_returns_when_the_broker_froze_with_publishes_in_flight(tmp_path) -> None:
    """A broker that keeps the TCP connection but answers nothing (SIGSTOP): stop() gives up after its flush."""
    with running_broker(tls=False) as b:
        t = MqttTransport(b.broker_config("node-a"), "frozen-client")
        t.start(10)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(50):
                t.publish("fedspine/v1/node/node-a/telemetry", bytes(1000))
            done = threading.Event()
            threading.Thread(target=lambda: (t.stop(flush_s=1.0), done.set()), daemon=True).start()
            assert done.wait(30), "stop() hung on a frozen broker"  # a hang detector, not a speed target
        finally:
            b.proc.send_signal(signal.SIGCONT)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_node_process_exits_on_sigterm_when_every_member_is_gone(tmp_path) -> None:
    with running_broker(tls=False) as b:
        cfg = tmp_path / "node.toml"
        write_toml(cfg, {"broker": {"url": [b.url(), "mqtt://127.0.0.1:1"], "username": "node-a",
                                    "password": b.users["node-a"]},
                         "node": {"id": "node-a", "state_dir": str(tmp_path / "state")}})
        log = tmp_path / "node.log"
        with open(log, "ab") as fh:
            p = subprocess.Popen([sys.executable, "-m", "tests.reliability.fake_node", "--config", str(cfg)],
                                 stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while "node_joined" not in log.read_text() and time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.2)
            assert "node_joined" in log.read_text(), log.read_text()[-2000:]
            b.stop()  # every member is gone now: one never existed, the other stopped
            time.sleep(2.0)
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0, log.read_text()[-2000:]  # a hang detector: it exits, cleanly
        finally:
            if p.poll() is None:
                p.kill()
