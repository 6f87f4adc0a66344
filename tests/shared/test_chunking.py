"""Chunked transfer without a broker: split, reassembly in any order with duplicates, rejections, resume, expiry."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from shared.chunking import Outbox, Reassembler, split
from shared.messages import Chunk, ResendRequest


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _feed_all(r: Reassembler, chunks: list[Chunk], sender: str) -> bytes | None:
    out = None
    for c in chunks:
        got = r.feed(c, sender)
        if got is not None:
            assert out is None, "payload returned twice"
            out = got
    return out


def test_split_geometry_and_zero_copy() -> None:
    payload = os.urandom(10_000)
    chunks = split(payload, "t1", "node-a", 4096)
    assert [len(c.data) for c in chunks] == [4096, 4096, 1808]
    assert {c.count for c in chunks} == {3} and [c.index for c in chunks] == [0, 1, 2]
    assert {c.digest for c in chunks} == {hashlib.sha256(payload).hexdigest()}
    assert all(c.total_size == 10_000 and c.sender == "node-a" for c in chunks)
    assert b"".join(bytes(c.data) for c in chunks) == payload
    assert isinstance(chunks[0].data, memoryview) and chunks[0].data.obj is payload  # a view, not a copy


def test_empty_payload_is_one_empty_chunk() -> None:
    chunks = split(b"", "t0", "node-a", 4096)
    assert len(chunks) == 1 and chunks[0].total_size == 0
    r = Reassembler(1024, 10)
    r.expect("t0", "node-a")
    assert r.feed(chunks[0], "node-a") == b""


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 20_000), chunk=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1),
       dup=st.floats(0, 1))
def test_any_order_with_duplicates_reassembles(size: int, chunk: int, seed: int, dup: float) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    chunks = split(payload, "t", "node-a", chunk)
    wire = chunks + [c for c in chunks if rng.random() < dup]
    rng.shuffle(wire)
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    assert _feed_all(r, wire, "node-a") == payload
    assert r.pending() == [] and r.duplicates == len(wire) - len(chunks)


def test_last_chunk_first_fixes_geometry() -> None:
    payload = os.urandom(9000)
    chunks = split(payload, "t", "node-a", 4000)
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    assert r.feed(chunks[-1], "node-a") is None
    st_ = r.status("t")
    assert st_ is not None and st_.count == 3 and st_.received == 1 and st_.total_size == 9000
    assert r.missing("t") == [0, 1]
    assert _feed_all(r, chunks[:2], "node-a") == payload


def _good(tid: str = "t", sender: str = "node-a", size: int = 10_000) -> tuple[bytes, list[Chunk]]:
    payload = os.urandom(size)
    return payload, split(payload, tid, sender, 4096)


def _replace(c: Chunk, **kw: object) -> Chunk:
    return dataclasses.replace(c, **kw)


BASE_PAYLOAD, BASE = _good()
# (case, chunks fed after expect("t", "node-a") from topic sender, topic sender, reason fragment)
REJECTS = [
    ("unknown-transfer", [_replace(BASE[0], transfer_id="other")], "node-a", "unknown transfer"),
    ("chunk-claims-other-sender", [_replace(BASE[0], sender="node-b")], "node-a", "sender mismatch"),
    ("topic-of-other-sender", [BASE[0]], "node-b", "sender mismatch"),
    ("oversize-total", [_replace(BASE[0], total_size=1 << 21, count=513)], "node-a", "exceeds"),
    ("inconsistent-count", [BASE[0], _replace(BASE[1], count=4)], "node-a", "inconsistent"),
    ("inconsistent-digest", [BASE[0], _replace(BASE[1], digest="0" * 64)], "node-a", "inconsistent"),
    ("bad-geometry", [_replace(BASE[2], data=bytes(5000), total_size=10_000)], "node-a", "cannot make"),
    ("wrong-chunk-length", [BASE[0], _replace(BASE[1], data=bytes(100))], "node-a", "expected 4096"),
]


@pytest.mark.parametrize(("fed", "topic_sender", "reason"), [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS])
def test_rejections_are_logged_and_receiver_keeps_working(fed: list[Chunk], topic_sender: str, reason: str) -> None:
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    with capture_logs() as logs:
        results = [r.feed(c, topic_sender) for c in fed]
    assert results[-1] is None
    rejected = [e for e in logs if e["event"] == "chunk_rejected"]
    assert len(rejected) == 1 and reason in rejected[0]["reason"]
    assert r.rejected == 1
    # The receiver still completes a good transfer afterwards (the same id, and a fresh one).
    payload, chunks = _good("t2")
    r.expect("t2", "node-a")
    assert _feed_all(r, chunks, "node-a") == payload
    assert _feed_all(r, BASE, "node-a") == BASE_PAYLOAD


def test_digest_mismatch_resets_then_resend_completes() -> None:
    payload, chunks = _good(size=12_000)
    bad = list(chunks)
    bad[1] = _replace(bad[1], data=bytes(4096))  # corrupted in transit, consistent metadata
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    with capture_logs() as logs:
        assert _feed_all(r, bad, "node-a") is None
    assert any(e["event"] == "chunk_rejected" and "digest mismatch" in e["reason"] for e in logs)
    assert r.missing("t") == [0]  # reset: everything must come again
    assert _feed_all(r, chunks, "node-a") == payload


def test_completed_transfer_drops_late_duplicates_quietly() -> None:
    payload, chunks = _good()
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    assert _feed_all(r, chunks, "node-a") == payload
    with capture_logs() as logs:
        assert r.feed(chunks[0], "node-a") is None
    assert logs == [] and r.duplicates == 1


def test_missing_stalled_and_expire_with_a_fake_clock() -> None:
    clock = FakeClock()
    _, chunks = _good(size=20_000)  # 5 chunks
    r = Reassembler(1 << 20, timeout_s=30, clock=clock)
    r.expect("t", "node-a")
    assert r.missing("t") == [0] and r.missing("nope") == []
    clock.t += 1
    assert r.stalled(1) == ["t"] and r.stalled(1, started_only=True) == []
    r.feed(chunks[0], "node-a")
    r.feed(chunks[3], "node-a")
    assert r.missing("t") == [1, 2, 4]
    clock.t += 10
    assert r.stalled(5) == ["t"] and r.stalled(11) == []
    assert r.expire() == []
    r.feed(chunks[1], "node-a")  # progress resets the idle time
    clock.t += 29
    assert r.expire() == []
    clock.t += 2
    with capture_logs() as logs:
        assert r.expire() == ["t"]
    assert logs[0]["event"] == "transfer_expired" and logs[0]["received"] == 3
    assert r.status("t") is None
    with capture_logs() as logs:
        assert r.feed(chunks[2], "node-a") is None  # expired: unknown now
    assert logs[0]["reason"] == "unknown transfer"


def test_resend_is_asked_only_once_a_transfer_stalls_and_not_again_while_chunks_arrive() -> None:
    """A timer-driven ask re-queues every chunk still in flight; asks follow stalls instead."""
    clock = FakeClock()
    _, chunks = _good(size=20_000)  # 5 chunks
    r = Reassembler(1 << 20, timeout_s=30, clock=clock)
    r.expect("t", "node-a")
    clock.t += 2.9
    assert r.resend_request("t", "coordinator") is None  # not stalled yet
    clock.t += 0.1
    req = r.resend_request("t", "coordinator")
    assert req == ResendRequest(transfer_id="t", requester="coordinator", missing=[0])
    assert r.resend_request("t", "coordinator") is None  # just asked: give the answer time
    for i in (0, 1, 2):  # the answer arrives one chunk a second: never asked again meanwhile
        clock.t += 1.0
        r.feed(chunks[i], "node-a")
        assert r.resend_request("t", "coordinator") is None
    clock.t += 3.0  # then it stalls again: only what is missing
    assert r.resend_request("t", "coordinator").missing == [3, 4]
    clock.t += 1.0
    assert r.resend_request("t", "coordinator", idle_s=1.0).missing == [3, 4]  # a shorter rhythm where asked for
    assert r.resend_request("nope", "coordinator") is None
    r.feed(chunks[3], "node-a")
    assert r.feed(chunks[4], "node-a") is not None
    clock.t += 10
    assert r.resend_request("t", "coordinator") is None  # complete


def test_forget_drops_state() -> None:
    _, chunks = _good()
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    r.feed(chunks[0], "node-a")
    r.forget("t")
    assert r.pending() == [] and r.missing("t") == []


def test_concurrent_feeding_from_threads() -> None:
    r = Reassembler(1 << 24, 60)
    payloads = {}
    for i in range(4):
        payloads[f"t{i}"], chunks = _good(f"t{i}", size=200_000)
        r.expect(f"t{i}", "node-a")
        payloads[f"t{i}"] = (payloads[f"t{i}"], chunks)
    results: dict[str, bytes] = {}
    lock = threading.Lock()

    def worker(tid: str) -> None:
        _, chunks = payloads[tid]
        for c in chunks + chunks[:3]:
            got = r.feed(c, "node-a")
            if got is not None:
                with lock:
                    results[tid] = got

    threads = [threading.Thread(target=worker, args=(t,)) for t in payloads for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {tid: p for tid, (p, _) in payloads.items()}


def test_outbox_answers_only_missing_chunks_and_stays_bounded() -> None:
    box = Outbox(max_bytes=25_000)
    _, a = _good("a", size=10_000)
    _, b = _good("b", size=10_000)
    _, c = _good("c", size=10_000)
    box.add(a)
    box.add(b)
    assert [x.index for x in box.get("a", [2, 0, 0, 9])] == [0, 2]
    assert len(box.get("a", [])) == 3  # empty list: everything
    box.add(c)  # 30 000 > 25 000: the least recently used ("b", since "a" was just read) goes
    assert "b" not in box and "a" in box and "c" in box and box.nbytes == 20_000
    assert box.get("b", [0]) == []
    big = Outbox(max_bytes=100)
    big.add(a)
    assert "a" in big  # the newest transfer is kept even when it alone exceeds the bound


def test_resume_round_trip_without_a_broker() -> None:
    payload, chunks = _good(size=50_000)
    box = Outbox()
    box.add(chunks)
    r = Reassembler(1 << 20, 60)
    r.expect("t", "node-a")
    assert _feed_all(r, chunks[::3], "node-a") is None
    req = ResendRequest(transfer_id="t", requester="coordinator", missing=r.missing("t"))
    assert _feed_all(r, box.get(req.transfer_id, req.missing), "node-a") == payload
