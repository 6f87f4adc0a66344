"""Every MQTT topic handler (4 coordinator, 4 node; the pacing exchange of regions: the root's region report
handler, the region's config handler) and the upload acceptance fuzzed with 10,000+ seeded payloads.

Invariants checked for every payload:
- no exception escapes the handler;
- a rejected payload produces exactly one warning line that names a reason (``error``/``reason``), and the
  accepted state is unchanged: the handler's queue, the registry, every reassembly in progress (sender,
  geometry, chunks held, completed ids), the node's round and last report, the outbox; the strategy state is
  compared (tensor by tensor) before and after each handler's whole run;
- an accepted payload produces no warning, exactly one queued item, and that item is a valid message whose
  node id is the one in the topic (for chunks: the reassembled bytes equal the sent bytes, digest checked);
- a payload built to be invalid is rejected, one built to be valid is accepted.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import torch
from safetensors.torch import save as st_save
from structlog.testing import capture_logs

from coordinator.config import CoordinatorConfig, RegionConfig
from coordinator.region import Region
from coordinator.server import Coordinator, _Pending
from coordinator.strategies import NodeInfo, NodeResult
from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from shared.chunking import Reassembler, split
from shared.messages import (
    Chunk,
    Command,
    ExportReport,
    NodeStatus,
    ProtocolError,
    RegionPlan,
    RegionPlanQuery,
    RegionReport,
    ResendRequest,
    RoundConfig,
    RoundReport,
    decode,
    encode,
)
from shared.transport import MemoryBus, MemoryTransport
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate

pytestmark = pytest.mark.slow  # 10,000 inputs per handler
N = 10_000
SEED = 8_2026
ROOT = "fedspine/v1"
NODE, OTHER = "node-a", "node-b"

# warning events whose name is the whole reason (they carry no error/reason field)
SELF_EXPLAINING = {"resend_unknown_transfer", "resend_indices_out_of_range"}
Case = tuple[str, str, bytes, str]  # (input class, topic, payload, expect: accept | reject | any | quiet)


# ---- mutations ------------------------------------------------------------------------------------------
_WEIRD_VALUES: list[Any] = [None, True, -1, -(2**63), 2**64 - 1, 10**30, float("nan"), float("inf"), -float("inf"),
                            1e308, "", "x" * 5000, b"\x00" * 7, [], [1, 2, 3], {}, {"a": 1}, 0.5, "../../etc"]


def _weird(rng: random.Random) -> Any:
    return rng.choice(_WEIRD_VALUES)


def _clamp(v: Any) -> Any:
    """msgpack cannot carry integers beyond 64 bits: send the largest it can instead."""
    if isinstance(v, int) and not isinstance(v, bool):
        return max(-(2**63), min(v, 2**64 - 1))
    if isinstance(v, dict):
        return {k: _clamp(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clamp(x) for x in v]
    return v


def _pack(wire: Any, as_json: bool) -> bytes:
    if as_json:
        return json.dumps(wire, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)).encode()
    try:
        return msgpack.packb(wire, use_bin_type=True)
    except OverflowError:
        return msgpack.packb(_clamp(wire), use_bin_type=True)


def mutate_wire(rng: random.Random, wire: dict, as_json: bool) -> tuple[str, bytes, str]:
    """A structural mutation of a valid wire dict: (class, payload, expect)."""
    w = dict(wire)
    keys = [k for k in w if k != "type"]
    op = rng.randrange(10)
    if op == 0:
        k = rng.choice(keys)
        w[k] = _weird(rng)
        return "wrong type or value in a field", _pack(w, as_json), "any"
    if op == 1:
        w.pop(rng.choice(list(w)))
        return "missing field", _pack(w, as_json), "any"
    if op == 2:
        w[f"extra{rng.randrange(100)}"] = _weird(rng)
        return "unknown extra field", _pack(w, as_json), "reject"
    if op == 3:
        w["v"] = rng.choice([0, 2, 99, -1, "1", 1.5, None, True])
        return "wrong schema version", _pack(w, as_json), "reject"
    if op == 4:
        w["type"] = rng.choice(["chunk", "node_status", "round_config", "command", "nope", 7, None, ""])
        return "wrong message type tag", _pack(w, as_json), "any"
    if op == 5:
        return "wrong wire format (JSON vs msgpack)", _pack(w, not as_json), "any"
    if op == 6:
        num = [k for k in keys if isinstance(w[k], (int, float)) and not isinstance(w[k], bool)] or keys
        w[rng.choice(num)] = rng.choice([float("nan"), float("inf"), -float("inf"), -1, -(2**40), 2**62, 10**19])
        return "NaN/Inf, negative or huge number", _pack(w, as_json), "any"
    if op == 7:
        top = rng.choice([[w], "string", 42, None, [1, 2], {"type": w.get("type")}])
        return "not a map / empty map", _pack(top, as_json) if not isinstance(top, dict) else _pack(top, as_json), \
            "reject"
    if op == 8:
        nested: Any = dict(w)
        for _ in range(rng.choice([2, 50, 400])):
            nested = [nested]
        w[rng.choice(keys)] = nested
        return "deeply nested value", _pack(w, as_json), "reject"
    w[rng.choice(keys)] = rng.choice([True, False]) if rng.random() < 0.5 else str(rng.random())
    return "bool/str in place of a number or string", _pack(w, as_json), "any"


_LONG = list(range(70_000))  # longer than any ResendRequest may be
_PACKED: dict[tuple, bytes] = {}


def _pack_cached(wire: dict) -> bytes:
    """msgpack of ``wire``; the 70,000-item list variant is packed once per other-field values."""
    if wire.get("missing") is not _LONG:
        return _pack(wire, False)
    key = tuple(sorted((k, v) for k, v in wire.items() if k != "missing"))
    if key not in _PACKED:
        _PACKED[key] = _pack(wire, False)
    return _PACKED[key]


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes, str]:
    op = rng.randrange(6)
    b = bytearray(data)
    if op == 0 and b:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return "bit flips", bytes(b), "any"
    if op == 1 and len(b) > 1:
        return "truncated", bytes(b[: rng.randrange(1, len(b))]), "any"
    if op == 2:
        return "trailing garbage", bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))), "any"
    if op == 3:
        return "random bytes", bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))), "reject"
    if op == 4:
        return "empty payload", b"", "reject"
    return "malformed JSON/msgpack text", rng.choice([b"{", b"{\"type\":", b"[1,2", b"\xc1", b"\xdd\xff\xff\xff\xff",
                                                      b"{\"v\":NaN}", b"\x81\xa1a", b"null", b"\xff" * 9]), "reject"


def structural_or_bytes(rng: random.Random, valid: bytes, wire: dict, as_json: bool) -> tuple[str, bytes, str]:
    if rng.random() < 0.55:
        return mutate_wire(rng, wire, as_json)
    return mutate_bytes(rng, valid)


# ---- harness --------------------------------------------------------------------------------------------
@dataclass
class Stats:
    classes: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    quiet: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.classes.values())


def reasm_state(r: Reassembler) -> tuple:
    with r._lock:
        return (tuple(sorted((tid, t.sender, t.count, t.total, t.digest, t.n_have, bytes(t.have))
                             for tid, t in r._transfers.items())), tuple(r._done))


def run_fuzz(handler: Callable[[str, bytes], None], cases: Iterator[Case], snapshot: Callable[[], Any],
             take_accepted: Callable[[], Any | None], check_accepted: Callable[[str, str, bytes, Any], None],
             reset: Callable[[], None] = lambda: None, accept_marker: Callable[[list], bool] | None = None,
             partial: Callable[[str, bytes], bool] | None = None) -> Stats:
    """Feed every case; enforce the invariants in the module docstring; return per-class counts."""
    st = Stats()
    with capture_logs() as logs:
        for cls, topic, payload, expect in cases:
            reset()
            before = snapshot()
            n0 = len(logs)
            try:
                handler(topic, payload)
            except Exception as exc:  # noqa: BLE001 - the finding is reported with its input
                raise AssertionError(f"{cls}: handler raised {exc!r} for {topic} {payload[:80]!r}") from exc
            new = logs[n0:]
            warnings = [e for e in new if e["log_level"] in ("warning", "error", "critical")]
            item = take_accepted()
            accepted = item is not None if accept_marker is None else accept_marker(new)
            st.classes[cls] += 1

            def fail(why: str, cls: str = cls, expect: str = expect, topic: str = topic, payload: bytes = payload,
                     new: list = new) -> AssertionError:
                return AssertionError(f"{why}: {cls} ({expect}): {topic} {payload[:120]!r} -> {new}")

            if accepted:
                if warnings or expect not in ("accept", "any"):
                    raise fail("accepted")
                check_accepted(cls, topic, payload, item)
                st.accepted[cls] += 1
            elif expect == "quiet" and not warnings:
                st.quiet[cls] += 1
                if snapshot() != before:
                    raise fail("state changed by a quietly dropped input")
            elif not warnings and partial is not None and expect == "any" and partial(topic, payload):
                st.accepted[cls] += 1  # a valid first chunk of a longer transfer: stored, waits for the rest
            else:
                if expect == "accept":
                    raise fail("a valid input was rejected")
                if len(warnings) != 1:
                    raise fail(f"{len(warnings)} warning lines for one rejected input")
                w = warnings[0]
                reason = w.get("error") or w.get("reason") or (w["event"] if w["event"] in SELF_EXPLAINING else None)
                if not (isinstance(reason, str) and reason):
                    raise fail("the warning names no reason")
                if snapshot() != before:
                    raise fail("state changed by a rejected input")
                st.reasons[w["event"]] += 1
                st.rejected[cls] += 1
    assert st.total >= N
    return st


def record(reliability, handler: str, st: Stats) -> None:
    for cls in sorted(st.classes):
        parts = []
        if st.rejected[cls]:
            parts.append(f"{st.rejected[cls]} rejected (1 warning each, state unchanged)")
        if st.accepted[cls]:
            valid = "control" in cls or "replay" in cls
            parts.append(f"{st.accepted[cls]} accepted" + ("" if valid else " (mutation left a valid message, "
                                                                      "re-validated; or a valid first chunk)"))
        if st.quiet[cls]:
            parts.append(f"{st.quiet[cls]} ignored without a log line, state unchanged "
                         "(retained-status clear / completed-transfer duplicate, by design)")
        reliability.add(f"fuzz {handler}", cls, st.classes[cls], "; ".join(parts) + "; 0 crashes")


def tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all()
                                                                                              | (a.isnan() & b.isnan()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(tensors_equal, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture
def coordinator(tmp_path) -> Coordinator:
    cfg = CoordinatorConfig.from_dict({"coordinator": {"state_dir": str(tmp_path / "coord"), "rounds": 3}})
    c = Coordinator(cfg, transport=MemoryTransport(MemoryBus(), "coordinator"))
    now = time.time()
    for nid in (NODE, OTHER):  # a registry with live nodes, so a status change would show
        c.registry.apply(NodeStatus(node_id=nid, state="online", ts=now, device_type="nx"), now, 0)
    return c


class _NoTrainer:
    sparsity = 0.0

    def run_round(self, **kw: Any) -> None:  # pragma: no cover - handlers never train
        raise AssertionError("a handler must not touch the trainer")


@pytest.fixture
def agent(tmp_path) -> NodeAgent:
    cfg = NodeConfig.from_dict({"node": {"id": NODE, "state_dir": str(tmp_path / NODE)}})
    a = NodeAgent(cfg, trainer=_NoTrainer())
    t = MemoryTransport(MemoryBus(), NODE)
    t.start()
    a.transport = t
    return a


def _drain(q) -> Any | None:
    try:
        return q.get_nowait()
    except Exception:  # noqa: BLE001 - queue.Empty
        return None


# ---- coordinator handlers ---------------------------------------------------------------------------------
def _topic(rng: random.Random, kind: str, node: str = NODE) -> tuple[str, str | None]:
    """A topic matching the subscription filter node/+/<kind>: mostly right, sometimes another node or a bad id."""
    r = rng.random()
    if r < 0.85:
        return f"{ROOT}/node/{node}/{kind}", None
    if r < 0.93:
        return f"{ROOT}/node/{OTHER}/{kind}", "payload names another node than its topic"
    bad = rng.choice(["-lead", "a b", "x" * 80, "ümlaut", ".", "node$", ""])
    return f"{ROOT}/node/{bad}/{kind}", "invalid node id in topic"


def status_cases(rng: random.Random) -> Iterator[Case]:
    for _ in range(N):
        st = NodeStatus(node_id=NODE, state=rng.choice(["online", "offline"]), ts=time.time(),
                        device_type=rng.choice(["agx", "nx", ""]), memory_mb=rng.randrange(0, 64000),
                        sparsity=rng.random() * 0.9, round=rng.randrange(-1, 50))
        topic, topic_err = _topic(rng, "status")
        valid = encode(st)
        if topic_err:
            yield topic_err, topic, valid, "reject"
        elif rng.random() < 0.1:
            yield "valid status (control)", topic, valid, "accept"
        elif rng.random() < 0.05:
            yield "replay of a valid status", topic, valid, "accept"
        else:
            cls, payload, expect = structural_or_bytes(rng, valid, st.to_wire(), as_json=True)
            # an empty payload on a retained status topic is the broker clearing it: ignored without a log line
            yield cls, topic, payload, "quiet" if not payload else expect


def _fix(c: tuple[str, bytes, str], topic: str) -> Case:
    cls, payload, expect = c
    return cls, topic, payload, expect


def _check_event(kind: str, msg_types: tuple[type, ...]):
    def check(cls: str, topic: str, payload: bytes, item: Any) -> None:
        ev_kind, node_id, msg = item
        assert ev_kind == kind and node_id == topic.split("/")[3], (cls, item)
        assert isinstance(msg, msg_types)
        if hasattr(msg, "node_id"):
            assert msg.node_id == node_id
        if hasattr(msg, "requester"):
            assert msg.requester == node_id
        msg.__post_init__()  # still satisfies every field rule
    return check


def _coord_snapshot(c: Coordinator) -> Callable[[], Any]:
    def snap() -> Any:
        return c.events.qsize(), c.registry.state_dict(), reasm_state(c.reassembler)
    return snap


def _fuzz_coordinator(c, handler, cases, check) -> Stats:
    """Fuzz one of the coordinator's message handlers: what it accepts is checked by ``check``, and the strategy's
    state (global model, node states) is as it was."""
    before = c.strategy.state_dict()
    st = run_fuzz(handler, cases, _coord_snapshot(c), lambda: _drain(c.events), check)
    assert tensors_equal(before, c.strategy.state_dict())
    return st


def test_fuzz_coordinator_status(coordinator, reliability) -> None:
    st = _fuzz_coordinator(coordinator, coordinator._handle_status, status_cases(random.Random(SEED)),
                           _check_event("status", (NodeStatus,)))
    assert st.accepted["valid status (control)"] > 0 and st.rejected["random bytes"] > 0
    record(reliability, "coordinator status", st)


def report_cases(rng: random.Random) -> Iterator[Case]:
    for _ in range(N):
        if rng.random() < 0.8:
            msg: Any = RoundReport(run_id="r1", round=rng.randrange(0, 9), node_id=NODE,
                                   status=rng.choice(["ok", "oom", "error"]), transfer_id="r1.r1.a0.node-a.up",
                                   upload_bytes=rng.randrange(0, 10**6), loss_start=rng.random(),
                                   loss_end=rng.random(), samples=rng.randrange(0, 1000), compute_s=rng.random(),
                                   sparsity=rng.random() * 0.9, rank=rng.choice([2, 4, 8]),
                                   metrics={"test_accuracy": rng.random()})
        else:
            msg = ExportReport(run_id="r1", node_id=NODE, status="ok", size_bytes=rng.randrange(10**6))
        topic, topic_err = _topic(rng, "report")
        valid = encode(msg)
        if topic_err:
            yield topic_err, topic, valid, "reject"
        elif rng.random() < 0.1:
            yield "valid report (control)", topic, valid, "accept"
        else:
            wire = msg.to_wire()
            if rng.random() < 0.15 and isinstance(msg, RoundReport):
                wire["metrics"] = rng.choice([{"x": float("nan")}, {"": 1.0}, {str(i): 1.0 for i in range(5000)},
                                              {"x": "1"}, [1.0], {"x": float("inf")}])
                yield "bad metrics map (NaN, empty key, 5000 items, strings)", topic, _pack(wire, False), "reject"
            else:
                yield _fix(structural_or_bytes(rng, valid, wire, as_json=False), topic)


def test_fuzz_coordinator_report(coordinator, reliability) -> None:
    st = _fuzz_coordinator(coordinator, coordinator._handle_report, report_cases(random.Random(SEED + 1)),
                           _check_event("report", (RoundReport, ExportReport)))
    assert st.accepted["valid report (control)"] > 0
    record(reliability, "coordinator report", st)


def missing_cases(rng: random.Random) -> Iterator[Case]:
    for _ in range(N):
        req = ResendRequest(transfer_id="r1.r1.a0.node-a.down", requester=NODE,
                            missing=rng.sample(range(1000), rng.randrange(0, 20)))
        topic, topic_err = _topic(rng, "missing")
        valid = encode(req)
        if topic_err:
            yield topic_err, topic, valid, "reject"
        elif rng.random() < 0.1:
            yield "valid resend request (control)", topic, valid, "accept"
        elif rng.random() < 0.1:
            wire = req.to_wire()
            wire["missing"] = rng.choice([_LONG, [-1], [2**40], [1.5], ["1"], [None]])
            yield "missing list: 70,000 items, negative, huge or non-integer indices", topic, _pack_cached(wire), \
                "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, req.to_wire(), as_json=False), topic)


def test_fuzz_coordinator_missing(coordinator, reliability) -> None:
    c = coordinator
    st = run_fuzz(c._handle_missing, missing_cases(random.Random(SEED + 2)), _coord_snapshot(c),
                  lambda: _drain(c.events), _check_event("missing", (ResendRequest,)))
    assert st.accepted["valid resend request (control)"] > 0
    record(reliability, "coordinator missing", st)


# ---- chunks (coordinator upload, node download) -----------------------------------------------------------
TID, BYSTANDER = "r1.r1.a0.node-a.up", "r1.r1.a0.node-b.up"


def chunk_cases(rng: random.Random, sender: str, tid: str, other_tid: str, replay: bytes,
                topic_fn: Callable[[random.Random], tuple[str, str | None]]) -> Iterator[Case]:
    for _ in range(N):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        whole = split(data, tid, sender, 4096)[0]  # a complete single-chunk transfer
        topic, topic_err = topic_fn(rng)
        valid = encode(whole)
        r = rng.random()
        if topic_err:
            yield topic_err, topic, valid, "reject"
        elif r < 0.10:
            yield "valid single-chunk transfer (control)", topic, valid, "accept"
        elif r < 0.16:
            c = Chunk(transfer_id=other_tid, sender=sender, index=0, count=1, total_size=len(data),
                      digest=whole.digest, data=data)
            yield "chunk for another node's transfer", topic, encode(c), "reject"
        elif r < 0.22:
            c = Chunk(transfer_id=tid, sender=rng.choice([n for n in (NODE, OTHER, "coordinator", "node-z")
                                                          if n != sender]), index=0, count=1, total_size=len(data), digest=whole.digest, data=data)
            yield "chunk naming another sender", topic, encode(c), "reject"
        elif r < 0.27:
            c = Chunk(transfer_id=f"unknown.{rng.randrange(10**6)}", sender=sender, index=0, count=1,
                      total_size=len(data), digest=whole.digest, data=data)
            yield "chunk for an unknown transfer", topic, encode(c), "reject"
        elif r < 0.33:
            c = Chunk(transfer_id=tid, sender=sender, index=0, count=1, total_size=len(data),
                      digest=f"{rng.getrandbits(256):064x}", data=data)
            yield "wrong digest", topic, encode(c), "reject"
        elif r < 0.40:
            count = rng.choice([2, 3, 1000, 2**20])
            w = Chunk(transfer_id=tid, sender=sender, index=rng.randrange(count), count=count,
                      total_size=rng.choice([len(data) + 1, 10**9, 1]), digest=whole.digest, data=data).to_wire() \
                if len(data) <= 1 else None
            wire = w or {**whole.to_wire(), "count": count, "index": rng.choice([count, count + 7, -1]),
                         "total_size": rng.choice([-5, 0, 2**62, len(data) - 1])}
            yield "inconsistent geometry: index/count/total_size (negative, huge, off by one)", topic, \
                _pack(wire, False), "any"
        elif r < 0.45:
            yield "replay of a chunk of a transfer completed earlier", topic, replay, "quiet"
        else:
            yield _fix(structural_or_bytes(rng, valid, whole.to_wire(), as_json=False), topic)


def _partial_of(tid: str, sender: str, node: str) -> Callable[[str, bytes], bool]:
    """Oracle: is ``payload`` a well-formed non-final chunk of ``tid`` from ``sender`` on ``node``'s topic?"""
    def partial(topic: str, payload: bytes) -> bool:
        try:
            ch = decode(payload, Chunk)
        except ProtocolError:
            return False
        return ch.transfer_id == tid and ch.sender == sender and ch.count > 1 and topic.split("/")[3] == node
    return partial


