"""Security against the production broker config (auth, per-node ACL, TLS, size limits) on a real mosquitto.

Every "denied" is proven by delivery, not by a return code: a coordinator-privileged observer subscribed to the
whole tree (or the would-be reader itself) must never receive the message, while a sentinel published after it
by the same client does arrive (mosquitto keeps one publisher's QoS 1 order), so absence is not a timing accident.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from broker_config.local import LocalMosquitto
from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from shared.chunking import split
from shared.config import BrokerConfig
from shared.messages import (
    MAX_MESSAGE_BYTES,
    Chunk,
    Command,
    ProtocolError,
    RoundConfig,
    decode,
    encode,
)
from shared.topics import NODE_READS, NODE_WRITES, REGION_READS, REGION_WRITES
from shared.transport import CHUNK_OVERHEAD, MemoryBus, MemoryTransport, MqttTransport, TransportError
from tests.broker import Inbox, TransportFactory, running_broker

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
ROOT = "fedspine/v1"


def _sentinel_wait(inbox: Inbox, topic: str, payload: bytes, timeout_s: float = 5.0) -> list[tuple[str, bytes]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (topic, payload) in inbox.items:
            return list(inbox.items)
        time.sleep(0.02)
    raise AssertionError(f"sentinel {topic} never arrived: {inbox.items[:5]}")


def _connect_raw(host: str, port: int, *, user: str | None, password: str | None, tls_ca: str | None = None,
                 tls_system: bool = False, timeout_s: float = 3.0) -> str:
    """One connection attempt with a bare paho client; returns 'accepted', 'refused: <reason>' or 'failed: <why>'."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sec-{time.monotonic_ns()}", protocol=mqtt.MQTTv311)
    if user is not None:
        c.username_pw_set(user, password)
    if tls_ca is not None:
        c.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
    elif tls_system:
        c.tls_set(cert_reqs=ssl.CERT_REQUIRED)  # the system trust store, which does not know the lab CA
    result: dict[str, str] = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        result["r"] = f"refused: {reason_code}" if reason_code.is_failure else "accepted"
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(host, port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return f"failed: {type(exc).__name__}"
    end = time.monotonic() + timeout_s
    while not done.is_set() and time.monotonic() < end:
        try:
            rc = c.loop(timeout=0.1)
        except (OSError, ssl.SSLError) as exc:
            return result.get("r", f"failed: {type(exc).__name__}")
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return result.get("r", f"failed: {mqtt.error_string(rc)}")
    c.disconnect()
    return result.get("r", "failed: no CONNACK")


# ---- authentication ---------------------------------------------------------------------------------------
def test_authentication_refuses_anonymous_wrong_and_unknown_on_both_listeners(mosquitto_broker: LocalMosquitto,
                                                                               reliability) -> None:
    b = mosquitto_broker
    ca = str(b.cafile)
    cases = {
        "anonymous (plain)": dict(port=b.port, user=None, password=None),
        "anonymous (TLS)": dict(port=b.tls_port, user=None, password=None, tls_ca=ca),
        "wrong password (plain)": dict(port=b.port, user="node-a", password="node-b-secret"),
        "wrong password (TLS)": dict(port=b.tls_port, user="node-a", password="wrong", tls_ca=ca),
        "empty password": dict(port=b.port, user="coordinator", password=""),
        "unknown user": dict(port=b.port, user="node-z", password="node-z-secret"),
        "another user's password": dict(port=b.port, user="coordinator", password="node-a-secret"),
    }
    for name, kw in cases.items():
        port = kw.pop("port")
        outcome = _connect_raw(b.host, port, **kw)
        assert outcome.startswith("refused") and "authori" in outcome.lower(), (name, outcome)
    # the control: right credentials are accepted on both listeners
    assert _connect_raw(b.host, b.port, user="node-a", password="node-a-secret") == "accepted"
    assert _connect_raw(b.host, b.tls_port, user="node-a", password="node-a-secret", tls_ca=ca) == "accepted"
    # and the transport used by services surfaces a refusal as TransportError (no silent retry loop)
    t = MqttTransport(BrokerConfig(url=b.url(), username="node-a", password="nope"), "sec-transport")
    with pytest.raises(TransportError, match="refused"):
        t.start(timeout_s=5)
    reliability.add("security", "connect: anonymous, wrong/empty/other's password, unknown user (plain + TLS)",
                    len(cases), "CONNACK 'Not authorized' every time; valid credentials accepted")


# ---- authorisation (ACL) ------------------------------------------------------------------------------------
def test_node_cannot_publish_into_another_nodes_tree_or_as_coordinator(mqtt_transport: TransportFactory,
                                                                      reliability) -> None:
    observer = Inbox()
    mqtt_transport("coordinator", subscriptions={f"{ROOT}/#": observer})
    node_a = mqtt_transport("node-a")
    time.sleep(0.2)
    forbidden = [f"{ROOT}/node/node-b/{k}" for k in (*NODE_WRITES, *NODE_READS)]  # b's uploads, status, inbox
    forbidden += [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]  # forging the coordinator's messages to itself
    forbidden += [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/other", "elsewhere/x"]
    cmd = encode(Command(command="stop", run_id="r1"))
    for topic in forbidden:
        node_a.publish(topic, cmd)
    sentinel = (f"{ROOT}/node/node-a/telemetry", b"sentinel")
    node_a.publish(*sentinel, qos=1)
    assert node_a.wait_published(5)
    got = _sentinel_wait(observer, *sentinel)
    time.sleep(0.3)
    assert [t for t, _ in observer.items if t != sentinel[0]] == [], observer.items
    assert got.count(sentinel) == 1
    reliability.add("security", "node-a publishes to node-b's upload/status/report/…, to its own inbox, "
                    "to broadcast/command and coordinator/status", len(forbidden),
                    "none delivered (observer subscribed to the whole tree); own topic delivered")


def test_node_cannot_read_another_nodes_configuration_or_uploads(mqtt_transport: TransportFactory,
                                                                 reliability) -> None:
    snoop = Inbox()
    filters = [f"{ROOT}/node/node-b/{k}" for k in (*NODE_READS, *NODE_WRITES)] + [f"{ROOT}/node/+/upload",
                                                                                  f"{ROOT}/#", "#"]
    mqtt_transport("node-a", subscriptions={f: snoop for f in filters})
    node_b = mqtt_transport("node-b")
    coord = mqtt_transport("coordinator")
    time.sleep(0.3)
    cfg = encode(RoundConfig(run_id="r1", round=1, target_sparsity=0.1, rank=4, local_steps=2, deadline_ts=1e9,
                             upload_transfer_id="t.up", download_transfer_id=None))
    for k in NODE_READS:
        coord.publish(f"{ROOT}/node/node-b/{k}", cfg)
    for k in NODE_WRITES:
        node_b.publish(f"{ROOT}/node/node-b/{k}", b"b-private")
    for t in (coord, node_b):
        assert t.wait_published(5)
    sentinel = (f"{ROOT}/node/node-a/config", b"sentinel-for-a")
    coord.publish(*sentinel)
    got = _sentinel_wait(snoop, *sentinel)
    time.sleep(0.3)
    leaked = [t for t, _ in snoop.items if "/node-b/" in t]
    assert leaked == [], leaked
    assert all(t.startswith(f"{ROOT}/node/node-a/") for t, _ in got)
    reliability.add("security", "node-a subscribes to node-b's config/download/resend/status/upload, "
                    "node/+/upload, the whole tree and '#'", len(NODE_READS) + len(NODE_WRITES),
                    "none of node-b's messages delivered to node-a; its own config delivered")


def test_monitor_is_read_only(mqtt_transport: TransportFactory, reliability) -> None:
    observer = Inbox()
    mqtt_transport("coordinator", subscriptions={f"{ROOT}/#": observer})
    monitor = mqtt_transport("monitor")
    time.sleep(0.2)
    topics = [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/node/node-a/config",
              f"{ROOT}/node/node-a/status", f"{ROOT}/node/node-a/upload"]
    for t in topics:
        monitor.publish(t, b"x")
    assert monitor.wait_published(5)
    time.sleep(0.5)
    assert observer.items == []
    reliability.add("security", "monitor (read-only user) publishes commands, configs, status, uploads",
                    len(topics), "none delivered")


# ---- TLS ----------------------------------------------------------------------------------------------------
def test_tls_listener_accepts_lab_ca_and_rejects_plaintext_and_untrusted(mosquitto_broker: LocalMosquitto,
                                                                          reliability) -> None:
    b = mosquitto_broker
    assert _connect_raw(b.host, b.tls_port, user="node-b", password="node-b-secret", tls_ca=str(b.cafile)) \
        == "accepted"
    plain = _connect_raw(b.host, b.tls_port, user="node-b", password="node-b-secret")
    assert plain.startswith("failed"), plain  # plaintext MQTT on 8883: the TLS handshake fails, no CONNACK
    untrusted = _connect_raw(b.host, b.tls_port, user="node-b", password="node-b-secret", tls_system=True)
    assert untrusted.startswith("failed"), untrusted  # a server certificate the client cannot verify
    # the plain listener does not speak TLS either (no accidental downgrade/upgrade)
    assert _connect_raw(b.host, b.port, user="node-b", password="node-b-secret", tls_ca=str(b.cafile)) \
        .startswith("failed")
    # raw bytes of a plaintext CONNECT on the TLS port are never answered with a CONNACK (0x20)
    with socket.create_connection((b.host, b.tls_port), timeout=2) as s:
        s.sendall(bytes([0x10, 0x0C, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
        s.settimeout(2)
        try:
            first = s.recv(1)
        except (TimeoutError, ConnectionResetError):
            first = b""
        assert first[:1] != b"\x20"
    reliability.add("security", "TLS listener: lab CA client, plaintext client, client without the lab CA, "
                    "TLS client on the plain port, raw plaintext CONNECT", 5,
                    "lab CA accepted; the 4 others fail before any CONNACK")


# ---- sizes --------------------------------------------------------------------------------------------------
def test_oversized_payloads_refused_by_broker_and_application(mqtt_transport: TransportFactory, tmp_path,
                                                              reliability) -> None:
    b = mqtt_transport.broker
    observer = Inbox()
    mqtt_transport("coordinator", subscriptions={f"{ROOT}/node/+/upload": observer,
                                                 f"{ROOT}/node/+/report": observer})
    # 1. the broker: a bare client (no size checks of ours) sending > max_packet_size is disconnected
    sizes = [1024 * 1024 + 1, 2 * 1024 * 1024, 8 * 1024 * 1024]
    for size in sizes:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"big-{size}", protocol=mqtt.MQTTv311)
        c.username_pw_set("node-a", b.users["node-a"])
        up, gone = threading.Event(), threading.Event()
        c.on_connect = lambda *a, e=up: e.set()
        c.on_disconnect = lambda *a, e=gone: e.set()
        c.connect(b.host, b.port)
        c.loop_start()
        assert up.wait(5)
        c.publish(f"{ROOT}/node/node-a/upload", bytes(size), qos=1)
        assert gone.wait(5), f"broker kept a client that sent {size} bytes"
        c.loop_stop()
    # 2. our transport refuses before sending
    node = mqtt_transport("node-a")
    with pytest.raises(TransportError):
        node.publish(f"{ROOT}/node/node-a/upload", bytes(node.chunk_size + CHUNK_OVERHEAD + 1))
    with pytest.raises(TransportError):
        node.publish(f"{ROOT}/node/node-a/report", bytes(MAX_MESSAGE_BYTES + 1))
    time.sleep(0.5)
    assert observer.items == []
    # 3. the codec refuses before parsing
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(bytes(MAX_MESSAGE_BYTES + 1), RoundConfig)
    # 4. the coordinator's upload handler: an oversize chunk, and a chunk announcing an oversize transfer
    cfg = CoordinatorConfig.from_dict({"broker": {"url": b.url()}, "coordinator": {"state_dir": str(tmp_path)}})
    coord = Coordinator(cfg, transport=MemoryTransport(MemoryBus(), "coordinator"))
    coord.reassembler.expect("t.up", "node-a")
    big = split(bytes(cfg.broker.chunk_size * 2), "t.up", "node-a", cfg.broker.chunk_size * 2)[0]
    huge = Chunk(transfer_id="t.up", sender="node-a", index=0, count=4096, total_size=coord.limits.max_bytes + 1,
                 digest="0" * 64, data=b"x")
    with capture_logs() as logs:
        coord._handle_upload(f"{ROOT}/node/node-a/upload", encode(big))
        coord._handle_upload(f"{ROOT}/node/node-a/upload", encode(huge))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["chunk_rejected", "chunk_rejected"], logs
    assert "exceeds" in warnings[0]["error"] and "exceeds" in warnings[1]["reason"]
    assert coord.events.empty() and coord.reassembler.missing("t.up") == [0]
    reliability.add("security", "oversize MQTT packets (1 MiB + 1, 2 MiB, 8 MiB) from a bare client", len(sizes),
                    "broker disconnects the client; nothing delivered")
    reliability.add("security", "oversize publish via our transport, oversize message to the codec, "
                    "oversize chunk and oversize announced transfer to the coordinator", 5,
                    "refused before sending / parsing; one warning line each; no state change")


# ---- regional aggregators (coordinator/region.py) -------------------------------------------------------------
REGION_USERS = {"coordinator": "coord-secret", "monitor": "monitor-secret", "east": "east-secret",
                "west": "west-secret", "node-a": "node-a-secret", "node-b": "node-b-secret"}


@pytest.fixture(scope="module")
def region_broker() -> Iterator[TransportFactory]:
    """A mosquitto whose ACL has the region users east and west (production acl.j2, region_users)."""
    with running_broker(tls=False, users=REGION_USERS, region_users=("east", "west")) as broker:
        factory = TransportFactory(broker)
        yield factory
        factory.close()


def _only_allowed_arrive(sender, observer: Inbox, forbidden: list[str], allowed: list[str],
                         timeout_s: float = 5.0, settle_s: float = 0.3, only_sent: bool = True) -> None:
    """``sender`` publishes a command to every topic, the allowed last (the final one is the sentinel): exactly the
    allowed topics reach ``observer`` (of the topics sent, or of all it received with ``only_sent`` False)."""
    cmd = encode(Command(command="stop", run_id="r1"))
    for topic in forbidden + allowed:
        sender.publish(topic, cmd, qos=1)
    assert sender.wait_published(timeout_s)
    _sentinel_wait(observer, allowed[-1], cmd, timeout_s=timeout_s)
    time.sleep(settle_s)
    got = {t for t, _ in observer.items if not only_sent or t in forbidden + allowed}
    assert got == set(allowed), (sorted(got - set(allowed)), sorted(set(allowed) - got))


def test_region_user_writes_only_its_upward_topics_and_its_subtree(region_broker: TransportFactory,
                                                                   reliability) -> None:
    observer = Inbox()
    region_broker("coordinator", subscriptions={"#": observer})
    east = region_broker("east")
    time.sleep(0.2)
    r = f"{ROOT}/region"
    allowed = [f"{r}/east/{k}" for k in REGION_WRITES]  # upward: one participant of the root's rounds
    allowed += [f"{r}/east/node/node-a/{k}" for k in NODE_READS]  # downward: its sub-fleet's coordinator
    allowed += [f"{r}/east/broadcast/command", f"{r}/east/coordinator/status"]
    forbidden = [f"{r}/east/{k}" for k in REGION_READS]  # forging the root's messages to itself
    forbidden += [f"{r}/west/{k}" for k in (*REGION_WRITES, *REGION_READS)]  # speaking as (or to) another region
    forbidden += [f"{r}/west/node/node-b/{k}" for k in (*NODE_READS, *NODE_WRITES)]  # another region's nodes
    forbidden += [f"{r}/west/broadcast/command", f"{r}/west/coordinator/status"]
    forbidden += [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]  # the root's own nodes
    forbidden += [f"{ROOT}/broadcast/command", f"{ROOT}/coordinator/status", f"{ROOT}/other", "elsewhere/x"]
    forbidden += [f"{ROOT}/node/east/status", f"{r}/west/node/east/upload", f"{r}/east/node/east/upload"]  # a node
    _only_allowed_arrive(east, observer, forbidden, allowed)
    reliability.add("security", "region east publishes as the root to itself, as/to region west, to west's nodes "
                    "and broadcast, to the root's nodes, broadcast and presence, and as a node",
                    len(forbidden), f"none delivered; its {len(allowed)} upward and sub-fleet topics delivered")


def test_region_user_reads_only_its_inbox_and_its_subtree(region_broker: TransportFactory, reliability) -> None:
    snoop = Inbox()
    r = f"{ROOT}/region"
    mine = [f"{r}/east/{k}" for k in REGION_READS] + [f"{r}/east/node/node-a/{k}" for k in NODE_WRITES]
    filters = [f"{r}/west/#", f"{r}/+/config", f"{r}/+/upload", f"{r}/+/node/+/upload", f"{ROOT}/node/#",
               f"{ROOT}/#", "#", *mine]
    region_broker("east", subscriptions={f: snoop for f in filters})
    coord = region_broker("coordinator")
    node_b = region_broker("node-b")
    node_a = region_broker("node-a")
    time.sleep(0.3)
    cfg = encode(RoundConfig(run_id="r1", round=1, target_sparsity=0.1, rank=4, local_steps=2, deadline_ts=1e9,
                             upload_transfer_id="t.up", download_transfer_id=None))
    theirs = [f"{r}/west/{k}" for k in REGION_READS] + [f"{ROOT}/node/node-a/{k}" for k in NODE_READS]
    for t in theirs + [f"{r}/east/{k}" for k in REGION_READS]:
        coord.publish(t, cfg, qos=1)
    for k in NODE_WRITES:
        node_b.publish(f"{r}/west/node/node-b/{k}", b"b-private", qos=1)
        node_a.publish(f"{r}/east/node/node-a/{k}", b"a-to-east", qos=1)
    theirs += [f"{r}/west/node/node-b/{k}" for k in NODE_WRITES]
    for t in (coord, node_b, node_a):
        assert t.wait_published(5)
    sentinel = (f"{r}/east/node/node-a/{NODE_WRITES[-1]}", b"a-to-east")
    _sentinel_wait(snoop, *sentinel)
    time.sleep(0.3)
    got = {t for t, _ in snoop.items}
    assert got & set(theirs) == set(), sorted(got & set(theirs))
    assert got == set(mine), sorted(set(mine) - got)  # the positive control: its inbox and its nodes' uploads
    reliability.add("security", "region east subscribes to region west's tree, every region's config and "
                    "uploads, the root's nodes, the whole tree and '#'", len(theirs),
                    "none of west's or the root's nodes' messages delivered; its own inbox and nodes delivered")


def test_node_under_a_region_is_pinned_to_its_own_subtree(region_broker: TransportFactory, reliability) -> None:
    observer = Inbox()
    region_broker("coordinator", subscriptions={"#": observer})
    node_a = region_broker("node-a")
    time.sleep(0.2)
    r = f"{ROOT}/region/east"
    allowed = [f"{r}/node/node-a/{k}" for k in NODE_WRITES]
    forbidden = [f"{r}/node/node-b/{k}" for k in (*NODE_WRITES, *NODE_READS)]  # another node of its region
    forbidden += [f"{r}/node/node-a/{k}" for k in NODE_READS]  # forging its region's messages to itself
    forbidden += [f"{r}/{k}" for k in (*REGION_WRITES, *REGION_READS)]  # speaking as its region or the root
    forbidden += [f"{r}/broadcast/command", f"{r}/coordinator/status"]
    _only_allowed_arrive(node_a, observer, forbidden, allowed)
    reliability.add("security", "node-a under region east publishes as node-b, to its own inbox, as its region "
                    "(upward and downward) and to its region's broadcast and presence", len(forbidden),
                    f"none delivered; its {len(allowed)} own topics delivered")


def test_monitor_follows_nodes_under_regions_and_reads_nothing_else(region_broker: TransportFactory,
                                                                     reliability) -> None:
    """What `fedspine monitor` subscribes to: the presence, telemetry and reports of nodes under any region; never
    their configurations, slices or uploads, nor a region's transfers to and from the root."""
    snoop = Inbox()
    r = f"{ROOT}/region"
    filters = [f"{r}/+/node/+/status", f"{r}/+/node/+/telemetry/#", f"{r}/+/node/+/report", f"{r}/#", "#"]
    region_broker("monitor", subscriptions={f: snoop for f in filters})
    east, node_a = region_broker("east"), region_broker("node-a")
    time.sleep(0.3)
    for k in REGION_WRITES:
        east.publish(f"{r}/east/{k}", b"east-up", qos=1)
    for k in NODE_READS:
        east.publish(f"{r}/east/node/node-a/{k}", b"east-down", qos=1)
    for k in NODE_WRITES:
        node_a.publish(f"{r}/east/node/node-a/{k}", b"a-to-east", qos=1)
    for t in (east, node_a):
        assert t.wait_published(5)
    mine = [f"{r}/east/node/node-a/{k}" for k in ("status", "telemetry", "telemetry/round", "report")]
    theirs = [f"{r}/east/{k}" for k in REGION_WRITES] + [f"{r}/east/node/node-a/{k}" for k in NODE_READS]
    theirs += [f"{r}/east/node/node-a/{k}" for k in NODE_WRITES if f"{r}/east/node/node-a/{k}" not in mine]
    _sentinel_wait(snoop, mine[-1], b"a-to-east")
    time.sleep(0.3)
    got = {t for t, _ in snoop.items}
    assert got & set(theirs) == set(), sorted(got & set(theirs))
    assert got == set(mine), sorted(set(mine) - got)  # the positive control: what the monitor shows
    reliability.add("security", "monitor subscribes to every region's tree and '#': region transfers, node "
                    "configurations, slices and uploads under a region", len(theirs),
                    "none delivered; the presence, telemetry and reports of nodes under regions delivered")
