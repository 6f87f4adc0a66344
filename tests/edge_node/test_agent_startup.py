"""A node's start-up: it connects to the broker while its model and data load, so that a wrong URL, password, CA or
ACL is in its log during the load rather than after it; it announces itself (retained "online") only once loaded;
a bad model or data file still exits 2 whatever the broker does; a stop during the load closes the connection.

The load is held open by a trainer whose calibration (the last part of the load) waits for the test to release it,
and the tests wait on log lines as they are written (``LogWatch``), never on the clock."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import structlog

from edge_node import agent as agent_module
from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from shared.cli import run_service
from shared.messages import NodeStatus, decode
from shared.transport import MemoryBus, MemoryTransport, MqttTransport
from tests.broker import Inbox, LocalMosquitto

ENOUGH_S = 30.0  # a bound for waits on things that happen at once, only to keep a broken build from hanging


class LogWatch:
    """A structlog processor (for ``capture_logs``) that lets a test wait until an event has been logged."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._cv = threading.Condition()

    def __call__(self, _logger, _method, event_dict):
        with self._cv:
            self.events.append(event_dict["event"])
            self._cv.notify_all()
        return event_dict

    def wait_for(self, event: str, count: int = 1, timeout_s: float = ENOUGH_S) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.events.count(event) >= count, timeout_s)


@pytest.fixture
def mosquitto_broker(mosquitto_broker: LocalMosquitto):
    """The session's broker, with the retained statuses these tests' nodes leave there cleared after each test:
    later tests (tests/reliability/test_security.py) read the whole topic tree and expect nothing in it."""
    yield mosquitto_broker
    for user in ("node-a", "node-b", "node-late"):
        if user in mosquitto_broker.users:
            t = MqttTransport(mosquitto_broker.broker_config(user), client_id=f"clear-{user}")
            t.start(timeout_s=10)
            t.publish(f"{mosquitto_broker.root}/node/{user}/status", b"", qos=1, retain=True)
            t.wait_published(5)
            t.stop()


class SlowLoadTrainer:
    """A trainer whose calibration, the last step of the node's load, waits until ``release`` is set."""

    sparsity = 0.0
    labels = ["neg", "pos"]
    base_model = None

    def __init__(self) -> None:
        self.loading = threading.Event()  # the node is inside its load
        self.release = threading.Event()

    def calibrate(self, steps):
        self.loading.set()
        assert self.release.wait(ENOUGH_S), "the test never released the load"
        return {"step_s": 0.01, "fixed_s": 0.1}


def node_config(tmp_path: Path, node_id: str = "node-a", **broker) -> NodeConfig:
    return NodeConfig.from_dict({"broker": broker, "node": {"id": node_id, "state_dir": str(tmp_path / node_id)}})


def broker_settings(broker: LocalMosquitto, user: str = "node-a", password: str | None = None) -> dict:
    return {"url": broker.url(), "username": user, "password": password or broker.users[user],
            "topic_root": broker.root}


def start(agent: NodeAgent) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("rc", run_service("node", agent.run)), daemon=True)
    t.start()
    return t, out


class Statuses(Inbox):
    """What arrives on a node's status topic, read as the states published since ``since`` (the identity probe's
    empty message and retained statuses of earlier tests on the shared broker left out)."""

    def __init__(self, since: float) -> None:
        super().__init__()
        self.since = since

    def states(self) -> list[str]:
        with self._cv:
            found = [decode(p, NodeStatus) for _, p in self.items if p]
        return [s.state for s in found if s.ts >= self.since]

    def wait_for_state(self, state: str, count: int = 1, timeout_s: float = ENOUGH_S) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.states().count(state) >= count, timeout_s)


# ---- over the in-memory bus ----------------------------------------------------------------------------------------
def memory_node(tmp_path: Path, bus: MemoryBus, trainer) -> NodeAgent:
    a = NodeAgent(node_config(tmp_path), trainer=trainer)
    a.transport = MemoryTransport(bus, "node-a", on_connect=a._on_connect,
                                  will=(a.topics.node("node-a", "status"), b""), log=a.log.bind(logger="transport"))
    return a


def watched_bus(topic_filter: str) -> tuple[MemoryBus, Inbox]:
    """A new bus, and what is published on it under ``topic_filter``."""
    bus, seen = MemoryBus(), Inbox()
    watcher = MemoryTransport(bus, "watcher")
    watcher.subscribe(topic_filter, seen)
    watcher.start()
    return bus, seen


