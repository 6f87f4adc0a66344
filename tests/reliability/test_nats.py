"""The fleet on a real 3-member NATS cluster (MQTT gateway, JetStream with replicated MQTT state), started once
for this module from the project's templates (broker_config/nats.py): the permission matrix of the mosquitto
ACL tests, and failover when the member of a node or of the coordinator is killed in the middle of a round.

Every "denied" is proven by delivery, with a positive control: a sentinel published after the forbidden
messages by the same client reaches its reader, so the absence of the forbidden ones is not a timing accident.
Failover times (loss to CONNACK on the next member) are written to results/nats-failover.json; the tests
assert correctness (every accepted update aggregated once, the global model equal to their replay), not speed.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_config.nats import LocalNatsCluster, require_nats_server
from shared.config import BrokerConfig
from shared.messages import Command, NodeStatus, RoundConfig, decode, encode
from shared.topics import NODE_READS, NODE_WRITES, REGION_READS, REGION_WRITES
from shared.transport import MqttTransport, TransportError
from tests.broker import Inbox
from tests.reliability.test_faults import (
    NodeProcs,
    check_global_is_the_aggregate,
    check_nothing_lost,
    coordinator_for,
    sent_payloads,
    spy_accepted,
)
from tests.reliability.test_security import _connect_raw, _only_allowed_arrive, _sentinel_wait

pytestmark = [pytest.mark.nats, pytest.mark.slow]
ROOT = "fedspine/v1"
NODES = ("node-a", "node-b", "node-c", "node-d")
REGIONS = ("east", "west")  # regional aggregators' users (user name == region id)
USERS = {"coordinator": "coord-secret", "monitor": "monitor-secret", **{n: f"{n}-secret" for n in NODES + REGIONS}}
REPO = Path(__file__).resolve().parents[2]
FAILOVER_LOG = REPO / "results" / "nats-failover.json"


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalNatsCluster]:
    try:
        require_nats_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    c = LocalNatsCluster(USERS, members=3, region_users=REGIONS)
    failed_before = request.session.testsfailed
    try:
        c.start()
    except RuntimeError as exc:
        c.close()
        pytest.fail(f"could not start the NATS cluster: {exc}", pytrace=False)
    yield c
    if request.session.testsfailed > failed_before:
        print(f"\n--- NATS logs ---\n{c.log()[-20000:]}")
    c.close()


class Clients:
    """Started MqttTransports on given members of the cluster, stopped at the end."""

    def __init__(self, cluster: LocalNatsCluster) -> None:
        self.cluster, self.made = cluster, []

    def __call__(self, user: str | None, member: int = 0, subscriptions: dict[str, Callable] | None = None,
                 **kw: Any) -> MqttTransport:
        t = MqttTransport(self.cluster.broker_config(user, first=member), f"t-{user}-{uuid.uuid4().hex[:8]}", **kw)
        for f, h in (subscriptions or {}).items():
            t.subscribe(f, h)
        self.made.append(t)
        t.start(timeout_s=30)
        return t

    def close(self) -> None:
        for t in self.made:
            t.stop(flush_s=1.0)


@pytest.fixture
def clients(cluster: LocalNatsCluster) -> Iterator[Clients]:
    c = Clients(cluster)
    yield c
    c.close()


# ---- authentication -----------------------------------------------------------------------------------------
def _nats_protocol_login(port: int, user: str, password: str) -> str:
    """A NATS-protocol (not MQTT) login with fleet credentials on a member's client port: the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        s.recv(4096)  # INFO
        s.sendall(f'CONNECT {{"user":"{user}","pass":"{password}","verbose":false}}\r\nPING\r\n'.encode())
        return s.recv(4096).decode(errors="replace").strip()


