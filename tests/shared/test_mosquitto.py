"""Through a real mosquitto with the project's config: messages, a 50 MB lossy transfer with resume,
rejections, the ACL, TLS, credential reload and re-subscription after a broker restart."""

from __future__ import annotations

import json
import queue
import random
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from shared.chunking import Reassembler, split
from shared.logs import get_logger
from shared.messages import Chunk, Message, NodeStatus, ProtocolError, ResendRequest, decode, encode
from shared.transport import CHUNK_OVERHEAD, TransportError
from tests.broker import Inbox, LocalMosquitto, TransportFactory, running_broker
from tests.shared.test_messages import SAMPLES

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def _raw(broker: LocalMosquitto, user: str, client_id: str) -> mqtt.Client:
    """A bare paho client (to publish what MqttTransport would refuse to)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, broker.users[user])
    up = threading.Event()
    c.on_connect = lambda *a: up.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert up.wait(5)
    return c


class UploadReceiver:
    """What the coordinator does with uploads: parse the topic, decode, feed, log rejections, queue results."""

    def __init__(self, broker: LocalMosquitto, chunk_size: int = 256 * 1024) -> None:
        self.topics = broker.broker_config("coordinator").topics
        self.reasm = Reassembler(max_bytes=128 * 1024 * 1024, timeout_s=120)
        self.done: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.max_bytes = chunk_size + CHUNK_OVERHEAD
        self.log = get_logger("test-receiver")

    def __call__(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.parse(topic).node_id or ""
        try:
            chunk = decode(payload, Chunk, max_bytes=self.max_bytes)
        except ProtocolError as exc:
            self.log.warning("message_rejected", topic=topic, size=len(payload), error=str(exc))
            return
        whole = self.reasm.feed(chunk, node_id)
        if whole is not None:
            self.done.put((chunk.transfer_id, whole))


def test_every_message_type_through_mosquitto(mqtt_transport: TransportFactory) -> None:
    inbox = Inbox()
    root = mqtt_transport.broker.root
    mqtt_transport("coordinator", subscriptions={f"{root}/test/#": inbox})
    pub = mqtt_transport("coordinator")
    for msg in SAMPLES:
        pub.publish(f"{root}/test/{type(msg).TYPE}", encode(msg))
    assert inbox.wait_for(len(SAMPLES), 10)
    by_type: dict[str, list[Message]] = {}
    for topic, payload in inbox.items:
        cls = next(type(m) for m in SAMPLES if topic.endswith("/" + type(m).TYPE))
        by_type.setdefault(cls.TYPE, []).append(decode(payload, cls))
    assert sorted(sum(by_type.values(), []), key=repr) == sorted(SAMPLES, key=repr)


def test_json_status_is_readable_with_mosquitto_sub(mqtt_transport: TransportFactory) -> None:
    b = mqtt_transport.broker
    node = mqtt_transport("node-a")
    status = NodeStatus(node_id="node-a", state="online", ts=time.time(), device_type="orin-nano")
    topic = node.topics.node("node-a", "status")
    node.publish(topic, encode(status), retain=True)
    assert node.wait_published(5)
    out = subprocess.run(["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-u", "monitor", "-P",
                          b.users["monitor"], "-t", topic, "-C", "1", "-W", "5"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    doc = json.loads(out)
    assert doc["type"] == "node_status" and doc["v"] == 1 and doc["node_id"] == "node-a"
    node.publish(topic, b"", retain=True)  # clear the retained message for other tests


def test_50mb_transfer_with_drops_duplicates_reordering_and_resume(mqtt_transport: TransportFactory) -> None:
    rng = random.Random(2438)
    recv = UploadReceiver(mqtt_transport.broker)
    coord = mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/+/upload": recv})
    node = mqtt_transport("node-a")
    upload, resend = node.topics.node("node-a", "upload"), node.topics.node("node-a", "resend")
    answered: list[int] = []

    def on_resend(topic: str, payload: bytes) -> None:  # answered on the network thread, like the agent
        answered.append(node.resend(upload, decode(payload, ResendRequest)))

    node.subscribe(resend, on_resend)
    time.sleep(0.2)
    payload = rng.randbytes(50 * 1024 * 1024 + 12345)
    tid = "run1.r3.a0.node-a.up"
    chunks = split(payload, tid, "node-a", node.chunk_size)
    node.outbox.add(chunks)
    dropped = {c.index for c in chunks if rng.random() < 0.08} | {0, len(chunks) - 1}
    wire = [c for c in chunks if c.index not in dropped]
    wire += [c for c in wire if rng.random() < 0.08]  # duplicates
    for i in range(0, len(wire), 16):  # reorder within windows of 16
        window = wire[i:i + 16]
        rng.shuffle(window)
        wire[i:i + 16] = window
    recv.reasm.expect(tid, "node-a")
    t0 = time.monotonic()
    assert node.publish_chunks(upload, wire) == len(wire)
    result = None
    while result is None and time.monotonic() - t0 < 90:
        try:
            result = recv.done.get(timeout=1.0)
        except queue.Empty:
            if tid in recv.reasm.stalled(0.5):
                coord.publish(resend, encode(ResendRequest(tid, "coordinator", recv.reasm.missing(tid))))
    assert result is not None, f"transfer incomplete, missing {recv.reasm.missing(tid)[:20]}"
    assert result[0] == tid and result[1] == payload
    assert answered and answered[0] == len(dropped)  # only the missing chunks were resent
    assert recv.reasm.duplicates >= len(wire) - (len(chunks) - len(dropped))
    assert recv.reasm.rejected == 0


def test_rejections_are_logged_and_receiver_keeps_working(mqtt_transport: TransportFactory) -> None:
    b = mqtt_transport.broker
    recv = UploadReceiver(b)
    mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/+/upload": recv})
    topic = "fedspine/v1/node/node-a/upload"
    good_payload = random.Random(1).randbytes(700_000)
    good = split(good_payload, "good", "node-a", 256 * 1024)
    corrupt_payload = random.Random(2).randbytes(600_000)
    corrupt = split(corrupt_payload, "corrupt", "node-a", 256 * 1024)
    corrupt[1] = Chunk(transfer_id="corrupt", sender="node-a", index=1, count=corrupt[1].count,
                       total_size=corrupt[1].total_size, digest=corrupt[1].digest, data=bytes(len(corrupt[1].data)))
    recv.reasm.expect("good", "node-a")
    recv.reasm.expect("corrupt", "node-a")
    wrong_version = msgpack_with(good[0], v=2)
    bad = [
        (b"\xc1\x00garbage", "malformed msgpack"),
        (wrong_version, "Chunk.v"),
        (bytes(256 * 1024 + CHUNK_OVERHEAD + 1), "exceeds the limit"),
        (encode(split(b"x" * 10, "nobody-expects-this", "node-a", 4096)[0]), "unknown transfer"),
        (encode(Chunk(transfer_id="good", sender="node-b", index=0, count=good[0].count,
                      total_size=good[0].total_size, digest=good[0].digest, data=good[0].data)), "sender mismatch"),
    ]
    raw = _raw(b, "node-a", "evil-node-a")
    try:
        with capture_logs() as logs:
            for payload, _ in bad:
                raw.publish(topic, payload, qos=1)
            for c in corrupt:  # a whole transfer whose digest does not match
                raw.publish(topic, encode(c), qos=1)
            for c in good:  # then a good transfer from the same client (ordered after the bad ones)
                raw.publish(topic, encode(c), qos=1)
            tid, data = recv.done.get(timeout=20)
    finally:
        raw.disconnect()
        raw.loop_stop()
    assert (tid, data) == ("good", good_payload)
    lines = [e for e in logs if e["event"] in ("message_rejected", "chunk_rejected")]
    texts = [e.get("error") or e.get("reason") for e in lines]
    expected = [frag for _, frag in bad] + ["digest mismatch"]
    assert len(lines) == len(expected), texts
    for frag, text in zip(expected, texts, strict=True):
        assert frag in text
    assert recv.reasm.missing("corrupt") == [0]  # reset, waiting for a resend


def msgpack_with(chunk: Chunk, **changes: object) -> bytes:
    import msgpack

    wire = chunk.to_wire()
    wire.update(changes)
    return msgpack.packb(wire, use_bin_type=True)


def test_acl_confines_nodes_and_monitor(mqtt_transport: TransportFactory) -> None:
    coord_in, node_in, monitor_in = Inbox(), Inbox(), Inbox()
    coord = mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/+/upload": coord_in,
                                                         "fedspine/v1/coordinator/status": coord_in})
    node = mqtt_transport("node-a", subscriptions={"fedspine/v1/node/node-a/config": node_in,
                                                   "fedspine/v1/node/node-b/config": node_in})
    monitor = mqtt_transport("monitor", subscriptions={"fedspine/v1/node/+/telemetry/#": monitor_in})
    time.sleep(0.2)
    node.publish("fedspine/v1/node/node-b/upload", b"forged")  # denied silently (MQTT 3.1.1)
    node.publish("fedspine/v1/node/node-a/upload", b"own")
    coord.publish("fedspine/v1/node/node-b/config", b"for b")
    coord.publish("fedspine/v1/node/node-a/config", b"for a")
    monitor.publish("fedspine/v1/coordinator/status", b"forged status")  # read-only user
    node.publish("fedspine/v1/node/node-a/telemetry", b"t1")
    for t in (node, coord, monitor):
        assert t.wait_published(5)
    assert coord_in.wait_for(1) and node_in.wait_for(1) and monitor_in.wait_for(1)
    time.sleep(0.5)
    assert coord_in.items == [("fedspine/v1/node/node-a/upload", b"own")]
    assert node_in.items == [("fedspine/v1/node/node-a/config", b"for a")]
    assert monitor_in.items == [("fedspine/v1/node/node-a/telemetry", b"t1")]


@pytest.mark.parametrize(("user", "password"), [(None, None), ("node-a", "wrong"), ("nobody", "x")],
                         ids=["anonymous", "wrong-password", "unknown-user"])
def test_broker_refuses_bad_credentials(mosquitto_broker: LocalMosquitto, user, password) -> None:
    from shared.config import BrokerConfig
    from shared.transport import MqttTransport

    cfg = BrokerConfig(url=mosquitto_broker.url(), username=user, password=password)
    t = MqttTransport(cfg, f"bad-{user}")
    with pytest.raises(TransportError, match="refused"):
        t.start(timeout_s=5)


def test_tls_listener_with_lab_ca(mqtt_transport: TransportFactory) -> None:
    inbox = Inbox()
    mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/+/report": inbox})
    node = mqtt_transport("node-a", tls=True)
    assert node.broker.tls and node.broker.endpoints == (("127.0.0.1", mqtt_transport.broker.tls_port),)
    time.sleep(0.1)
    node.publish("fedspine/v1/node/node-a/report", b"over tls")
    assert inbox.wait_for(1) and inbox.items[0][1] == b"over tls"


def test_added_user_can_connect_after_reload(mqtt_transport: TransportFactory) -> None:
    mqtt_transport.broker.add_user("node-c", "node-c-secret")
    t = mqtt_transport("node-c")
    assert t.connected.is_set()


def test_broker_enforces_max_packet_size_and_transport_refuses_first(mqtt_transport: TransportFactory) -> None:
    node = mqtt_transport("node-a")
    with pytest.raises(TransportError, match="send_transfer"):
        node.publish("fedspine/v1/node/node-a/upload", bytes(node.chunk_size + CHUNK_OVERHEAD + 1))
    inbox = Inbox()
    mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/+/report": inbox})
    raw = _raw(mqtt_transport.broker, "node-a", "raw-big")
    gone = threading.Event()
    raw.on_disconnect = lambda *a: gone.set()
    raw.publish("fedspine/v1/node/node-a/report", bytes(2 * 1024 * 1024), qos=1)  # > max_packet_size 1 MiB
    assert gone.wait(5), "mosquitto should drop a client sending an oversize packet"
    raw.loop_stop()
    assert not inbox.wait_for(1, 0.5)


def test_resubscribes_after_broker_restart() -> None:
    with running_broker(tls=False) as b:
        factory = TransportFactory(b)
        try:
            inbox = Inbox()
            sub = factory("coordinator", subscriptions={"fedspine/v1/node/+/status": inbox})
            early = factory("node-b")
            b.stop()
            deadline = time.monotonic() + 5
            while sub.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not sub.connected.is_set()
            early.publish("fedspine/v1/node/node-b/status", b"while away")  # paho keeps QoS 1 for later
            assert not early.wait_published(0.2)
            b.start()
            assert sub.connected.wait(15), "transport did not reconnect"
            pub = factory("node-a")
            pub.publish("fedspine/v1/node/node-a/status", b"after restart")
            assert inbox.wait_for(1, 5), "subscription was not renewed after reconnect"
            assert early.wait_published(15), "the QoS 1 publish queued while disconnected was never acknowledged"
        finally:
            factory.close()


def test_last_will_on_connection_loss(mqtt_transport: TransportFactory) -> None:
    import socket

    inbox = Inbox()
    mqtt_transport("coordinator", subscriptions={"fedspine/v1/node/node-b/status": inbox})
    status = "fedspine/v1/node/node-b/status"
    offline = encode(NodeStatus(node_id="node-b", state="offline", ts=time.time()))
    node = mqtt_transport("node-b", will=(status, offline))
    node.publish(status, encode(NodeStatus(node_id="node-b", state="online", ts=time.time())), retain=True)
    assert inbox.wait_for(1)
    node.client.socket().shutdown(socket.SHUT_RDWR)  # the link dies without a DISCONNECT packet
    assert inbox.wait_for(2), "mosquitto did not publish the last will"
    assert decode(inbox.items[1][1], NodeStatus).state == "offline"
    deadline = time.monotonic() + 10
    while node.connects < 2 and time.monotonic() < deadline:  # and the transport reconnects by itself
        time.sleep(0.05)
    assert node.connects == 2 and node.connected.is_set()
    node.publish(status, b"", retain=True)


def test_two_clients_with_one_client_id_are_reported_as_flapping(mqtt_transport: TransportFactory) -> None:
    """The same node started twice: mosquitto hands the session to whichever connected last, the other
    reconnects, and so on forever.  Each says so once, as an error that names the likely cause."""
    import structlog

    with structlog.testing.capture_logs() as lines:
        first = mqtt_transport("node-a", client_id="fedspine-node-node-a")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # a connection that lasts raises nothing
            time.sleep(0.1)
        assert not [e for e in lines if e["event"] in ("broker_disconnected", "connection_flapping")]
        mqtt_transport("node-a", client_id=first.client_id)  # the duplicate
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(e["event"] == "connection_flapping" for e in lines):
            time.sleep(0.1)
    flaps = [e for e in lines if e["event"] == "connection_flapping"]
    assert flaps, [e["event"] for e in lines]
    assert flaps[0]["client_id"] == "fedspine-node-node-a" and flaps[0]["drops"] == 3
    assert "same client id" in flaps[0]["hint"]
    drops = [e for e in lines if e["event"] == "broker_disconnected"]
    assert len([e for e in drops if e["connected_s"] < 5.0]) >= 3  # (the first had lasted its 5 s)