def _complete_once(r: Reassembler, tid: str, sender: str, handler: Callable[[str, bytes], None], topic: str,
                   q: Any) -> bytes:
    """Complete one earlier transfer through the handler; return its chunk for replays."""
    r.expect(tid, sender)
    payload = encode(split(b"earlier round", tid, sender, 4096)[0])
    handler(topic, payload)
    assert _drain(q) is not None and tid not in r.pending()
    return payload


def _chunk_check(sent_for: Callable[[bytes], bytes | None]):
    def check(cls: str, topic: str, payload: bytes, item: Any) -> None:
        tid, whole = item[2][:2] if item[0] == "upload" else item  # coordinator events also carry the digest
        expected = sent_for(payload)
        assert tid == TID or tid == DOWN_TID
        assert expected is not None and bytes(whole) == expected, cls
    return check


def _sent_data(payload: bytes) -> bytes | None:
    try:
        w = msgpack.unpackb(payload, raw=False)
        return bytes(w["data"]) if isinstance(w, dict) and isinstance(w.get("data"), bytes) else None
    except Exception:  # noqa: BLE001
        return None


def test_fuzz_coordinator_upload(coordinator, reliability) -> None:
    c = coordinator
    # another node's upload half received: it must survive everything thrown at node-a's
    c.reassembler.expect(BYSTANDER, OTHER)
    other = split(bytes(range(256)) * 40, BYSTANDER, OTHER, 4096)
    assert len(other) == 3
    c._handle_upload(f"{ROOT}/node/{OTHER}/upload", encode(other[0]))
    assert c.reassembler.missing(BYSTANDER) == [1, 2]
    before = c.strategy.state_dict()

    def reset() -> None:  # every case meets a fresh expectation of node-a's upload
        if c.reassembler.status(TID) is None or c.reassembler.missing(TID) != [0]:
            c.reassembler.forget(TID)
            c.reassembler.expect(TID, NODE)

    def topic_fn(rng: random.Random) -> tuple[str, str | None]:
        return _topic(rng, "upload")

    replay = _complete_once(c.reassembler, "r1.r0.a0.node-a.up", NODE, c._handle_upload,
                            f"{ROOT}/node/{NODE}/upload", c.events)
    st = run_fuzz(c._handle_upload, chunk_cases(random.Random(SEED + 3), NODE, TID, BYSTANDER, replay, topic_fn),
                  _coord_snapshot(c), lambda: _drain(c.events), _chunk_check(_sent_data), reset=reset,
                  partial=_partial_of(TID, NODE, NODE))
    assert c.reassembler.missing(BYSTANDER) == [1, 2]
    for ch in other[1:]:  # and it still completes
        c._handle_upload(f"{ROOT}/node/{OTHER}/upload", encode(ch))
    ev = _drain(c.events)
    assert ev is not None and ev[2][0] == BYSTANDER and bytes(ev[2][1]) == bytes(range(256)) * 40
    assert tensors_equal(before, c.strategy.state_dict())
    assert st.accepted["valid single-chunk transfer (control)"] > 0 and st.quiet["replay of a chunk of a transfer completed earlier"]
    record(reliability, "coordinator upload", st)