def test_nats_refuses_anonymous_wrong_unknown_and_non_mqtt_logins(cluster: LocalNatsCluster, reliability) -> None:
    port = cluster.mqtt_ports[1]
    cases = {
        "anonymous": dict(user=None, password=None),
        "wrong password": dict(user="node-a", password="node-b-secret"),
        "empty password": dict(user="coordinator", password=""),
        "unknown user": dict(user="node-z", password="node-z-secret"),
        "another user's password": dict(user="coordinator", password="node-a-secret"),
    }
    for name, kw in cases.items():
        outcome = _connect_raw(cluster.host, port, **kw)
        assert outcome.startswith("refused") or outcome.startswith("failed"), (name, outcome)
        assert outcome != "accepted", name
    assert _connect_raw(cluster.host, port, user="node-a", password="node-a-secret") == "accepted"  # control
    # fleet users may log in over MQTT only: over the NATS protocol they could read $MQTT.sub.> deliveries
    answer = _nats_protocol_login(cluster.client_ports[1], "coordinator", USERS["coordinator"])
    assert "Authorization Violation" in answer and "PONG" not in answer, answer
    t = MqttTransport(BrokerConfig(url=tuple(cluster.urls), username="node-a", password="nope"), "nats-sec-transport")
    with pytest.raises(TransportError, match="refused"):
        t.start(timeout_s=10)
    reliability.add("security (NATS)", "connect to a cluster member: anonymous, wrong/empty/other's password, "
                    "unknown user; fleet credentials over the NATS protocol", len(cases) + 1,
                    "all refused; valid MQTT credentials accepted; the transport raises instead of retrying")


