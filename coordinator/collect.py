"""One round's per-node bookkeeping while it is collected, for the root (server.Coordinator._collect) and for each
region (region.Region._collect).

A participant is open until its answer was accepted or refused, or it failed.  Its answer is a RoundReport paired
with its upload by the round's upload transfer id, in either order; both together go through the caller's
acceptance rule (``accept_answer`` in both callers) once.  A report of another run or round is dropped, a report
with a status other than ``ok`` fails the node with that status, and one naming another transfer is logged and
waited past (the node's real report can still come).  A participant that goes offline has failed once it stayed
away ``grace_s`` (``OFFLINE_GRACE_S``); one that comes back before it reported may have restarted and lost the
round, so it is sent its configuration and slice again (``send_round_again``).  A node that reported but whose
upload stalls is asked for the missing chunks.  Whoever is still open when the caller stops collecting (its
deadline) has timed out.

The collector does no I/O of its own: it publishes with the transport, asks the reassembler and logs with what it
is given, and reads the time from ``clock``.  The caller's loop takes the events off its queue, handles what is not
this bookkeeping (presence in its registry, download resend requests, anything else that arrives) and calls
``on_status`` / ``on_report`` / ``on_upload`` with the rest, ``scan`` after each wait and ``finish`` at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from coordinator.strategies.base import Failure, NodeResult
from shared.chunking import Reassembler
from shared.messages import ExportReport, ResendRequest, RoundConfig, RoundReport, encode
from shared.topics import COORDINATOR_ID, Topics

# A participant that goes offline during a round is waited for this long before it counts as failed: when a broker
# member dies, clients on the surviving members can be disconnected too while it re-elects its leaders, and their
# wills fire, though they are back within seconds (docs/brokers.md).
OFFLINE_GRACE_S = 20.0
SCAN_EVERY_S = 0.5  # stalled uploads are looked for twice a second, not after every message (O(n) each)


def quorum_count(share: float, n: int) -> int:
    """How many of a round's ``n`` participants must answer for it to count: the quorum ``share`` of them rounded
    up, and at least one.  The root's flat and hierarchical rounds and each region's (region.py) use it."""
    return max(1, math.ceil(share * n - 1e-9))  # 0.07 × 100 is 7.000000000000001 in floating point


def send_round_again(transport, reassembler: Reassembler, topics: Topics, node_id: str, cfg: RoundConfig) -> None:
    """A participant back from offline before it reported may have restarted and lost the round (its
    configuration and slice went to a dead process): send both again, so the round does not wait to its deadline
    for an answer that cannot come.  A restarted node trains again and sends a different payload under the same
    transfer id, so the upload starts afresh (chunks kept would lock it onto the dead process's payload); a node
    that only lost its link finishes its work, answers the repeat with its report, resends what is missing when
    asked and drops the slice's duplicate chunks."""
    reassembler.forget(cfg.upload_transfer_id)
    reassembler.expect(cfg.upload_transfer_id, node_id)
    transport.publish(topics.node(node_id, "config"), encode(cfg), qos=1)
    if cfg.download_transfer_id:  # every chunk (an empty list asks for all)
        transport.resend(topics.node(node_id, "download"), ResendRequest(
            transfer_id=cfg.download_transfer_id, requester=node_id, missing=[]))


@dataclass(kw_only=True)
class Participant:
    """One participant's round: its configuration as sent (sent again if it comes back from offline) and when
    (monotonic; its round time runs from then), and its answer as it arrives."""

    config: RoundConfig
    upload_tid: str  # the config's upload_transfer_id
    sent_at: float
    report: RoundReport | None = None
    payload: bytes | None = None
    digest: str = ""  # sha256 of the payload, checked by the reassembler ("" where the caller does not keep it)
    received_at: float = 0.0


class RoundCollector:
    """The bookkeeping of one round's ``participants`` (node id -> Participant, updated in place) of run ``run_id``.

    ``accept`` judges a complete answer (report and payload in): a NodeResult, or a Failure (it logs why).  The
    root and the regions write the same lines: presence changes (``participant_offline``, ``participant_back``),
    dropped answers (``late_or_duplicate_dropped``, ``upload_rejected``, ``stale_report_dropped``, ``report_rejected``)
    and failures (``node_round_failed`` with the status, ``offline`` for one that stayed away past its grace)."""

    def __init__(self, participants: Mapping[str, Participant], *, run_id: str, round: int,
                 accept: Callable[[Participant], NodeResult | Failure], transport, reassembler: Reassembler,
                 topics: Topics, log, grace_s: float = OFFLINE_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.participants = participants
        self.run_id, self.round = run_id, round
        self.accept = accept
        self.transport, self.reassembler, self.topics, self.log = transport, reassembler, topics, log
        self.grace_s, self.clock = grace_s, clock
        self.open: set[str] = set(participants)  # neither accepted, refused nor failed yet
        self.results: dict[str, NodeResult] = {}
        self.failures: dict[str, Failure] = {}
        self._gone: dict[str, float] = {}  # participants offline since (clock): failed after grace_s
        self._next_scan = 0.0

    def on_status(self, node_id: str, live: bool) -> None:
        """A presence change, after the caller applied it to its registry (``live``: the node is live now)."""
        if node_id in self.open and not live:
            self._gone.setdefault(node_id, self.clock())
            self.log.info("participant_offline", node=node_id, grace_s=self.grace_s)
        elif live and self._gone.pop(node_id, None) is not None:
            self.log.info("participant_back", node=node_id)
            p = self.participants.get(node_id)
            if p is not None and node_id in self.open and p.report is None:
                send_round_again(self.transport, self.reassembler, self.topics, node_id, p.config)

    def on_report(self, node_id: str, report: RoundReport | ExportReport) -> None:
        p = self.participants.get(node_id)
        if p is None or node_id not in self.open:
            self._dropped("report", node_id)
        elif isinstance(report, ExportReport):
            self.log.info("export_report_outside_export", node=node_id)
        elif report.run_id != self.run_id or report.round != self.round:
            self.log.info("stale_report_dropped", node=node_id, report_round=report.round)
        elif report.status != "ok":
            self._fail(node_id, report.status)
            self.log.warning("node_round_failed", node=node_id, status=report.status, error=report.error)
        elif report.transfer_id != p.upload_tid:  # not this round's upload: waited past, not failed
            self.log.warning("report_rejected", node=node_id, error=f"transfer {report.transfer_id!r} != {p.upload_tid!r}")
        else:
            p.report = report
            self._settle(node_id, p)

    def on_upload(self, node_id: str, transfer_id: str, data: bytes, digest: str = "") -> None:
        """A complete, digest-verified upload (``digest``: its sha256, kept for the caller)."""
        p = self.participants.get(node_id)
        if p is None or node_id not in self.open:
            self._dropped("upload", node_id)
        elif transfer_id != p.upload_tid:
            self.log.warning("upload_rejected", node=node_id, transfer=transfer_id, error="unexpected transfer id")
        else:
            p.payload, p.digest, p.received_at = data, digest, self.clock()
            self._settle(node_id, p)

    def scan(self, now: float) -> None:
        """Fail the participants offline for longer than the grace; ask those that reported but whose upload
        stalls for the missing chunks (at most every SCAN_EVERY_S)."""
        for node_id in [n for n, t in self._gone.items() if now - t >= self.grace_s and n in self.open]:
            self._fail(node_id, "offline")
            self.log.warning("node_round_failed", node=node_id, status="offline", grace_s=self.grace_s)
        if now < self._next_scan:
            return
        self._next_scan = now + SCAN_EVERY_S
        for node_id in sorted(self.open):
            p = self.participants[node_id]
            if p.report is None or p.payload is not None:
                continue
            req = self.reassembler.resend_request(p.upload_tid, COORDINATOR_ID)
            if req is not None:
                self.transport.publish(self.topics.node(node_id, "resend"), encode(req), qos=1)

    def finish(self) -> tuple[dict[str, NodeResult], dict[str, Failure]]:
        """Every participant still open has timed out: (node -> accepted result, node -> failure)."""
        for node_id in sorted(self.open):
            self.failures[node_id] = Failure(node_id, "timeout")
        self.open.clear()
        return self.results, self.failures

    def _settle(self, node_id: str, p: Participant) -> None:
        """Judge the node's answer once both halves are in."""
        if p.report is None or p.payload is None:
            return
        res = self.accept(p)
        self.open.discard(node_id)
        if isinstance(res, Failure):
            self.failures[node_id] = res
        else:
            self.results[node_id] = res

    def _fail(self, node_id: str, reason: str) -> None:
        self.failures[node_id] = Failure(node_id, reason)
        self.open.discard(node_id)

    def _dropped(self, kind: str, node_id: str) -> None:
        self.log.info("late_or_duplicate_dropped", kind=kind, node=node_id)