# ---- node handlers ----------------------------------------------------------------------------------------
DOWN_TID, DOWN_OTHER = "r1.r1.a0.node-a.down", "r1.r1.a0.node-b.down"


def _agent_snapshot(a: NodeAgent) -> Callable[[], Any]:
    def snap() -> Any:
        return (a.events.qsize(), a.downloads.qsize(), a._round, a._done, reasm_state(a.reassembler),
                tuple(a.transport.outbox._items), a.transport.outbox.nbytes)
    return snap


def config_cases(rng: random.Random) -> Iterator[Case]:
    topic = f"{ROOT}/node/{NODE}/config"
    for _ in range(N):
        cfg = RoundConfig(run_id="r1", round=rng.randrange(0, 100), target_sparsity=rng.random() * 0.9,
                          rank=rng.choice([1, 2, 4, 8, 16]), local_steps=rng.randrange(0, 100),
                          deadline_ts=time.time() + 60, upload_transfer_id=TID,
                          download_transfer_id=rng.choice([None, DOWN_TID]), importance=rng.random() < 0.9)
        valid, wire = encode(cfg), cfg.to_wire()
        r = rng.random()
        if r < 0.1:
            yield "valid config (control)", topic, valid, "accept"
        elif r < 0.2:
            wire.update(rng.choice([{"rank": 0}, {"rank": 10**6}, {"target_sparsity": 1.0}, {"target_sparsity": -0.1},
                                    {"target_sparsity": float("nan")}, {"local_steps": -1}, {"deadline_ts": float("inf")},
                                    {"upload_transfer_id": "../../x"}, {"upload_transfer_id": ""},
                                    {"download_transfer_id": "a b"}, {"round": -1}, {"importance": 1}]))
            yield "out-of-range config (rank 0/10^6, sparsity 1/-0.1/NaN, bad ids, …)", topic, _pack(wire, False), \
                "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, wire, as_json=False), topic)


