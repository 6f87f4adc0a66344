"""The in-memory transport: routing, retained messages, wills, handler isolation, limits, chunked transfer + resume."""

from __future__ import annotations

import os
import queue

import pytest

from shared.chunking import Reassembler
from shared.messages import Chunk, ResendRequest, decode, encode
from shared.topics import Topics
from shared.transport import CHUNK_OVERHEAD, MemoryBus, MemoryTransport, TransportError

T = Topics()


def _collect() -> tuple[queue.Queue, object]:
    q: queue.Queue = queue.Queue()
    return q, lambda topic, payload: q.put((topic, payload))


def test_wildcard_routing_and_own_thread(memory_bus: MemoryBus) -> None:
    q, handler = _collect()
    coord = MemoryTransport(memory_bus, "coordinator")
    coord.subscribe(T.node_filter("status"), handler)
    coord.start()
    node = MemoryTransport(memory_bus, "node-a")
    node.start()
    node.publish(T.node("node-a", "status"), b"s1")
    node.publish(T.node("node-a", "report"), b"not subscribed")
    assert q.get(timeout=2) == (T.node("node-a", "status"), b"s1")
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    coord.stop()
    node.stop()


def test_retained_and_will(memory_bus: MemoryBus) -> None:
    node = MemoryTransport(memory_bus, "node-a", will=(T.node("node-a", "status"), b"offline"))
    node.start()
    node.publish(T.node("node-a", "status"), b"online", retain=True)
    q, handler = _collect()
    coord = MemoryTransport(memory_bus, "coordinator")
    coord.subscribe(T.node_filter("status"), handler)
    coord.start()
    assert q.get(timeout=2) == (T.node("node-a", "status"), b"online")  # retained, delivered on subscribe
    node.kill()
    assert q.get(timeout=2) == (T.node("node-a", "status"), b"offline")
    late_q, late = _collect()
    coord.subscribe(T.node("node-a", "status"), late)
    assert late_q.get(timeout=2)[1] == b"offline"  # the will was retained
    coord.stop()


def test_graceful_stop_sends_no_will(memory_bus: MemoryBus) -> None:
    q, handler = _collect()
    coord = MemoryTransport(memory_bus, "coordinator")
    coord.subscribe(T.node_filter("status"), handler)
    coord.start()
    node = MemoryTransport(memory_bus, "node-a", will=(T.node("node-a", "status"), b"offline"))
    node.start()
    node.stop()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    with pytest.raises(TransportError):
        node.publish(T.node("node-a", "status"), b"x")
    coord.stop()


def test_handler_exception_is_logged_and_loop_survives(memory_bus: MemoryBus) -> None:
    q, good = _collect()

    def bad(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        good(topic, payload)

    coord = MemoryTransport(memory_bus, "coordinator")
    coord.subscribe(T.node_filter("report"), bad)
    coord.start()
    coord.publish(T.node("node-a", "report"), b"boom")
    coord.publish(T.node("node-a", "report"), b"fine")
    assert q.get(timeout=2)[1] == b"fine"
    coord.stop()


def test_chunk_topics_refuse_oversize_payloads(memory_bus: MemoryBus) -> None:
    node = MemoryTransport(memory_bus, "node-a", chunk_size=4096)
    node.start()
    node.publish(T.node("node-a", "upload"), bytes(4096 + CHUNK_OVERHEAD))
    with pytest.raises(TransportError, match="send_transfer"):
        node.publish(T.node("node-a", "upload"), bytes(4096 + CHUNK_OVERHEAD + 1))
    node.publish(T.node("node-a", "report"), bytes(100_000))  # other topics: the message limit
    node.stop()


def test_transfer_with_losses_is_completed_by_resend(memory_bus: MemoryBus) -> None:
    """Drop every 4th chunk on the bus; the receiver asks for the missing ones; the sender's outbox answers."""
    seen = {"n": 0}

    def drop(topic: str, payload: bytes) -> bool:
        if not topic.endswith("/upload"):
            return False
        seen["n"] += 1
        return seen["n"] % 4 == 0 and seen["n"] < 40

    memory_bus.drop = drop
    r = Reassembler(1 << 22, 60)
    done: queue.Queue = queue.Queue()
    coord = MemoryTransport(memory_bus, "coordinator", chunk_size=4096)

    def on_upload(topic: str, payload: bytes) -> None:
        chunk = decode(payload, Chunk)
        whole = r.feed(chunk, T.parse(topic).node_id or "")
        if whole is not None:
            done.put(whole)

    coord.subscribe(T.node_filter("upload"), on_upload)
    coord.start()
    node = MemoryTransport(memory_bus, "node-a", chunk_size=4096)
    node.subscribe(T.node("node-a", "resend"),
                   lambda topic, p: node.resend(T.node("node-a", "upload"), decode(p, ResendRequest)))
    node.start()
    payload = os.urandom(100_000)
    r.expect("tx", "node-a")
    assert node.send_transfer(T.node("node-a", "upload"), payload, "tx", "node-a") == 25
    got = None
    for _ in range(20):
        try:
            got = done.get(timeout=0.2)
            break
        except queue.Empty:
            missing = r.missing("tx")
            assert missing, "nothing missing yet no payload"
            coord.publish(T.node("node-a", "resend"), encode(ResendRequest("tx", "coordinator", missing)))
    assert got == payload
    assert node.resend(T.node("node-a", "upload"), ResendRequest("unknown", "coordinator", [0])) == 0
    node.stop()
    coord.stop()


def test_wait_published_waits_for_handlers(memory_bus: MemoryBus) -> None:
    seen: list[bytes] = []

    def slow(topic: str, payload: bytes) -> None:
        import time

        time.sleep(0.05)
        seen.append(payload)

    coord = MemoryTransport(memory_bus, "coordinator")
    coord.subscribe(T.node_filter("report"), slow)
    coord.start()
    node = MemoryTransport(memory_bus, "node-a")
    node.start()
    for i in range(3):
        node.publish(T.node("node-a", "report"), bytes([i]))
    assert node.wait_published(5)
    assert seen == [b"\x00", b"\x01", b"\x02"]
    node.stop()
    coord.stop()
