"""The round bookkeeping the root and every region share (coordinator/collect.py), without a broker: a fake
transport, reassembler and clock."""

from __future__ import annotations

from coordinator.collect import OFFLINE_GRACE_S, SCAN_EVERY_S, Participant, RoundCollector
from coordinator.strategies.base import Failure
from shared.messages import ExportReport, ResendRequest, RoundConfig, RoundReport, decode
from shared.topics import Topics

RUN, RND = "run1", 3
TOPICS = Topics("fedspine/v1/region/east")


class FakeTransport:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.resent: list[tuple[str, ResendRequest]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def resend(self, topic: str, req: ResendRequest) -> None:
        self.resent.append((topic, req))

    def on(self, kind: str) -> list[str]:
        """The nodes sent something on their ``kind`` topic, in order."""
        return [t.split("/")[-2] for t, _ in self.published if t.endswith("/" + kind)]


class FakeReassembler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.stalled: set[str] = set()  # transfers whose resend_request answers

    def forget(self, tid: str) -> None:
        self.calls.append(("forget", tid))

    def expect(self, tid: str, sender: str) -> None:
        self.calls.append(("expect", tid))

    def resend_request(self, tid: str, requester: str) -> ResendRequest | None:
        self.calls.append(("resend_request", tid))
        return ResendRequest(transfer_id=tid, requester=requester, missing=[1]) if tid in self.stalled else None


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def info(self, event: str, **kw) -> None:
        self.lines.append({"event": event, "level": "info", **kw})

    def warning(self, event: str, **kw) -> None:
        self.lines.append({"event": event, "level": "warning", **kw})

    def events(self) -> list[tuple[str, str]]:
        return [(e["event"], e.get("node", "")) for e in self.lines]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _setup(nodes=("a", "b"), **kw):
    parts = {n: Participant(config=_config(n), upload_tid=_tid(n), sent_at=100.0) for n in nodes}
    accepted: list[str] = []

    def accept(p: Participant):
        accepted.append(p.report.node_id)
        return Failure(p.report.node_id, "rejected") if p.payload == b"bad" else ("result", p.report.node_id)

    t, r, log, clock = FakeTransport(), FakeReassembler(), FakeLog(), Clock()
    col = RoundCollector(parts, run_id=RUN, round=RND, accept=accept, transport=t, reassembler=r, topics=TOPICS,
                         log=log, clock=clock, **kw)
    return col, parts, accepted, t, r, log, clock


def _tid(n: str) -> str:
    return f"{RUN}.r{RND}.a0.{n}.up"


def _config(n: str) -> RoundConfig:
    return RoundConfig(run_id=RUN, round=RND, target_sparsity=0.1, rank=4, local_steps=2, deadline_ts=1e9,
                       upload_transfer_id=_tid(n), download_transfer_id=f"{RUN}.r{RND}.a0.{n}.down")


def _report(n: str, **kw) -> RoundReport:
    return RoundReport(**{"run_id": RUN, "round": RND, "node_id": n, "status": "ok", "transfer_id": _tid(n), **kw})


def test_a_participant_offline_has_failed_after_the_grace_and_not_before():
    col, _, _, _, _, log, clock = _setup()
    col.on_status("a", live=False)
    clock.t += OFFLINE_GRACE_S - 0.1
    col.scan(clock.t)
    assert col.open == {"a", "b"} and not col.failures
    clock.t += 0.1
    col.scan(clock.t)
    assert col.open == {"b"} and col.failures == {"a": Failure("a", "offline")}
    assert log.events() == [("participant_offline", "a"), ("node_round_failed", "a")]
    assert log.lines[-1]["status"] == "offline"
    results, failures = col.finish()
    assert results == {} and failures == {"a": Failure("a", "offline"), "b": Failure("b", "timeout")}


def test_a_participant_back_before_it_reported_gets_its_config_and_slice_again_and_is_not_failed():
    col, _, _, t, r, log, clock = _setup()
    col.on_status("a", live=False)
    clock.t += 5
    col.on_status("a", live=True)
    assert t.on("config") == ["a"] and decode(t.published[0][1], RoundConfig) == _config("a")
    assert t.resent == [(TOPICS.node("a", "download"), ResendRequest(
        transfer_id=_config("a").download_transfer_id, requester="a", missing=[]))]
    assert r.calls == [("forget", _tid("a")), ("expect", _tid("a"))]  # the upload starts afresh
    clock.t += OFFLINE_GRACE_S
    col.scan(clock.t)
    assert col.open == {"a", "b"}
    assert log.events() == [("participant_offline", "a"), ("participant_back", "a")]
    # one that reported, left and came back is not sent the round again (and not failed: it is back)
    col.on_report("b", _report("b"))
    col.on_status("b", live=False)
    col.on_status("b", live=True)
    clock.t += OFFLINE_GRACE_S
    col.scan(clock.t)
    assert t.on("config") == ["a"] and col.open == {"a", "b"}


def test_a_report_and_its_upload_in_either_order_are_accepted_once():
    col, parts, accepted, _, _, log, clock = _setup(("a", "b", "c"))
    col.on_report("a", _report("a"))
    clock.t += 2
    col.on_upload("a", _tid("a"), b"A", "sha-a")
    col.on_upload("b", _tid("b"), b"B")
    col.on_report("b", _report("b"))
    col.on_upload("c", _tid("c"), b"bad")
    col.on_report("c", _report("c"))
    assert accepted == ["a", "b", "c"] and col.open == set()
    assert parts["a"].payload == b"A" and parts["a"].digest == "sha-a" and parts["a"].received_at == 102.0
    col.on_report("a", _report("a"))  # duplicates: dropped, never judged again
    col.on_upload("b", _tid("b"), b"B")
    col.on_report("x", _report("x"))  # not a participant
    assert accepted == ["a", "b", "c"]
    assert log.events() == [("late_or_duplicate_dropped", "a"), ("late_or_duplicate_dropped", "b"),
                            ("late_or_duplicate_dropped", "x")]
    results, failures = col.finish()
    assert results == {"a": ("result", "a"), "b": ("result", "b")} and failures == {"c": Failure("c", "rejected")}


def test_a_report_or_upload_of_another_transfer_is_waited_past():
    col, _, accepted, _, _, log, _ = _setup(("a",))
    col.on_report("a", _report("a", transfer_id="run1.r3.a0.a.up.old"))
    col.on_upload("a", "run1.r3.a0.a.up.old", b"old")
    assert col.open == {"a"} and not col.failures
    assert [(e["event"], e["level"]) for e in log.lines] == [("report_rejected", "warning"),
                                                              ("upload_rejected", "warning")]
    col.on_report("a", _report("a"))
    col.on_upload("a", _tid("a"), b"A")
    assert accepted == ["a"] and col.results == {"a": ("result", "a")}


def test_a_stale_report_is_dropped_and_an_export_report_is_no_answer():
    col, _, _, _, _, log, _ = _setup(("a",))
    col.on_report("a", _report("a", round=RND - 1))
    col.on_report("a", _report("a", run_id="other"))
    col.on_report("a", ExportReport(run_id=RUN, node_id="a", status="ok"))
    assert col.open == {"a"} and col.participants["a"].report is None
    assert log.events() == [("stale_report_dropped", "a")] * 2 + [("export_report_outside_export", "a")]


def test_a_report_of_failure_fails_the_node_with_its_status():
    col, _, accepted, _, _, log, _ = _setup(("a",))
    col.on_report("a", _report("a", status="oom", error="CUDA out of memory"))
    assert col.open == set() and col.failures == {"a": Failure("a", "oom")} and accepted == []
    assert log.lines == [{"event": "node_round_failed", "level": "warning", "node": "a", "status": "oom",
                          "error": "CUDA out of memory"}]


def test_whoever_is_open_at_the_deadline_has_timed_out():
    col, _, _, _, _, _, _ = _setup(("a", "b"))
    col.on_report("a", _report("a"))  # reported, upload never came
    results, failures = col.finish()
    assert results == {} and failures == {"a": Failure("a", "timeout"), "b": Failure("b", "timeout")}
    assert col.open == set()


def test_a_stalled_upload_of_a_node_that_reported_is_asked_for_at_most_twice_a_second():
    col, _, _, t, r, _, clock = _setup(("a", "b"))
    r.stalled = {_tid("a"), _tid("b")}
    col.on_report("a", _report("a"))  # b has not reported: its upload is not asked for
    col.scan(clock.t)
    col.scan(clock.t + SCAN_EVERY_S / 2)
    assert t.on("resend") == ["a"]
    col.scan(clock.t + SCAN_EVERY_S)
    assert t.on("resend") == ["a", "a"]
    col.on_upload("a", _tid("a"), b"A")
    col.scan(clock.t + 2 * SCAN_EVERY_S)
    assert t.on("resend") == ["a", "a"]