def _agent_event(kind: str, types: tuple[type, ...]):
    def check(cls: str, topic: str, payload: bytes, item: Any) -> None:
        assert item[0] == kind and isinstance(item[1], types), item
        item[1].__post_init__()
    return check


def test_fuzz_node_config(agent, reliability) -> None:
    a = agent
    st = run_fuzz(a._handle_config, config_cases(random.Random(SEED + 4)), _agent_snapshot(a),
                  lambda: _drain(a.events), _agent_event("config", (RoundConfig,)))
    assert st.accepted["valid config (control)"] > 0
    record(reliability, "node config", st)


def test_fuzz_node_download(agent, reliability) -> None:
    a = agent
    a.reassembler.expect(DOWN_OTHER, "coordinator")  # a partially received slice that must survive
    other = split(bytes(range(256)) * 40, DOWN_OTHER, "coordinator", 4096)
    a._handle_download(f"{ROOT}/node/{NODE}/download", encode(other[0]))

    def reset() -> None:
        if a.reassembler.status(DOWN_TID) is None or a.reassembler.missing(DOWN_TID) != [0]:
            a.reassembler.forget(DOWN_TID)
            a.reassembler.expect(DOWN_TID, "coordinator")

    def topic_fn(rng: random.Random) -> tuple[str, str | None]:
        return f"{ROOT}/node/{NODE}/download", None

    replay = _complete_once(a.reassembler, "r1.r0.a0.node-a.down", "coordinator", a._handle_download,
                            f"{ROOT}/node/{NODE}/download", a.downloads)
    st = run_fuzz(a._handle_download,
                  chunk_cases(random.Random(SEED + 5), "coordinator", DOWN_TID, DOWN_OTHER, replay, topic_fn),
                  _agent_snapshot(a), lambda: _drain(a.downloads), _chunk_check(_sent_data), reset=reset,
                  partial=_partial_of(DOWN_TID, "coordinator", NODE))
    assert a.reassembler.missing(DOWN_OTHER) == [1, 2]
    assert a.events.empty()
    record(reliability, "node download", st)