def test_a_node_connects_while_it_loads_and_announces_itself_only_once_loaded(tmp_path):
    bus, seen = watched_bus("fedspine/v1/node/+/status")
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]):
        a = memory_node(tmp_path, bus, trainer)
        t, out = start(a)
        assert watch.wait_for("connected_loading_model")
        assert trainer.loading.wait(ENOUGH_S) and a.transport.connected.is_set()
        assert "calibrated" not in watch.events and "node_joined" not in watch.events
        assert seen.items == [] and bus.retained("fedspine/v1/node/+/status") == []  # connected, not announced
        trainer.release.set()
        assert watch.wait_for("node_joined")
        assert seen.wait_for(1)
        a.stop()
        t.join(ENOUGH_S)
    assert out["rc"] == 0
    assert decode(seen.items[0][1], NodeStatus).state == "online"
    order = watch.events
    assert order.index("node_starting") < order.index("connected_loading_model") < order.index("calibrated") \
        < order.index("node_joined")


def test_a_node_stopped_while_it_loads_closes_its_connection_without_announcing(tmp_path):
    bus, seen = watched_bus("fedspine/#")
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]):
        a = memory_node(tmp_path, bus, trainer)
        t, out = start(a)
        assert watch.wait_for("connected_loading_model") and trainer.loading.wait(ENOUGH_S)
        a.stop()  # the signal arrives during the load
        trainer.release.set()
        t.join(ENOUGH_S)
    assert not t.is_alive() and out["rc"] == 0
    assert "stopped_before_joining" in watch.events and "node_joined" not in watch.events
    assert not a.transport.connected.is_set() and a.transport not in bus._clients  # disconnected
    assert seen.items == []  # nothing published: no status, no will (a graceful disconnect)


# ---- a broker that is not there -------------------------------------------------------------------------------------
def test_an_unreachable_broker_is_logged_during_the_load_and_bad_data_still_exits_2(tmp_path, monkeypatch):
    """The broker is down and the data file is bad: the node says what is wrong with the broker while it loads,
    and then stops for the data (exit 2, for the operator), not for the broker (exit 1, which systemd retries)."""
    from edge_node import engine
    from edge_node.data import DataError

    monkeypatch.setattr(agent_module, "CONNECT_EARLY_TIMEOUT_S", 1.0)
    watch = LogWatch()

    def bad_data(*args, **kwargs):
        assert watch.wait_for("broker_connect_failed"), "no broker failure logged during the load"
        raise DataError("train.csv: no label column")

    monkeypatch.setattr(engine, "LocalTrainer", bad_data)
    with structlog.testing.capture_logs(processors=[watch]) as lines:
        a = NodeAgent(node_config(tmp_path, url="mqtt://127.0.0.1:1", username="node-a", password="x"))
        rc = run_service("node", a.run)
    assert rc == 2
    failed = [e for e in lines if e["event"] == "broker_connect_failed"]
    assert failed[0]["log_level"] == "error" and "nothing listens on 127.0.0.1:1" in failed[0]["error"]
    assert watch.events.index("broker_connect_failed") < watch.events.index("node_stopped")
    assert watch.events.count("broker_connect_failed") == 1  # none after the load failed: the retries stopped
    assert not a.transport.connected.is_set()


def test_a_node_stopped_while_it_tries_an_unreachable_broker_leaves_at_once(tmp_path, monkeypatch):
    """A stop ends the connection attempt under way rather than waiting it out (here it would last 10 minutes)."""
    monkeypatch.setattr(agent_module, "CONNECT_EARLY_TIMEOUT_S", 600.0)
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]):
        a = NodeAgent(node_config(tmp_path, url="mqtt://127.0.0.1:1", username="node-a", password="x"),
                      trainer=trainer)
        t, out = start(a)
        assert trainer.loading.wait(ENOUGH_S)
        a.stop()
        trainer.release.set()
        t.join(ENOUGH_S)
    assert not t.is_alive() and out["rc"] == 0
    assert "stopped_before_joining" in watch.events and "broker_connect_failed" not in watch.events