# ---- authorisation: the mosquitto ACL matrix, on subjects ------------------------------------------------------
def test_nats_node_cannot_publish_into_another_nodes_tree_or_as_coordinator(clients: Clients, reliability) -> None:
    observer = Inbox()
    clients("coordinator", 0, {f"{ROOT}/#": observer})
    node_a = clients("node-a", 1)  # another member than the observer's: permissions hold across routes
    time.sleep(0.3)
    forbidden = [f"{ROOT}/node/node-b/{k}" for k in (*NODE_WRITES, *NODE_READS)]
    forbidden += [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]
    forbidden += [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/other", "elsewhere/x"]
    cmd = encode(Command(command="stop", run_id="r1"))
    for topic in forbidden:
        node_a.publish(topic, cmd)
    sentinel = (f"{ROOT}/node/node-a/telemetry", b"sentinel")
    node_a.publish(*sentinel)
    assert node_a.wait_published(10)
    got = _sentinel_wait(observer, *sentinel, timeout_s=10)
    time.sleep(0.5)
    assert [t for t, _ in observer.items if t != sentinel[0]] == [], observer.items
    assert got.count(sentinel) == 1
    reliability.add("security (NATS)", "node-a publishes to node-b's upload/status/report/…, to its own inbox, "
                    "to broadcast/command and coordinator/status", len(forbidden),
                    "none delivered (observer on another member subscribed to the whole tree); own topic delivered")


def test_nats_node_cannot_read_another_nodes_configuration_or_uploads(clients: Clients, reliability) -> None:
    snoop = Inbox()
    filters = [f"{ROOT}/node/node-b/{k}" for k in (*NODE_READS, *NODE_WRITES)]
    filters += [f"{ROOT}/node/+/upload", f"{ROOT}/node/+/config", f"{ROOT}/#", "#", "$MQTT/sub/#"]
    # NATS refuses a whole subscription it does not allow (mosquitto filters message by message), so the
    # positive control needs node-a's own config subscribed by name.
    filters.append(f"{ROOT}/node/node-a/config")
    clients("node-a", 2, {f: snoop for f in filters})
    node_b = clients("node-b", 1)
    coord = clients("coordinator", 0)
    time.sleep(0.5)
    cfg = encode(RoundConfig(run_id="r1", round=1, target_sparsity=0.1, rank=4, local_steps=2, deadline_ts=1e9,
                             upload_transfer_id="t.up", download_transfer_id=None))
    for k in NODE_READS:
        coord.publish(f"{ROOT}/node/node-b/{k}", cfg)
    for k in NODE_WRITES:
        node_b.publish(f"{ROOT}/node/node-b/{k}", b"b-private")
    for t in (coord, node_b):
        assert t.wait_published(10)
    sentinel = (f"{ROOT}/node/node-a/config", b"sentinel-for-a")
    coord.publish(*sentinel)
    got = _sentinel_wait(snoop, *sentinel, timeout_s=10)
    time.sleep(0.5)
    assert [t for t, _ in snoop.items if "/node-b/" in t] == [], snoop.items
    assert all(t.startswith(f"{ROOT}/node/node-a/") for t, _ in got)
    reliability.add("security (NATS)", "node-a subscribes to node-b's config/download/resend/status/upload, "
                    "node/+/upload, node/+/config, the whole tree, '#' and $MQTT/sub/#",
                    len(NODE_READS) + len(NODE_WRITES), "none of node-b's messages delivered; its own config delivered")


def test_nats_monitor_is_read_only_and_cannot_read_downloads(clients: Clients, reliability) -> None:
    observer, seen = Inbox(), Inbox()
    clients("coordinator", 0, {f"{ROOT}/#": observer})
    monitor = clients("monitor", 1, {f: seen for f in (
        f"{ROOT}/node/+/download", f"{ROOT}/node/+/config", f"{ROOT}/node/+/upload", f"{ROOT}/node/+/resend",
        f"{ROOT}/#", f"{ROOT}/node/+/status")})
    node = clients("node-a", 2)
    coord = clients("coordinator", 2)
    time.sleep(0.5)
    topics = [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/node/node-a/config",
              f"{ROOT}/node/node-a/status", f"{ROOT}/node/node-a/upload", f"{ROOT}/node/node-a/download"]
    for t in topics:
        monitor.publish(t, b"x")
    for k in ("download", "config", "resend"):
        coord.publish(f"{ROOT}/node/node-a/{k}", b"secret-" + k.encode())
    node.publish(f"{ROOT}/node/node-a/upload", b"secret-upload")
    sentinel = (f"{ROOT}/node/node-a/status", b"sentinel-status")  # what a monitor may read
    node.publish(*sentinel)
    assert monitor.wait_published(10) and coord.wait_published(10) and node.wait_published(10)
    _sentinel_wait(seen, *sentinel, timeout_s=10)
    _sentinel_wait(observer, *sentinel, timeout_s=10)
    time.sleep(0.5)
    assert [p for _, p in observer.items if p == b"x"] == []  # the monitor published nothing
    assert [(t, p) for t, p in seen.items if p != sentinel[1]] == [], seen.items  # read nothing else
    reliability.add("security (NATS)", "monitor publishes commands, configs, status, uploads, downloads; "
                    "subscribes to downloads, configs, uploads, resends and the whole tree",
                    len(topics) + 4, "nothing published, no download/config/upload read; node status read")


def test_nats_region_user_writes_only_its_upward_topics_and_its_subtree(clients: Clients, reliability) -> None:
    observer = Inbox()
    clients("coordinator", 0, {f"{ROOT}/#": observer})
    east = clients("east", 1)
    time.sleep(0.3)
    r = f"{ROOT}/region"
    allowed = [f"{r}/east/{k}" for k in REGION_WRITES]
    allowed += [f"{r}/east/node/node-a/{k}" for k in NODE_READS]
    allowed += [f"{r}/east/broadcast/command", f"{r}/east/coordinator/status"]
    forbidden = [f"{r}/east/{k}" for k in REGION_READS]
    forbidden += [f"{r}/west/{k}" for k in (*REGION_WRITES, *REGION_READS)]
    forbidden += [f"{r}/west/node/node-b/{k}" for k in (*NODE_READS, *NODE_WRITES)]
    forbidden += [f"{r}/west/broadcast/command", f"{r}/west/coordinator/status"]
    forbidden += [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]
    forbidden += [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/other", "elsewhere/x"]
    forbidden += [f"{ROOT}/node/east/status", f"{r}/west/node/east/upload"]
    _only_allowed_arrive(east, observer, forbidden, allowed, timeout_s=10, settle_s=0.5,
                         only_sent=False)
    reliability.add("security (NATS)", "region east publishes as the root to itself, as/to region west, to west's "
                    "nodes and broadcast, to the root's nodes, broadcast and presence, and as a node",
                    len(forbidden), f"none delivered; its {len(allowed)} upward and sub-fleet topics delivered")


def test_nats_region_user_reads_only_its_inbox_and_its_subtree(clients: Clients, reliability) -> None:
    snoop = Inbox()
    r = f"{ROOT}/region"
    mine = [f"{r}/east/{k}" for k in REGION_READS] + [f"{r}/east/node/+/{k}" for k in NODE_WRITES]
    # NATS refuses a whole subscription it does not allow: the forbidden filters must deliver nothing, the
    # region's own (by name) everything
    filters = [f"{r}/west/#", f"{r}/+/config", f"{r}/+/upload", f"{r}/+/node/+/upload", f"{ROOT}/node/#",
               f"{ROOT}/#", "#", "$MQTT/sub/#", *mine]
    clients("east", 2, {f: snoop for f in filters})
    coord = clients("coordinator", 0)
    node_b = clients("node-b", 1)
    node_a = clients("node-a", 1)
    time.sleep(0.5)
    theirs = [f"{r}/west/{k}" for k in REGION_READS] + [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]
    for t in theirs + [f"{r}/east/{k}" for k in REGION_READS]:
        coord.publish(t, b"cfg")
    for k in NODE_WRITES:
        node_b.publish(f"{r}/west/node/node-b/{k}", b"b-private")
        node_a.publish(f"{r}/east/node/node-a/{k}", b"a-to-east")
    theirs += [f"{r}/west/node/node-b/{k}" for k in NODE_WRITES]
    for t in (coord, node_b, node_a):
        assert t.wait_published(10)
    _sentinel_wait(snoop, f"{r}/east/node/node-a/{NODE_WRITES[-1]}", b"a-to-east", timeout_s=10)
    time.sleep(0.5)
    got = {t for t, _ in snoop.items}
    want = {f"{r}/east/{k}" for k in REGION_READS} | {f"{r}/east/node/node-a/{k}" for k in NODE_WRITES}
    assert got & set(theirs) == set(), sorted(got & set(theirs))
    assert got == want, sorted(want - got)
    reliability.add("security (NATS)", "region east subscribes to region west's tree, every region's config and "
                    "uploads, the root's nodes, the whole tree, '#' and $MQTT/sub/#", len(theirs),
                    "none of west's or the root's nodes' messages delivered; its own inbox and nodes delivered")


def test_nats_node_under_a_region_is_pinned_to_its_own_subtree(clients: Clients, reliability) -> None:
    observer = Inbox()
    clients("coordinator", 0, {f"{ROOT}/#": observer})
    node_a = clients("node-a", 2)
    time.sleep(0.3)
    r = f"{ROOT}/region/east"
    allowed = [f"{r}/node/node-a/{k}" for k in NODE_WRITES]
    forbidden = [f"{r}/node/node-b/{k}" for k in (*NODE_WRITES, *NODE_READS)]
    forbidden += [f"{r}/node/node-a/{k}" for k in NODE_READS]
    forbidden += [f"{r}/{k}" for k in (*REGION_WRITES, *REGION_READS)]
    forbidden += [f"{r}/broadcast/command", f"{r}/coordinator/status"]
    _only_allowed_arrive(node_a, observer, forbidden, allowed, timeout_s=10, settle_s=0.5,
                         only_sent=False)
    reliability.add("security (NATS)", "node-a under region east publishes as node-b, to its own inbox, as its "
                    "region (upward and downward) and to its region's broadcast and presence", len(forbidden),
                    f"none delivered; its {len(allowed)} own topics delivered")


def test_nats_monitor_follows_nodes_under_regions_and_reads_nothing_else(clients: Clients, reliability) -> None:
    snoop = Inbox()
    r = f"{ROOT}/region"
    # fedspine monitor's filters for nodes under regions, plus wider ones NATS must refuse whole
    filters = [f"{r}/+/node/+/status", f"{r}/+/node/+/telemetry/#", f"{r}/+/node/+/report", f"{r}/#",
               f"{r}/+/node/+/upload", f"{r}/+/config", "#"]
    clients("monitor", 2, {f: snoop for f in filters})
    east = clients("east", 0)
    node_a = clients("node-a", 1)
    time.sleep(0.5)
    for k in REGION_WRITES:
        east.publish(f"{r}/east/{k}", b"east-up")
    for k in NODE_READS:
        east.publish(f"{r}/east/node/node-a/{k}", b"east-down")
    for k in NODE_WRITES:
        node_a.publish(f"{r}/east/node/node-a/{k}", b"a-to-east")
    for t in (east, node_a):
        assert t.wait_published(10)
    mine = {f"{r}/east/node/node-a/{k}" for k in ("status", "telemetry", "telemetry/round", "report")}
    theirs = [f"{r}/east/{k}" for k in REGION_WRITES] + [f"{r}/east/node/node-a/{k}" for k in NODE_READS]
    theirs += [f"{r}/east/node/node-a/{k}" for k in ("upload", "missing")]
    _sentinel_wait(snoop, f"{r}/east/node/node-a/report", b"a-to-east", timeout_s=10)
    time.sleep(0.5)
    got = {t for t, _ in snoop.items}
    assert got & set(theirs) == set(), sorted(got & set(theirs))
    assert got == mine, sorted(mine - got)
    reliability.add("security (NATS)", "monitor subscribes to every region's tree, '#', node uploads and region "
                    "configs under regions", len(theirs),
                    "none delivered; the presence, telemetry and reports of nodes under regions delivered")


# ---- failover ---------------------------------------------------------------------------------------------
class Spread:
    """The cluster as NodeProcs and coordinator_for see a broker, each user starting on its own member."""

    def __init__(self, cluster: LocalNatsCluster, home: dict[str, int]) -> None:
        self.cluster, self.home = cluster, home
        self.users, self.root = cluster.users, cluster.root

    def broker_config(self, user: str, **kw: Any):  # type: ignore[no-untyped-def]
        return self.cluster.broker_config(user, first=self.home.get(user, 0), **kw)


def _reconnects(log: Path) -> list[tuple[str, str, float]]:
    """(from, to, seconds) of every failover a node process logged (broker_connected with reconnect_s)."""
    events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [("", e["url"], e["reconnect_s"]) for e in events
            if e.get("event") == "broker_connected" and "reconnect_s" in e]


def _record(test: str, killed: int, failovers: dict[str, list], aggregated: list, cluster) -> None:
    """Append what a run measured to results/nats-failover.json (figures, not assertions)."""
    FAILOVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(FAILOVER_LOG.read_text()) if FAILOVER_LOG.exists() else []
    rows.append({"test": test, "killed_member": killed, "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "failovers": {who: [{"to_member": cluster.member_of(dst), "seconds": s} for _, dst, s in moves]
                               for who, moves in failovers.items()},
                 "aggregated": [{"round": r, "nodes": ids} for r, ids in aggregated]})
    FAILOVER_LOG.write_text(json.dumps(rows, indent=1) + "\n")


def test_nats_node_member_killed_while_it_uploads(cluster: LocalNatsCluster, tmp_path, reliability) -> None:
    """node-b uploads through member 2 when member 2 is SIGKILLed: node-b moves to another member, resumes,
    its update is accepted; the run completes with every accepted update aggregated once."""
    rounds, victim = 2, 2
    spread = Spread(cluster, {"coordinator": 0, "node-a": 1, "node-b": victim})
    nodes = NodeProcs(spread, tmp_path)
    watch = Clients(cluster)
    statuses, uploads = Inbox(), Inbox()
    killed_at = stopping_at = 0
    try:
        watch("coordinator", 1, {f"{ROOT}/node/node-b/upload": uploads, f"{ROOT}/node/node-b/status": statuses})
        coord = coordinator_for(spread, tmp_path, rounds=rounds, deadline_s=45.0)
        accepted, aggregated = spy_accepted(coord)
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("s", coord.run()), daemon=True)
        t.start()
        nodes.start("node-a", "--send-delay", "0.05", "--kb", "512")  # same width: one global model
        nodes.start("node-b", "--send-delay", "0.2", "--kb", "512")  # ~32 chunks, ~6 s of upload
        assert uploads.wait_for(3, 180), ("node-b never started uploading",
                                          (tmp_path / "logs" / "node-b.log").read_text()[-3000:])
        cluster.kill(victim)
        killed_at = len(statuses.items)
        t.join(240)
        assert not t.is_alive(), "the run did not finish"
        summary = out["s"]
    finally:
        coord.stop()
        stopping_at = len(statuses.items)
        nodes.stop()
        time.sleep(1.0)  # the nodes' goodbyes ('offline', retained) reach the watcher
        after_kill = [decode(p, NodeStatus).state for _, p in statuses.items[killed_at:stopping_at] if p]
        goodbye = [decode(p, NodeStatus).state for _, p in statuses.items[stopping_at:] if p]
        watch.close()
        cluster.start_member(victim)
    moves = {n: _reconnects(tmp_path / "logs" / f"{n}.log") for n in ("node-a", "node-b")}
    moves["coordinator"] = list(coord.transport.failovers)
    _record("node member killed mid-upload", victim, moves, aggregated, cluster)
    assert moves["node-b"] and all(dst != cluster.url(victim) for _, dst, _ in moves["node-b"]), moves
    assert summary.rounds_done == rounds and not summary.stopped_early, summary
    assert any("node-b" in ids for _, ids in aggregated), aggregated  # it kept working after the move
    assert len(nodes.sent("node-b")) >= 1 and nodes.procs["node-b"].returncode is not None  # one process throughout
    # Presence: whatever flickered while the cluster re-elected leaders, node-b's last word while it worked is
    # 'online', and once stopped only 'offline' (its goodbye; a will the killed member still owed it may come too).
    assert after_kill and after_kill[-1] == "online", after_kill
    assert goodbye and set(goodbye) == {"offline"}, goodbye
    check_nothing_lost(accepted, aggregated, nodes, rounds)
    replayed = check_global_is_the_aggregate(tmp_path / "coord", sent_payloads(tmp_path, ("node-a", "node-b")))
    reliability.add("faults (NATS)", "3-member NATS cluster: node-b's member SIGKILLed in the middle of its upload",
                    1, f"node-b back on another member in {moves['node-b'][0][2]:.1f} s, presence 'online' again; "
                    f"rounds 1-{rounds} aggregated once each ({[ids for _, ids in aggregated]}); global model = "
                    f"replayed aggregate of exactly the {replayed} accepted updates")