def resend_cases(rng: random.Random, n_chunks: int) -> Iterator[Case]:
    topic = f"{ROOT}/node/{NODE}/resend"
    for _ in range(N):
        req = ResendRequest(transfer_id=TID, requester="coordinator",
                            missing=rng.sample(range(n_chunks + 5), rng.randrange(0, n_chunks)))
        valid, wire = encode(req), req.to_wire()
        r = rng.random()
        if r < 0.1:
            useful = not req.missing or any(i < n_chunks for i in req.missing)
            yield ("valid resend request (control)", topic, valid, "accept") if useful else \
                ("valid resend request for chunks that do not exist", topic, valid, "reject")
        elif r < 0.16:
            unknown = ResendRequest(transfer_id=f"someone.else.{rng.randrange(999)}", requester="coordinator",
                                    missing=[])
            yield "resend request for a transfer this node never sent", topic, encode(unknown), "reject"
        elif r < 0.24:
            wire["missing"] = rng.choice([_LONG, [-1], [2**40], [0.5], "all", None])
            yield "missing list: 70,000 items, negative, huge or non-integer", topic, _pack_cached(wire), "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, wire, as_json=False), topic)


def test_fuzz_node_resend(agent, reliability) -> None:
    a = agent
    payload = bytes(range(256)) * 100  # 25.6 kB -> 7 chunks of 4 KiB in the outbox, as after an upload
    a.transport.chunk_size = 4096
    n_chunks = a.transport.send_transfer(f"{ROOT}/node/{NODE}/upload", payload, TID, NODE)
    assert n_chunks == 7
    sent: list[int] = []

    def marker(new: list) -> bool:
        done = [e for e in new if e["event"] == "upload_chunks_resent" and e["sent"] > 0]
        if done:
            sent.append(done[0]["sent"])
        return bool(done)

    def check(cls: str, topic: str, p: bytes, item: Any) -> None:
        w = msgpack.unpackb(p, raw=False)
        wanted = {i for i in w["missing"] if 0 <= i < n_chunks} if w["missing"] else set(range(n_chunks))
        assert sent[-1] == len(wanted), (cls, w, sent[-1])

    st = run_fuzz(a._handle_resend, resend_cases(random.Random(SEED + 6), n_chunks), _agent_snapshot(a),
                  lambda: None, check, accept_marker=marker)
    assert st.accepted["valid resend request (control)"] > 0
    record(reliability, "node resend", st)