# ---- a real mosquitto (users, ACL) ----------------------------------------------------------------------------------
@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_node_checks_its_identity_while_it_loads_and_its_will_says_offline_until_announced(
        tmp_path, mosquitto_broker: LocalMosquitto, mqtt_transport):
    seen = Statuses(since=time.time())
    mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/node-b/status": seen})
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]):
        a = NodeAgent(node_config(tmp_path, "node-b", **broker_settings(mosquitto_broker, "node-b")), trainer=trainer)
        t, out = start(a)
        assert watch.wait_for("connected_loading_model")
        assert watch.events.index("broker_connected") < watch.events.index("identity_checked") \
            < watch.events.index("connected_loading_model")
        assert trainer.loading.wait(ENOUGH_S) and "calibrated" not in watch.events
        # The link dies during the load: the broker publishes the will, which says "offline"; the node reconnects
        # and, not loaded yet, announces nothing.
        own_will = threading.Event()
        a.transport.on_will_topic = lambda payload: own_will.set() if payload else None
        a.transport.client.socket().shutdown(socket.SHUT_RDWR)
        assert seen.wait_for_state("offline")
        assert own_will.wait(ENOUGH_S)  # the node reconnected and read its retained will back: true, left alone
        assert seen.states() == ["offline"]
        trainer.release.set()
        assert watch.wait_for("node_joined")
        assert seen.wait_for_state("online")
        a.stop()
        t.join(ENOUGH_S)
        assert out["rc"] == 0
        assert seen.wait_for_state("offline", count=2)
    events = watch.events
    assert "stale_will_overridden" not in events[:events.index("node_joined")]  # nothing to override while loading
    states = seen.states()  # "online" may come twice (the birth again on the will of the cut link: idempotent)
    assert [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s] == ["offline", "online", "offline"]


@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_refused_password_is_logged_during_the_load_and_exits_1_after_it(tmp_path, mosquitto_broker: LocalMosquitto):
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]) as lines:
        a = NodeAgent(node_config(tmp_path, **broker_settings(mosquitto_broker, password="wrong")), trainer=trainer)
        t, out = start(a)
        assert watch.wait_for("broker_connect_failed")
        assert trainer.loading.wait(ENOUGH_S) and "calibrated" not in watch.events  # still loading
        trainer.release.set()
        t.join(ENOUGH_S)
    assert out["rc"] == 1  # the broker may be mended: systemd tries again
    failed = next(e for e in lines if e["event"] == "broker_connect_failed")
    assert failed["error"].startswith(f"broker {mosquitto_broker.url()} refused 'node-a': Not authorized; ")
    assert "password_file" in failed["error"]  # what to check
    assert watch.events.index("broker_refused") < watch.events.index("broker_connect_failed") \
        < watch.events.index("calibrated")
    assert "node_joined" not in watch.events


@pytest.mark.mosquitto
@pytest.mark.slow
def test_a_broker_mended_during_the_load_is_joined_without_a_restart(tmp_path, mosquitto_broker: LocalMosquitto,
                                                                     monkeypatch):
    """The node's user is missing from the broker when it starts (refused); the operator adds it (mosquitto reloads)
    while the model still loads: the node's next attempt connects, and it joins once loaded."""
    monkeypatch.setattr(agent_module, "CONNECT_RETRY_S", 0.2)
    watch, trainer = LogWatch(), SlowLoadTrainer()
    settings = {**broker_settings(mosquitto_broker), "username": "node-late", "password": "late-pw"}
    with structlog.testing.capture_logs(processors=[watch]):
        a = NodeAgent(node_config(tmp_path, "node-late", **settings), trainer=trainer)
        t, out = start(a)
        assert watch.wait_for("broker_connect_failed")
        mosquitto_broker.add_user("node-late", "late-pw")
        assert watch.wait_for("connected_loading_model")
        assert trainer.loading.wait(ENOUGH_S) and "calibrated" not in watch.events  # still loading
        trainer.release.set()
        assert watch.wait_for("node_joined")
        a.stop()
        t.join(ENOUGH_S)
    assert out["rc"] == 0


@pytest.mark.mosquitto
@pytest.mark.slow
def test_an_identity_the_acl_drops_is_logged_during_the_load_and_exits_2_after_it(
        tmp_path, mosquitto_broker: LocalMosquitto, monkeypatch):
    """``[node] id`` is not the broker user name: the broker accepts the login and drops what the node publishes.
    The failed identity check is logged during the load; the node stops with exit 2 (for the operator) once loaded."""
    monkeypatch.setattr(agent_module, "IDENTITY_TIMEOUT_S", 0.5)
    watch, trainer = LogWatch(), SlowLoadTrainer()
    with structlog.testing.capture_logs(processors=[watch]) as lines:
        a = NodeAgent(node_config(tmp_path, "node-x", **broker_settings(mosquitto_broker, "node-a")), trainer=trainer)
        t, out = start(a)
        assert watch.wait_for("broker_check_failed")
        assert trainer.loading.wait(ENOUGH_S) and "calibrated" not in watch.events  # still loading
        trainer.release.set()
        t.join(ENOUGH_S)
    assert out["rc"] == 2
    failed = next(e for e in lines if e["event"] == "broker_check_failed")
    assert "differs from [broker] username 'node-a'" in failed["error"]
    assert "node_joined" not in watch.events and not a.transport.connected.is_set()