def test_nats_coordinator_member_killed_during_a_round(cluster: LocalNatsCluster, tmp_path, reliability) -> None:
    """Member 0 (the coordinator's) is SIGKILLed while the nodes upload round 1: the coordinator moves to another
    member, gets the rest of the uploads (session or resend), and the run completes with nothing lost."""
    rounds, victim = 2, 0
    spread = Spread(cluster, {"coordinator": victim, "node-c": 1, "node-d": 2})
    nodes = NodeProcs(spread, tmp_path)
    watch = Clients(cluster)
    uploads = Inbox()
    try:
        watch("coordinator", 1, {f"{ROOT}/node/+/upload": uploads})
        coord = coordinator_for(spread, tmp_path, rounds=rounds, deadline_s=45.0)
        accepted, aggregated = spy_accepted(coord)
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("s", coord.run()), daemon=True)
        t.start()
        for nid in ("node-c", "node-d"):
            nodes.start(nid, "--send-delay", "0.1", "--kb", "512")  # ~3 s uploads
        assert uploads.wait_for(4, 180), ("round 1 uploads never started",
                                          (tmp_path / "logs" / "node-c.log").read_text()[-3000:])
        cluster.kill(victim)
        t.join(240)
        assert not t.is_alive(), "the run did not finish"
        summary = out["s"]
        failovers = list(coord.transport.failovers)
    finally:
        coord.stop()
        nodes.stop()
        watch.close()
        cluster.start_member(victim)
    moves = {"coordinator": failovers, **{n: _reconnects(tmp_path / "logs" / f"{n}.log") for n in ("node-c", "node-d")}}
    _record("coordinator member killed mid-round", victim, moves, aggregated, cluster)
    assert failovers and all(dst != cluster.url(victim) for _, dst, _ in failovers), failovers
    assert summary.rounds_done == rounds and not summary.stopped_early, summary
    assert all(ids for _, ids in aggregated) and {n for _, ids in aggregated for n in ids} == {"node-c", "node-d"}
    check_nothing_lost(accepted, aggregated, nodes, rounds)
    replayed = check_global_is_the_aggregate(tmp_path / "coord", sent_payloads(tmp_path, ("node-c", "node-d")))
    assert all(p.returncode is not None and p.returncode != -signal.SIGKILL for p in nodes.procs.values())
    reliability.add("faults (NATS)", "3-member NATS cluster: the coordinator's member SIGKILLed while round 1's "
                    "uploads arrive", 1, f"coordinator back on another member in {failovers[0][2]:.1f} s; "
                    f"rounds 1-{rounds} aggregated once each ({[ids for _, ids in aggregated]}); global model = "
                    f"replayed aggregate of exactly the {replayed} accepted updates")