def command_cases(rng: random.Random) -> Iterator[Case]:
    topic = f"{ROOT}/broadcast/command"
    for _ in range(N):
        cmd = Command(command=rng.choice(["export", "stop"]), run_id="r1", round=rng.randrange(-1, 50))
        valid, wire = encode(cmd), cmd.to_wire()
        r = rng.random()
        if r < 0.1:
            yield "valid command (control)", topic, valid, "accept"
        elif r < 0.2:
            wire["command"] = rng.choice(["rm -rf", "EXPORT", "", "shutdown", 1, None])
            yield "unknown command", topic, _pack(wire, False), "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, wire, as_json=False), topic)


def test_fuzz_node_command(agent, reliability) -> None:
    a = agent
    st = run_fuzz(a._handle_command, command_cases(random.Random(SEED + 7)), _agent_snapshot(a),
                  lambda: _drain(a.events), _agent_event("command", (Command,)))
    assert st.accepted["valid command (control)"] > 0
    record(reliability, "node command", st)


# ---- the pacing exchange under regions: RegionPlan up (root's report handler), RegionPlanQuery down (region's config)
REGION = "east"


def _region_topic(rng: random.Random, kind: str) -> tuple[str, str | None]:
    """A topic matching region/+/<kind>: mostly this region's, sometimes another's or a bad id."""
    r = rng.random()
    if r < 0.85:
        return f"{ROOT}/region/{REGION}/{kind}", None
    if r < 0.93 and kind == "report":
        return f"{ROOT}/region/west/{kind}", "payload names another region than its topic"
    bad = rng.choice(["-lead", "a b", "x" * 80, "ümlaut", ".", "region$"])
    return f"{ROOT}/region/{bad}/{kind}", "invalid region id in topic"


def region_plan_cases(rng: random.Random) -> Iterator[Case]:
    for _ in range(N):
        slowest = rng.choice([{}, {"agx-1": rng.random() * 100}, {"agx-1": 50.0, "tx2-3": 80.0}])
        if rng.random() < 0.8:
            msg: Any = RegionPlan(run_id="r1", round=rng.randrange(0, 9), attempt=rng.randrange(0, 4), region_id=REGION,
                                  finish_s=rng.choice([None, 0.0, rng.random() * 100]), slowest_at_tau=slowest)
        else:  # with a per-node round's statistics, sometimes
            msg = RegionReport(run_id="r1", round=rng.randrange(0, 9), region_id=REGION, status="ok",
                               next_finish_s=rng.choice([None, rng.random() * 100]), slowest=slowest,
                               best_loss=rng.random(), best_importance=rng.random() * 10,
                               lowest_energy=rng.choice([None, rng.random()]))
        topic, topic_err = _region_topic(rng, "report")
        valid = encode(msg)
        if topic_err:
            yield topic_err, topic, valid, "reject"
        elif rng.random() < 0.1:
            yield "valid region plan or report (control)", topic, valid, "accept"
        elif rng.random() < 0.1 and isinstance(msg, RegionPlan):
            wire = msg.to_wire()
            wire.update(rng.choice([{"finish_s": -1.0}, {"finish_s": float("nan")}, {"finish_s": float("inf")},
                                    {"finish_s": 1e8}, {"attempt": -1}, {"round": -1}, {"region_id": "a/b"},
                                    {"slowest_at_tau": {"a": 1.0, "b": 2.0, "c": 3.0}},
                                    {"slowest_at_tau": {"a/b": 1.0}}, {"slowest_at_tau": {"a": float("nan")}},
                                    {"slowest_at_tau": [1.0]}]))
            yield "out-of-range region plan (finish negative/NaN/Inf/huge, bad attempt, round, id or slowest)", topic, \
                _pack(wire, False), "reject"
        elif rng.random() < 0.1 and isinstance(msg, RegionReport):
            wire = msg.to_wire()
            wire.update(rng.choice([{"best_loss": -1.0}, {"best_importance": float("inf")},
                                    {"lowest_energy": float("nan")}, {"slowest": {"a": -1.0}},
                                    {"slowest": {"a": 1.0, "b": 1.0, "c": 1.0}}, {"best_loss": "0.5"}]))
            yield "out-of-range round statistics (negative, Inf/NaN, three slowest, a string)", topic, \
                _pack(wire, False), "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, msg.to_wire(), as_json=False), topic)


def _region_event(kind: str, types: tuple[type, ...], region: bool = True):
    def check(cls: str, topic: str, payload: bytes, item: Any) -> None:
        ev_kind, rid, msg = item
        assert ev_kind == kind and isinstance(msg, types), (cls, item)
        if region:
            assert rid == topic.split("/")[3] == msg.region_id, (cls, item)
        msg.__post_init__()
    return check


def test_fuzz_coordinator_region_report(coordinator, reliability) -> None:
    st = _fuzz_coordinator(coordinator, coordinator._handle_region_report, region_plan_cases(random.Random(SEED + 11)),
                           _region_event("region_report", (RegionPlan, RegionReport)))
    assert st.accepted["valid region plan or report (control)"] > 0
    record(reliability, "coordinator region report", st)


@pytest.fixture
def region() -> Region:
    cfg = RegionConfig.from_dict({"broker": {"url": "mqtt://localhost:1883"}, "region": {"region_id": REGION}})
    return Region(cfg, transport=MemoryTransport(MemoryBus(), f"region-{REGION}"))


def plan_query_cases(rng: random.Random) -> Iterator[Case]:
    topic = f"{ROOT}/region/{REGION}/config"
    for _ in range(N):
        per_node = {} if rng.random() < 0.5 else {  # FedSpine's stages, with its settings and the fleet's statistics
            "stage": rng.choice(["timing", "choose", "learn"]), "caps": {"agx": 0.4, "default": 0.5},
            "ranks": [2, 4, 8, 16], "reward": {"loss": 1.0, "time": 1.0}, "total_rounds": rng.randrange(1, 50),
            "seed": rng.randrange(-5, 5), "cut": rng.random() < 0.5,
            "slowest_at_tau": rng.choice([{}, {"tx2-3": 61.5, "nx-2": 30.0}]), "learn_round": rng.randrange(0, 9),
            "learn_regions": rng.choice([[], [REGION, "west"]]), "best_loss": rng.random(),
            "best_importance": rng.random() * 10, "lowest_energy": rng.choice([None, rng.random()]),
            "slowest": rng.choice([{}, {"tx2-3": 60.0}])}
        q = RegionPlanQuery(run_id="r1", round=rng.randrange(0, 100), attempt=rng.randrange(0, 4),
                            target_sparsity=rng.random() * 0.9, rank=rng.choice([1, 2, 4, 8, 16]),
                            local_steps=rng.randrange(1, 100),
                            tier_ranks=rng.choice([{}, {"agx": 16, "nx": 8, "tx2": 4}]), **per_node)
        valid, wire = encode(q), q.to_wire()
        r = rng.random()
        if r < 0.1:
            yield "valid plan query (control)", topic, valid, "accept"
        elif r < 0.2:
            wire.update(rng.choice([{"rank": 0}, {"rank": 10**6}, {"target_sparsity": 1.0}, {"target_sparsity": -0.1},
                                    {"target_sparsity": float("nan")}, {"local_steps": 0}, {"local_steps": -1},
                                    {"tier_ranks": {"agx": 0}}, {"tier_ranks": {"": 4}}, {"tier_ranks": [4]},
                                    {"attempt": -1}, {"round": -1}, {"stage": "vote"}, {"ranks": [0]},
                                    {"ranks": list(range(1, 100))}, {"caps": {"agx": 1.0}}, {"reward": {"loss": -1.0}},
                                    {"slowest_at_tau": {"a": 1.0, "b": 1.0, "c": 1.0}}, {"slowest": {"a/b": 1.0}},
                                    {"learn_regions": ["a b"]}, {"best_importance": float("inf")},
                                    {"lowest_energy": -1.0}, {"stage": "choose", "ranks": []}]))
            yield "out-of-range plan query (rank 0/10^6, sparsity 1/-0.1/NaN, τ 0, bad tier ranks, stage, arms, caps, " \
                "weights, statistics, …)", topic, _pack(wire, False), "reject"
        else:
            yield _fix(structural_or_bytes(rng, valid, wire, as_json=False), topic)


def test_fuzz_region_config(region, reliability) -> None:
    r = region

    def snap() -> Any:
        return r.events.qsize(), reasm_state(r.reassembler), r.round, r.registry.state_dict()

    st = run_fuzz(r._on_round, plan_query_cases(random.Random(SEED + 12)), snap, lambda: _drain(r.events),
                  _region_event("plan_query", (RegionPlanQuery,), region=False))
    assert st.accepted["valid plan query (control)"] > 0
    record(reliability, "region config", st)


# ---- upload acceptance: the reassembled LoRA update --------------------------------------------------------
def _update(rng: random.Random, rank: int) -> LoraUpdate:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    kept = rng.randint(1, 8)
    m = ModuleUpdate(A=torch.randn(rank, 4, generator=g) * 0.1, B=torch.randn(kept, rank, generator=g) * 0.1,
                     rows=torch.arange(kept), cols=torch.arange(4), shape=(8, 4), scale=16.0 / rank)
    imp = {"0.heads": GroupScores(idx=torch.arange(3), score=torch.rand(3, generator=g), size=4)}
    return LoraUpdate({"layer.q": m}, {"classifier.weight": torch.ones(2, 4)}, imp)


def _raw_tensors(u: LoraUpdate) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in u.modules.items():
        out.update({f"lora.{name}.A": m.A, f"lora.{name}.B": m.B, f"lora.{name}.rows": m.rows,
                    f"lora.{name}.cols": m.cols, f"lora.{name}.shape": torch.tensor(m.shape, dtype=torch.int64),
                    f"lora.{name}.scale": torch.tensor([m.scale])})
    out.update({f"dense.{k}": v for k, v in u.dense.items()})
    for k, g in u.importance.items():
        out.update({f"importance.{k}.idx": g.idx, f"importance.{k}.score": g.score,
                    f"importance.{k}.size": torch.tensor([g.size], dtype=torch.int64)})
    return out


def update_cases(rng: random.Random, rank: int) -> Iterator[tuple[str, bytes, str]]:
    from shared.updates import FORMAT, FORMAT_VERSION

    meta = {"format": FORMAT, "version": FORMAT_VERSION}
    pool = [(u.to_bytes(), _raw_tensors(u)) for u in (_update(rng, rank) for _ in range(16))]
    for _ in range(N):
        valid, raw = rng.choice(pool)
        r = rng.random()
        if r < 0.1:
            yield "valid update (control)", valid, "accept"
            continue
        if r < 0.2:
            cls, data, _ = mutate_bytes(rng, valid)
            yield cls, data, "any" if cls in ("bit flips", "trailing garbage") else "reject"  # may hit tensor data
            continue
        t = {k: v.clone() for k, v in raw.items()}
        key = "lora.layer.q"
        op = rng.randrange(13)
        if op == 0:
            t[f"{key}.{rng.choice('AB')}"].view(-1)[0] = rng.choice([float("nan"), float("inf"), -float("inf")])
            cls = "NaN/Inf in A or B"
        elif op == 1:
            t["dense.classifier.weight"][0, 0] = float("nan")
            cls = "NaN in a dense tensor"
        elif op == 2:
            part = rng.choice("AB")
            t[f"{key}.{part}"] = t[f"{key}.{part}"].to(rng.choice([torch.int32, torch.int8, torch.bool, torch.uint8]))
            cls = "integer/bool dtype for A or B"
        elif op == 3:
            part = rng.choice(["rows", "cols", "shape"])
            t[f"{key}.{part}"] = t[f"{key}.{part}"].to(rng.choice([torch.int32, torch.float32]))
            cls = "non-int64 index tensors"
        elif op == 4:
            t[f"{key}.A"] = torch.randn(rank + 1, 4)
            cls = "A/B shapes disagree (rank)"
        elif op == 5:
            t[f"{key}.rows"] = torch.tensor(rng.choice([[9], [-1], [3, 1], [2, 2], []]), dtype=torch.int64)
            cls = "indices out of range, negative, unsorted, repeated or empty"
        elif op == 6:
            t[f"{key}.shape"] = torch.tensor(rng.choice([[0, 4], [-8, 4], [2**40, 4], [8, 4, 1]]), dtype=torch.int64)
            cls = "shape zero, negative, huge or 3-d"
        elif op == 7:
            t[f"{key}.scale"] = torch.tensor([rng.choice([0.0, -1.0, float("nan"), float("inf")])])
            cls = "scale zero, negative, NaN or Inf"
        elif op == 8:
            del t[f"{key}.{rng.choice(['A', 'B', 'rows', 'cols', 'shape', 'scale'])}"]
            cls = "missing tensor"
        elif op == 9:
            t[rng.choice(["evil", "lora.", "lora.x.C", "lora.layer q.A"])] = torch.zeros(1)
            cls = "unexpected tensor names"
        elif op == 10:
            t[f"{key}.A"] = torch.randn(rank, 4, 1)
            cls = "A or B not a matrix"
        elif op == 11:
            imp = "importance.0.heads"
            bad = rng.randrange(6)
            if bad == 0:
                t[f"{imp}.score"][0] = rng.choice([float("nan"), float("inf"), -1.0])
            elif bad == 1:
                t[f"{imp}.idx"] = torch.tensor(rng.choice([[0, 1, 4], [-1, 0, 1], [2, 1, 0], [1, 1, 2]]))
            elif bad == 2:
                t[f"{imp}.size"] = rng.choice([torch.tensor([0]), torch.tensor([4, 4]), torch.tensor([4.0])])
            elif bad == 3:
                del t[f"{imp}.{rng.choice(['idx', 'score', 'size'])}"]
            elif bad == 4:
                t[f"{imp}.score"] = torch.rand(rng.choice([2, 4]))
            else:
                t[rng.choice(["importance.x.heads.idx", "importance.0.ffn.idx", "importance.0.heads.max"])] = \
                    torch.zeros(3, dtype=torch.int64)
            cls = "importance: NaN/negative score, bad indices, size, missing part, length or key"
        else:
            cls = "wrong metadata (format/version)"
            yield cls, st_save(t, metadata=rng.choice([{}, {"format": "other", "version": "1"},
                                                       {**meta, "version": "99"}])), "reject"
            continue
        yield cls, st_save(t, metadata=meta), "reject"


def test_fuzz_upload_acceptance(coordinator, reliability) -> None:
    """Complete transfers of hostile LoraUpdate bytes go through ``_accept`` (from_bytes + strategy checks)."""
    c = coordinator
    nodes = [NodeInfo(node_id=n, device_type="nx", memory_mb=4096) for n in (NODE, OTHER)]
    a = next(x for x in c.strategy.configure_round(1, nodes) if x.node_id == NODE)
    sent = RoundConfig(run_id=c.run_id, round=1, target_sparsity=a.target_sparsity, rank=a.rank,
                       local_steps=a.local_steps, deadline_ts=time.time() + 60, upload_transfer_id=TID,
                       download_transfer_id=None)
    before = c.strategy.state_dict()
    stats = Stats()
    log = c.log.bind(round=1)
    with capture_logs() as logs:
        for cls, data, expect in update_cases(random.Random(SEED + 8), a.rank):
            p = _Pending(assignment=a, upload_tid=TID, sent_at=time.monotonic(), config=sent)
            p.report = RoundReport(run_id=c.run_id, round=1, node_id=NODE, status="ok", transfer_id=TID,
                                   upload_bytes=len(data), samples=10, rank=a.rank)
            p.payload, p.received_at = data, time.monotonic()
            n0 = len(logs)
            try:
                res = c._accept(p, log)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"{cls}: _accept raised {exc!r}") from exc
            warnings = [e for e in logs[n0:] if e["log_level"] == "warning"]
            stats.classes[cls] += 1
            if isinstance(res, NodeResult):
                assert expect in ("accept", "any") and not warnings, (cls, warnings)
                assert res.update.modules["layer.q"].rank == a.rank
                stats.accepted[cls] += 1
            else:
                assert expect in ("reject", "any") and res.reason == "rejected", (cls, res)
                assert len(warnings) == 1 and warnings[0]["event"] == "update_rejected" and warnings[0]["error"], \
                    (cls, logs[n0:])
                stats.rejected[cls] += 1
    assert tensors_equal(before, c.strategy.state_dict())
    assert c.events.empty() and stats.total >= N and stats.accepted["valid update (control)"] > 0
    record(reliability, "upload acceptance (LoraUpdate)", stats)
