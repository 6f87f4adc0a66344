"""The coordinator service: wires the registry, the strategy and checkpoints to MQTT and runs the rounds.

The round loop reads like a recipe: configure (the strategy) -> send configs and global slices -> collect uploads
until all arrived or the deadline passed -> aggregate (if the quorum is met; the strategy learns from the round) ->
checkpoint -> one log line.  While regional aggregators are online the rounds go to them instead
(``_run_region_round``): each region gets the strategy's fleet-wide plan, or for a per-node method (FedSpine) runs
that policy for its own nodes with the fleet's statistics the root merges and sends back (``_choose_in_regions``),
and answers with one partial aggregate (coordinator/region.py, docs/scale.md).  MQTT callbacks only decode and
enqueue; everything else runs on the main thread.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save as st_save

from coordinator.aggregation import Partial
from coordinator.collect import OFFLINE_GRACE_S, Participant, RoundCollector, quorum_count
from coordinator.config import CoordinatorConfig
from coordinator.metrics import MetricsWriter
from coordinator.registry import FleetIdentity, Registry, identity_of
from coordinator.reward import RoundStats, merge_stats, slowest_two
from coordinator.state import CheckpointStore
from coordinator.strategies import Assignment, Failure, FleetPlan, NodeResult, accept_answer, make_strategy
from shared.chunking import Reassembler
from shared.logs import LiveRoundLogger, get_logger
from shared.messages import (
    Chunk,
    Command,
    CoordinatorStatus,
    ExportReport,
    NodeStatus,
    RegionExport,
    RegionPlan,
    RegionPlanQuery,
    RegionReport,
    RegionRound,
    RegionStatus,
    ResendRequest,
    RoundConfig,
    RoundReport,
    decode_from,
    encode,
)
from shared.topics import COORDINATOR_ID
from shared.transport import CHUNK_OVERHEAD, MqttTransport
from shared.updates import UpdateError, UpdateLimits


@dataclass(kw_only=True)
class _Pending(Participant):
    """One participant's state within the round being collected, with the assignment it was configured by."""

    assignment: Assignment


@dataclass
class RunSummary:
    run_id: str
    method: str
    rounds_done: int
    stopped_early: str = ""
    exports: dict[str, ExportReport] = field(default_factory=dict)
    region_exports: dict[str, RegionExport] = field(default_factory=dict)  # hierarchical: each region's summary


FINISHED_FILE = "finished"  # in state_dir: the run id whose final sync and exports are done
WAIT_LOG_S = 60.0  # while waiting for nodes, one line this often
MAX_RETRIES = 3  # a round below quorum is retried this often, then training stops
PLAN_QUERY_S = 10.0  # the most a hierarchical round waits for regions' RegionPlan answers before it starts


class Coordinator:
    """One coordinator process. ``transport`` may be injected (tests use an in-memory bus)."""

    def __init__(self, cfg: CoordinatorConfig, *, transport=None, log=None) -> None:
        self.cfg = cfg
        rs = cfg.coordinator
        self.topics = cfg.broker.topics
        # every line says which round is being collected, or the last one completed (0 before the first)
        self.log = LiveRoundLogger((log or get_logger("coordinator")).bind(node_id=COORDINATOR_ID),
                                   lambda: self._active or self.round)
        self.state_dir = Path(rs.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(self.state_dir)
        self.metrics = MetricsWriter(rs.metrics_file)
        self.registry = Registry()
        self.strategy = make_strategy(cfg, total_rounds=rs.rounds, seed=rs.seed)
        self.limits = UpdateLimits()
        self.reassembler = Reassembler(max_bytes=self.limits.max_bytes, timeout_s=max(rs.deadline_s, 60.0))
        self.events: queue.Queue = queue.Queue()
        self.chunk_limit = cfg.broker.chunk_size + CHUNK_OVERHEAD
        self.run_id = uuid.uuid4().hex[:12]
        self.round = 0  # the last completed round
        self._active = 0  # the round being collected right now (0 between rounds)
        self._last: dict[str, Assignment] = {}  # each node's latest assignment (for the final sync)
        # the fleet's class names (classification) and base model digest: pinned by config, else the first seen
        self.identity = FleetIdentity(labels=tuple(rs.labels) or None, base_model=rs.base_model or None)
        self._regions: dict[str, RegionStatus] = {}  # regional aggregators' presence (coordinator/region.py)
        # A per-node method under regions: the last aggregated round, the regions whose partials it applied and the
        # merge of their nodes' statistics, which the regions learn from before the next round's choice
        self._fleet_stats: tuple[int, list[str], RoundStats | None] = (0, [], None)
        # region -> ((target sparsity, rank) of the plan it was asked about, its nodes' slowest completion at τ steps
        # under it): from its last RegionReport, for pacing the next hierarchical round (_fleet_finish)
        self._region_finish: dict[str, tuple[tuple[float, int], float]] = {}
        self._stop = threading.Event()
        status_off = encode(CoordinatorStatus(state="offline", ts=time.time(), run_id=self.run_id))
        self.transport = transport or MqttTransport(
            cfg.broker, client_id=f"fedspine-{COORDINATOR_ID}", will=(self.topics.coordinator_status, status_off),
            on_connect=self._on_connect, log=self.log.bind(logger="transport"), persistent=True,
        )

    # ---- network thread: decode and enqueue only ------------------------------------------------------
    def _on_connect(self) -> None:
        self._publish_status("online")

    def _handle_status(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.sender(topic, "status", self.log)
        if node_id is None or not payload:  # an empty retained message clears a status: nothing to learn
            return
        # a presence that does not name its topic's node cannot be attributed: logged (warning) and dropped
        status = decode_from(payload, NodeStatus, topic=topic, log=self.log, sender=node_id, event="presence_unattributed")
        if status is not None:
            self.events.put(("status", node_id, status))

    def _handle_report(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.sender(topic, "report", self.log)
        msg = node_id and decode_from(payload, (RoundReport, ExportReport), topic=topic, log=self.log, sender=node_id)
        if msg:
            self.events.put(("report", node_id, msg))

    def _handle_upload(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.sender(topic, "upload", self.log)
        chunk = node_id and decode_from(payload, Chunk, topic=topic, log=self.log, max_bytes=self.chunk_limit,
                                          event="chunk_rejected")
        if not chunk:
            return
        whole = self.reassembler.feed(chunk, node_id)  # logs its own rejections (sender, digest, unknown…)
        if whole is not None:
            self.events.put(("upload", node_id, (chunk.transfer_id, whole, chunk.digest)))  # digest: verified

    def _handle_missing(self, topic: str, payload: bytes) -> None:
        node_id = self.topics.sender(topic, "missing", self.log)
        req = node_id and decode_from(payload, ResendRequest, topic=topic, log=self.log, sender=node_id,
                                      sender_field="requester")
        if req:
            self.events.put(("missing", node_id, req))

    def _handle_region_status(self, topic: str, payload: bytes) -> None:
        rid = self.topics.sender(topic, "status", self.log, field="region")
        st = rid and payload and decode_from(payload, RegionStatus, topic=topic, log=self.log, sender=rid,
                                             sender_field="region_id")
        if st:  # one dict item replaced (atomic): the main thread reads a consistent snapshot of each region
            self._regions[rid] = st

    def _handle_region_report(self, topic: str, payload: bytes) -> None:
        rid = self.topics.sender(topic, "report", self.log, field="region")
        msg = rid and decode_from(payload, (RegionReport, RegionExport, RegionPlan), topic=topic, log=self.log, sender=rid,
                                  sender_field="region_id")
        if msg:
            self.events.put(("region_report", rid, msg))

    def _handle_region_upload(self, topic: str, payload: bytes) -> None:
        rid = self.topics.sender(topic, "upload", self.log, field="region")
        chunk = rid and decode_from(payload, Chunk, topic=topic, log=self.log, max_bytes=self.chunk_limit,
                                    event="chunk_rejected")
        whole = self.reassembler.feed(chunk, rid) if chunk else None
        if whole is not None:
            self.events.put(("region_upload", rid, (chunk.transfer_id, whole)))

    def _handle_region_missing(self, topic: str, payload: bytes) -> None:
        rid = self.topics.sender(topic, "missing", self.log, field="region")
        req = rid and decode_from(payload, ResendRequest, topic=topic, log=self.log, sender=rid,
                                  sender_field="requester")
        if req:
            self.events.put(("region_missing", rid, req))

    # ---- main thread --------------------------------------------------------------------------------
    def _publish_status(self, state: str) -> None:
        msg = CoordinatorStatus(state=state, ts=time.time(), run_id=self.run_id, round=self.round,
                                method=self.cfg.coordinator.method)
        self.transport.publish(self.topics.coordinator_status, encode(msg), qos=1, retain=True)

    def stop(self) -> None:
        self._stop.set()

    def _drain(self, timeout: float) -> tuple | None:
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def _fits(self, node_id: str, status: NodeStatus) -> bool:
        """May the node train in this fleet?  Its classification head must have the fleet's class list and its base
        model the fleet's digest (``FleetIdentity``): the first of each seen (or the configured one) becomes the
        fleet's and is checkpointed; a node with another is refused, with one error line (again only if it changes)."""
        if status.state != "online":
            return True  # a node leaving
        got = identity_of(status.labels, status.base_model)
        wrong = self.identity.admit(node_id, got, self.log)
        if wrong:  # the node is told too, so that its own host's log says why it gets no rounds
            self.transport.publish(self.topics.node(node_id, "config"),
                                   encode(self.identity.refusal(node_id, got, wrong)), qos=1)
        return not wrong

    def _apply_status(self, node_id: str, status: NodeStatus) -> None:
        # A node that joins while a round is collected takes part from the next one.
        if not self._fits(node_id, status):
            status = dataclasses.replace(status, state="offline")  # refused: as if gone (it leaves, if it was live)
        change = self.registry.apply(status, time.time(), self._active or self.round)
        if change in ("joined", "left"):
            self.log.info(f"node_{change}", node=node_id, device_type=status.device_type, live=self.registry.live_count())

    def run(self) -> RunSummary:
        rs = self.cfg.coordinator
        self._resume()
        self.log = self.log.bind(run_id=self.run_id)
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self.stop())
        t = self.transport
        t.subscribe(self.topics.node_filter("status"), self._handle_status)
        t.subscribe(self.topics.node_filter("report"), self._handle_report)
        t.subscribe(self.topics.node_filter("upload"), self._handle_upload)
        t.subscribe(self.topics.node_filter("missing"), self._handle_missing)
        t.subscribe(self.topics.region_filter("status"), self._handle_region_status)
        t.subscribe(self.topics.region_filter("report"), self._handle_region_report)
        t.subscribe(self.topics.region_filter("upload"), self._handle_region_upload)
        t.subscribe(self.topics.region_filter("missing"), self._handle_region_missing)
        t.start()
        self.log.info("coordinator_started", method=rs.method, rounds=rs.rounds, resume_from=self.round,
                      pruning=vars(self.cfg.pruning), lora=vars(self.cfg.lora), bandit=vars(self.cfg.bandit),
                      settings=vars(rs))
        summary = RunSummary(run_id=self.run_id, method=rs.method, rounds_done=self.round)
        try:
            finished = self.round >= rs.rounds and self._finished_before()  # nothing to do: no need to wait
            if not finished and not self._wait_for_nodes(rs.min_nodes, rs.join_timeout_s):
                summary.stopped_early = f"fewer than {rs.min_nodes} nodes joined within {rs.join_timeout_s:.0f} s"
                return summary
            retries = 0
            while self.round < rs.rounds and not self._stop.is_set():
                rnd = self.round + 1
                regions = self._online_regions()
                if regions and self._run_region_round(rnd, retries, regions) or \
                        not regions and self._run_round(rnd, attempt=retries):
                    self.round, retries = rnd, 0
                    self._publish_status("online")
                    continue
                retries += 1
                if retries > MAX_RETRIES:
                    summary.stopped_early = f"round {rnd} missed its quorum {retries} times"
                    break
                self._wait_for_nodes(rs.min_nodes, rs.join_timeout_s)
            summary.rounds_done = self.round
            if self.round >= rs.rounds and self._finished_before():
                # A restart on a finished state directory: the run, its final evaluation and its exports are in
                # metrics.jsonl once; nothing is evaluated or exported again.
                self.log.info("run_already_finished", rounds_done=self.round, metrics=str(self.metrics.path))
            elif self.round >= rs.rounds and not self._stop.is_set():
                regions = self._online_regions()
                if regions:  # the run ends through the regions, as its rounds ran
                    self._final_sync_regions(regions)
                    summary.region_exports = self._export_regions(regions)
                else:
                    self._final_sync()
                    summary.exports = self._export()
                if summary.exports or summary.region_exports:
                    (self.state_dir / FINISHED_FILE).write_text(self.run_id)
            self._publish_status("finished" if self.round >= rs.rounds else "offline")
            return summary
        finally:
            self.log.info("coordinator_stopped", rounds_done=self.round, stopped_early=summary.stopped_early)
            self.metrics.close()
            t.wait_published(5.0)
            t.stop()

    def _finished_before(self) -> bool:
        f = self.state_dir / FINISHED_FILE
        return f.exists() and f.read_text().strip() == self.run_id

    def _resume(self) -> None:
        state = self.store.load()
        if state is None:
            return
        self.run_id = state["run_id"]
        self.round = int(state["round"])
        self.registry.load_state_dict(state["registry"])
        self.strategy.load_state_dict(state["strategy"])
        self._last = {nid: Assignment(**{**a, "arm": tuple(a["arm"]) if a.get("arm") else None})
                      for nid, a in state.get("last_assignments", {}).items()}
        if state.get("labels") and not self.cfg.coordinator.labels:
            self.identity.labels = tuple(state["labels"])
        if state.get("base_model") and not self.cfg.coordinator.base_model:
            self.identity.base_model = state["base_model"]
        if fs := state.get("fleet_stats"):
            self._fleet_stats = (int(fs["round"]), list(fs["regions"]), RoundStats.from_fields(fs))
        self.log.info("resumed", run_id=self.run_id, round=self.round)

    def _checkpoint(self) -> None:
        self.store.save({
            "run_id": self.run_id, "round": self.round, "registry": self.registry.state_dict(),
            "strategy": self.strategy.state_dict(), "method": self.cfg.coordinator.method,
            "last_assignments": {nid: dataclasses.asdict(a) for nid, a in self._last.items()},
            "labels": list(self.identity.labels or ()), "base_model": self.identity.base_model,
            **({"fleet_stats": {"round": self._fleet_stats[0], "regions": self._fleet_stats[1],
                                **self._fleet_stats[2].fields()}} if self._fleet_stats[2] else {}),
        })

    def _wait_for_nodes(self, n: int, timeout_s: float) -> bool:
        """Wait until ``n`` nodes are live (``timeout_s`` 0: with no limit); say every WAIT_LOG_S who is missing."""
        start = time.monotonic()
        end = start + timeout_s if timeout_s > 0 else math.inf
        next_log = start + WAIT_LOG_S
        while not self._stop.is_set():
            if self._fleet_size() >= n:
                return True
            now = time.monotonic()
            if now >= end:
                return False
            if now >= next_log:
                self.log.info("waiting_for_nodes", live=self._fleet_size(), needed=n,
                              waited_s=round(now - start))
                next_log = now + WAIT_LOG_S
            ev = self._drain(min(0.5, end - now))
            if ev and ev[0] == "status":
                self._apply_status(ev[1], ev[2])
        return False

    def _online_regions(self) -> list[str]:
        return sorted(rid for rid, st in list(self._regions.items()) if st.state == "online")

    def _fleet_size(self) -> int:
        """Live nodes: this coordinator's own, or while regional aggregators are online, those of their sub-fleets."""
        regions = [self._regions[r] for r in self._online_regions()]
        return sum(st.nodes for st in regions) if regions else self.registry.live_count()

    def _run_region_round(self, rnd: int, attempt: int, regions: list[str]) -> bool:
        """A hierarchical round: each online region gets the round's assignment and the global state, relays them to
        its nodes and answers with one partial aggregate; the global state becomes ``apply`` of them (``GlobalLora``,
        or HetLoRA's ``ZeroPadLora``), which equals flat aggregation of the same updates.  The work here grows with
        regions, not nodes.  A per-node method's policy runs in the regions instead, each for its own nodes
        (``_choose_in_regions``)."""
        rs = self.cfg.coordinator
        log = self.log.bind(round=rnd, attempt=attempt)
        cpu0, wall0 = time.process_time(), time.monotonic()
        g = self.strategy.global_
        if per_node := bool(self.strategy.per_node_policy):
            plan, nxt = self._per_node_plan(rnd), None
            finish = self._choose_in_regions(rnd, attempt, regions, log)
        else:
            plan = self.strategy.fleet_plan(rnd)  # the method's schedule, the same for every node
            self._ask_region_plans(rnd, attempt, regions, plan, log)
            finish = self._fleet_finish(regions, plan)
            # The next round's schedule as far as it is known before this one is aggregated (importance comes from
            # a round that tracks it): each region answers with its nodes' slowest completion under it.
            nxt = self.strategy.fleet_plan(rnd + 1, fleet_importance=self.strategy.has_fleet_importance()
                                           or plan.importance) if rnd < rs.rounds else None
        pending = self._send_region_rounds(rnd, attempt, regions, plan, finish, nxt, per_node=per_node)
        if idle := self.registry.live_count():  # a hierarchical round goes to the regions only: say so every round
            log.warning("direct_nodes_sit_out", nodes=idle, regions=regions,
                        hint="nodes connected to the root take no part while regions are online; give each a "
                             "region (topic_root <root>/region/<rid>) or stop the regions")
        if rs.fraction < 1:  # every region asks all of its live nodes
            log.warning("fraction_ignored_under_regions", fraction=rs.fraction,
                        hint="[coordinator] fraction samples the nodes of a flat round only; under regions every live "
                             "node takes part")
        log.info("region_round_started", regions=regions, local_steps=plan.local_steps,
                 **({"policy": "per node, in each region"} if per_node else
                    {"target_sparsity": round(plan.target_sparsity, 4), "rank": plan.rank}),
                 **({"finish_s": round(finish, 2)} if finish is not None else {}),
                 **({"tier_ranks": plan.tier_ranks} if plan.tier_ranks else {}))
        self._active = rnd
        try:
            partials, failed = self._collect_regions(pending, time.monotonic() + rs.deadline_s + 30.0, log)
        finally:
            self._active = 0
            for p in pending.values():
                self.reassembler.forget(p["up"])
        self._region_finish = {rid: ((nxt.target_sparsity, nxt.rank), p["next_finish"])
                               for rid, p in pending.items() if nxt is not None and p["next_finish"] is not None}
        for rid in sorted(partials):  # one identity: the first region's (in id order) becomes the fleet's if it has none
            rep = pending[rid]["report"]
            if wrong := self.identity.admit(rid, identity_of(rep.labels, rep.base_model), log, kind="region"):
                del partials[rid]
                failed[rid] = "refused: other " + " and ".join(wrong)
        reports = [p["report"] for p in pending.values() if p["report"] is not None]
        accepted = sum(p.nodes for p in partials.values())
        participants = sum(r.accepted + r.failed for r in reports)
        if accepted < quorum_count(rs.quorum, participants):
            log.warning("round_below_quorum", accepted=accepted, participants=participants, failed_regions=failed)
            return False
        try:
            g.apply([partials[r] for r in sorted(partials)])
        except UpdateError as exc:  # each was valid alone, but they disagree (e.g. round 1, before a global state)
            log.error("region_partials_refused", regions=sorted(partials), error=str(exc))
            return False
        if per_node:  # what the regions' nodes learn from before the next round (_choose_in_regions)
            stats = [RoundStats.from_fields(r) for r in (pending[rid]["report"] for rid in sorted(partials))
                     if r.slowest]
            self._fleet_stats = (rnd, sorted(partials), merge_stats(stats))
        self.round = rnd
        self._checkpoint()
        cost = {"coordinator_cpu_s": time.process_time() - cpu0, "round_wall_s": time.monotonic() - wall0}
        self.metrics.round_summary({"round": rnd, "method": rs.method, "participants": participants,
                                    "accepted": accepted, "regions": len(partials), "failed_regions": failed,
                                    "target_sparsity": None if per_node else plan.target_sparsity,
                                    "rank": None if per_node else plan.rank, "finish_s": finish,
                                    "direct_nodes_idle": idle, "region_cpu_s": round(sum(r.cpu_s for r in reports), 4), **cost})
        log.info("round_done", accepted=accepted, regions=len(partials), failed_regions=failed,
                 **{k: round(v, 3) for k, v in cost.items()})
        return True

    def _fleet_finish(self, regions: list[str], plan: FleetPlan) -> float | None:
        """The fleet's planned finish for ``plan``: the latest of the regions' slowest completions at τ steps, which
        each reported for this plan with its last round; that is ``planning.round_finish`` over every node, as in a
        flat round.  None (every node runs τ steps unpaced) unless every region reported one for this very plan (with
        its last round, or where it had none, answering ``_ask_region_plans``), or if no node has a timing yet."""
        got = [self._known_finish(rid, (plan.target_sparsity, plan.rank)) for rid in regions]
        if not got or any(g is None for g in got):
            return None
        finish = max(got)
        return finish if finish > 0 else None

    def _known_finish(self, rid: str, key: tuple[float, int]) -> float | None:
        """Region ``rid``'s slowest completion at τ steps for the plan ``key`` (target sparsity, rank), if it gave
        one (with its last round's report, or answering ``_ask_region_plans``)."""
        got = self._region_finish.get(rid)
        return got[1] if got is not None and got[0] == key else None

    def _ask_region_plans(self, rnd: int, attempt: int, regions: list[str], plan: FleetPlan, log) -> None:
        """Where a region's finish for exactly ``plan`` is not known (the first hierarchical round, the first after the
        region joined, a retried round whose plan is not the one announced), ask it (``_ask_regions``); the answers go
        where ``next_finish_s`` goes.  A region that does not answer leaves the round unpaced, as before this
        exchange; logged."""
        key = (plan.target_sparsity, plan.rank)
        ask = sorted(rid for rid in regions if self._known_finish(rid, key) is None)
        if not ask or plan.local_steps == 0:
            return
        q = RegionPlanQuery(run_id=self.run_id, round=rnd, attempt=attempt, target_sparsity=plan.target_sparsity,
                            rank=plan.rank, tier_ranks=plan.tier_ranks or {}, local_steps=plan.local_steps)
        for rid, ans in self._ask_regions(q, ask, log).items():
            if ans.finish_s is not None:
                self._region_finish[rid] = (key, ans.finish_s)
        if without := [r for r in ask if self._known_finish(r, key) is None]:
            log.warning("region_plans_missing", regions=without, waited_s=PLAN_QUERY_S,
                        hint="no finish from these regions for this round's plan: it runs τ steps unpaced")

    def _choose_in_regions(self, rnd: int, attempt: int, regions: list[str], log) -> float | None:
        """A per-node method's round under regions, as its flat ``configure_round`` (coordinator/region.py runs the
        policy for each region's nodes): ask every region for the two slowest completions at τ of its nodes (stage
        ``timing``), then send all of them the fleet's two slowest, the last round's merged statistics and the
        policy's settings (stage ``choose``): each learns, chooses and holds its nodes' configurations and answers
        with their slowest completion.  The round's finish: the latest answer, as a flat round's; None (τ steps
        unpaced) where a region did not answer, logged (``region_plans_missing``).  A retried round asks again."""
        timed = self._ask_regions(self._per_node_query(rnd, attempt, "timing"), regions, log)
        at_tau = slowest_two([kv for a in timed.values() for kv in a.slowest_at_tau.items()])
        q = dataclasses.replace(self._per_node_query(rnd, attempt, "choose"), cut=self.strategy.has_fleet_importance(),
                                slowest_at_tau=dict(at_tau))
        chosen = self._ask_regions(q, regions, log)
        if without := sorted((set(regions) - timed.keys()) | (set(regions) - chosen.keys())):
            log.warning("region_plans_missing", regions=without, waited_s=PLAN_QUERY_S,
                        hint="these regions did not answer the per-node plan query: their nodes' timing is left out "
                             "of the others' choice, and without their configurations chosen this round runs τ steps "
                             "unpaced (a region without them fails the round)")
        finishes = [a.finish_s for a in chosen.values() if a.finish_s is not None]
        if len(finishes) < len(regions) or max(finishes, default=0.0) <= 0:
            return None
        return max(finishes)

    def _per_node_query(self, rnd: int, attempt: int, stage: str) -> RegionPlanQuery:
        """A per-node plan query of ``stage`` with the policy's settings and the last aggregated round's merged
        statistics (what the regions learn from)."""
        c = self.cfg
        learn_round, learn_regions, stats = self._fleet_stats
        return RegionPlanQuery(run_id=self.run_id, round=rnd, attempt=attempt, stage=stage,
                               target_sparsity=c.pruning.target_sparsity, rank=self.strategy.deploy_rank(),
                               local_steps=c.coordinator.local_steps, caps=dict(c.pruning.max_sparsity),
                               ranks=list(c.bandit.ranks), reward=dict(c.bandit.reward),
                               total_rounds=c.coordinator.rounds, seed=c.coordinator.seed,
                               **({"learn_round": learn_round, "learn_regions": learn_regions, **stats.fields()}
                                  if stats else {}))

    def _ask_regions(self, q: RegionPlanQuery, regions: list[str], log) -> dict[str, RegionPlan]:
        """Send ``q`` to each of ``regions`` (on its config topic) and wait up to PLAN_QUERY_S for their answers
        (RegionPlan on their report topics, naming q's round and attempt): region -> its answer."""
        payload, got = encode(q), {}
        for rid in regions:
            self.transport.publish(self.topics.region(rid, "config"), payload, qos=1)
        log.info("region_plans_asked", regions=regions, stage=q.stage)
        waiting, end = set(regions), time.monotonic() + PLAN_QUERY_S
        while waiting and not self._stop.is_set() and (now := time.monotonic()) < end:
            waiting &= set(self._online_regions())  # one that went offline will not answer (nor take part)
            ev = self._drain(min(0.5, end - now)) if waiting else None
            if ev is None:
                continue
            kind, rid, msg = ev
            if kind == "region_report" and isinstance(msg, RegionPlan):
                if rid in waiting and (msg.run_id, msg.round, msg.attempt) == (self.run_id, q.round, q.attempt):
                    waiting.discard(rid)
                    got[rid] = msg
                else:
                    log.info("late_or_duplicate_dropped", kind="region_plan", region=rid)
            else:
                self._dispatch_idle(ev, log)
        return got

    def _per_node_plan(self, rnd: int) -> FleetPlan:
        """What a per-node method's RegionRound carries of a plan: τ steps, importance tracking and the deployed rank
        as the rank every slice is sent at; each node's target and rank are its region's choice."""
        rank = self.strategy.deploy_rank()
        return FleetPlan(target_sparsity=0.0, rank=rank, sent_rank=rank, local_steps=self.strategy.tau,
                         importance=self.strategy.will_prune(rnd))

    def _send_region_rounds(self, rnd: int, attempt: int | None, regions: list[str], plan: FleetPlan,
                            finish_s: float | None = None, next_plan: FleetPlan | None = None, *,
                            per_node: bool = False) -> dict[str, dict]:
        """Publish each region's RegionRound (try ``attempt`` of round ``rnd``, None: the final sync; ``plan``,
        paced to ``finish_s``, asking for its nodes' slowest completion under ``next_plan``; ``per_node``: each node
        gets its region's choice instead) and the global state (chunked, one encoding for all)."""
        rs, g = self.cfg.coordinator, self.strategy.global_
        tag = "final" if attempt is None else f"a{attempt}"
        state = st_save(g.state_tensors()) if not g.empty else None
        pending: dict[str, dict] = {}
        for rid in regions:
            up = f"{self.run_id}.r{rnd}.{tag}.{rid}.part"
            down = f"{self.run_id}.r{rnd}.{tag}.{rid}.state" if state is not None else None
            self.reassembler.expect(up, rid)
            msg = RegionRound(run_id=self.run_id, round=rnd, target_sparsity=plan.target_sparsity, rank=plan.rank,
                              sent_rank=plan.sent_rank, local_steps=plan.local_steps, importance=plan.importance,
                              attempt=attempt or 0, deadline_ts=time.time() + rs.deadline_s, upload_transfer_id=up,
                              download_transfer_id=down, finish_s=finish_s,
                              next_target_sparsity=next_plan.target_sparsity if next_plan else None,
                              next_rank=next_plan.rank if next_plan else None, tier_ranks=plan.tier_ranks or {},
                              zero_pad_rank=plan.zero_pad_rank, labels=list(self.identity.labels or ()),
                              base_model=self.identity.base_model, per_node=per_node)
            pending[rid] = {"up": up, "report": None, "data": None, "next_finish": None}
            self.transport.publish(self.topics.region(rid, "config"), encode(msg), qos=1)
            if state is not None:
                self.transport.send_transfer(self.topics.region(rid, "download"), state, down, COORDINATOR_ID)
        return pending

    def _final_sync_regions(self, regions: list[str]) -> None:
        """The final sync through the regions: each sends its live nodes the final aggregate (τ = 0; they evaluate
        it and keep it for the export) and reports how many took part; no partial comes back."""
        rs = self.cfg.coordinator
        rnd = self.round + 1  # on the wire a round of its own, as in _final_sync
        log = self.log.bind(round=self.round, final=True)
        per_node = bool(self.strategy.per_node_policy)  # then each node's last target, which its region holds
        if per_node:  # the regions learn from the last round, as the flat strategy did when it aggregated it
            self._ask_regions(self._per_node_query(rnd, 0, "learn"), regions, log)
        last = self._per_node_plan(self.round) if per_node else self.strategy.fleet_plan(self.round)
        rank = self.strategy.deploy_rank()
        plan = FleetPlan(target_sparsity=last.target_sparsity, rank=rank, sent_rank=rank, local_steps=0,
                         importance=False, zero_pad_rank=last.zero_pad_rank)  # every node: the deployed rank
        pending = self._send_region_rounds(rnd, None, regions, plan, per_node=per_node)
        self._active = rnd
        try:
            _, failed = self._collect_regions(pending, time.monotonic() + rs.deadline_s + 30.0, log, partial=False)
        finally:
            self._active = 0
            for p in pending.values():
                self.reassembler.forget(p["up"])
        for rid in regions:
            rep = pending[rid]["report"]
            self.metrics.region({"round": self.round, "final": True, "region": rid, "method": rs.method,
                                 "eval_only": True, "status": "ok" if rid not in failed else failed[rid],
                                 "accepted": rep.accepted if rep else 0, "failed": rep.failed if rep else 0})
        log.info("final_sync_done", regions=len(regions) - len(failed), failed_regions=failed,
                 accepted=sum(p["report"].accepted for r, p in pending.items() if r not in failed))

    def _export_regions(self, regions: list[str]) -> dict[str, RegionExport]:
        """Ask each region to relay the export command to its nodes; collect one summary per region."""
        log = self.log
        cmd = encode(Command(command="export", run_id=self.run_id, round=self.round))
        for rid in regions:
            self.transport.publish(self.topics.region(rid, "config"), cmd, qos=1)
        log.info("export_requested", regions=regions)
        reports: dict[str, RegionExport] = {}
        end = time.monotonic() + self.cfg.coordinator.deadline_s + 30.0  # a region waits up to its deadline_s
        while set(self._online_regions()) & set(regions) - reports.keys() and time.monotonic() < end \
                and not self._stop.is_set():
            ev = self._drain(min(0.5, end - time.monotonic()))
            if ev is None:
                continue
            kind, rid, payload = ev
            if kind == "region_report" and isinstance(payload, RegionExport) and payload.run_id == self.run_id \
                    and rid in regions:
                reports[rid] = payload
                self.metrics.region({"round": self.round, "export": True, "region": rid, "method":
                                     self.cfg.coordinator.method, "nodes": payload.nodes, "ok": payload.ok,
                                     "skipped": payload.skipped, "failed": payload.failed, "missing": payload.missing})
                (log.info if payload.ok == payload.nodes else log.warning)(
                    "region_exported", region=rid, nodes=payload.nodes, ok=payload.ok, skipped=payload.skipped,
                    failed=payload.failed, missing=payload.missing)
            elif kind in ("region_report", "region_upload"):
                log.info("late_or_duplicate_dropped", kind=kind, region=rid)
            elif kind != "region_missing":
                self._dispatch_idle(ev, log)
        if set(regions) - reports.keys():
            log.warning("region_export_missing", regions=sorted(set(regions) - reports.keys()))
        log.info("exports_done", regions=len(reports), nodes=sum(r.nodes for r in reports.values()),
                 ok=sum(r.ok for r in reports.values()))
        return reports

    def _collect_regions(self, pending: dict[str, dict], deadline: float, log,
                         partial: bool = True) -> tuple[dict[str, Partial], dict]:
        """Each region's report and (``partial``) its partial aggregate, until all answered or ``deadline``; the
        final sync's regions send a report only."""
        partials: dict[str, Partial] = {}
        failed: dict[str, str] = {}
        done: set[str] = set()  # regions whose report (and partial) arrived
        while len(done) + len(failed) < len(pending) and not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            ev = self._drain(min(0.5, deadline - now))
            kind, rid, payload = ev if ev is not None else (None, None, None)
            p = pending.get(rid) if rid is not None else None
            if kind == "region_missing":
                self.transport.resend(self.topics.region(rid, "download"), payload)
            elif kind in ("region_report", "region_upload") and (p is None or rid in done or rid in failed
                                                                  or isinstance(payload, (RegionExport, RegionPlan))):
                log.info("late_or_duplicate_dropped", kind=kind, region=rid)
            elif kind == "region_report" and (payload.run_id != self.run_id or payload.transfer_id != p["up"]):
                log.info("stale_report_dropped", region=rid, report_round=payload.round)
            elif kind == "region_report":
                p["next_finish"] = payload.next_finish_s  # a region that failed its round still timed its nodes
                if payload.status != "ok":
                    failed[rid] = payload.error or "error"
                    log.warning("region_round_failed", region=rid, error=payload.error)
                else:
                    p["report"] = payload
            elif kind == "region_upload":
                if payload[0] == p["up"]:
                    p["data"] = payload[1]
            elif ev is not None:
                self._dispatch_idle(ev, log)
            if p is not None and rid not in failed and rid not in done and p["report"] is not None and not partial:
                done.add(rid)
            elif p is not None and rid not in failed and rid not in done and p["report"] is not None \
                    and p["data"] is not None:
                done.add(rid)
                try:
                    part = Partial.from_bytes(p["data"], self.limits)
                    if part.nodes != p["report"].accepted:
                        raise UpdateError(f"partial of {part.nodes} nodes, report says {p['report'].accepted}")
                    self.strategy.global_.check_partial(part)  # its kind, padding rank, modules and shapes
                    partials[rid] = part
                except UpdateError as exc:
                    done.discard(rid)
                    failed[rid] = "rejected"
                    log.warning("partial_rejected", region=rid, error=str(exc))
            for r, q in pending.items():  # resume a stalled partial: ask for the missing chunks
                if partial and q["report"] is not None and q["data"] is None:
                    req = self.reassembler.resend_request(q["up"], COORDINATOR_ID)
                    if req is not None:
                        self.transport.publish(self.topics.region(r, "resend"), encode(req), qos=1)
        failed.update({r: "timeout" for r in pending if r not in done and r not in failed})
        return partials, failed

    def _participants(self, rnd: int) -> list:
        live = self.registry.live(for_round=rnd)
        rs = self.cfg.coordinator
        k = max(rs.min_nodes, round(rs.fraction * len(live)))
        if k >= len(live):
            return live
        import random

        return sorted(random.Random(rs.seed * 100_003 + rnd).sample(live, k), key=lambda n: n.node_id)

    def _run_round(self, rnd: int, attempt: int) -> bool:
        rs = self.cfg.coordinator
        log = self.log.bind(round=rnd, attempt=attempt)
        cpu0, wall0 = time.process_time(), time.monotonic()
        # Apply presence changes first so departures are not asked to work.
        while (ev := self._drain(0)) is not None:
            self._dispatch_idle(ev, log)
        nodes = self._participants(rnd)
        if not nodes:
            log.warning("round_skipped", reason="no live nodes")
            return False
        assignments = self.strategy.configure_round(rnd, nodes)
        pending = self._send_configs(rnd, attempt, assignments)
        finish = next((a.finish_s for a in assignments if a.finish_s is not None), None)  # paced: the same for all
        log.info("round_started", participants=[a.node_id for a in assignments],
                 configs={a.node_id: {"sparsity": round(a.target_sparsity, 4), "rank": a.rank, "steps": a.local_steps}
                          for a in assignments},
                 **({"finish_s": round(finish, 2)} if finish is not None else {}))

        self._active = rnd
        try:
            results, failures = self._collect(rnd, pending, time.monotonic() + rs.deadline_s, log)
        finally:
            self._active = 0
        for p in pending.values():
            self.reassembler.forget(p.upload_tid)
        quorum = quorum_count(rs.quorum, len(assignments))
        if len(results) < quorum:
            log.warning("round_below_quorum", accepted=len(results), quorum=quorum,
                        failures={f.node_id: f.reason for f in failures})
            self.strategy.record_failures(rnd, failures)
            return False
        summary = self.strategy.aggregate_round(rnd, results, failures)
        self._last.update({a.node_id: a for a in assignments})
        self.round = rnd
        self._checkpoint()
        cost = {"coordinator_cpu_s": time.process_time() - cpu0, "round_wall_s": time.monotonic() - wall0}
        self._write_metrics(rnd, assignments, results, failures, summary, pending, cost)
        for nid in sorted(r.node_id for r in results):
            self._log_accuracy(log, nid, pending[nid].report, final=False)
        log.info("round_done", accepted=len(results), failures={f.node_id: f.reason for f in failures},
                 **{k: round(v, 3) for k, v in cost.items()}, **summary.log_fields())
        return True

    def _final_sync(self) -> None:
        """Send every live node the final aggregate (τ = 0): it evaluates and keeps it for the export."""
        rnd = self.round + 1  # on the wire a round of its own (own transfers); to people, round N with final = true
        log = self.log.bind(round=self.round, final=True)
        assignments = [
            Assignment(node_id=a.node_id, target_sparsity=a.target_sparsity, rank=self.strategy.deploy_rank(),
                       local_steps=0, arm=None)
            for nid, a in sorted(self._last.items()) if self.registry.is_live(nid)
        ]
        if not assignments:
            return
        pending = self._send_configs(rnd, 0, assignments)
        results, failures = self._collect(rnd, pending, time.monotonic() + self.cfg.coordinator.deadline_s, log)
        for p in pending.values():
            self.reassembler.forget(p.upload_tid)
        ok, reasons = {res.node_id for res in results}, {f.node_id: f.reason for f in failures}
        for a in assignments:
            p = pending[a.node_id]
            rec = {"round": self.round, "final": True, "node": a.node_id, "method": self.cfg.coordinator.method,
                   "eval_only": True, "target_sparsity": a.target_sparsity, "rank": a.rank}
            if p.report is not None and a.node_id in ok:
                rec.update(status="ok", sparsity=p.report.sparsity, round_time_s=0.0, upload_bytes=0,
                           **{f"m_{k}": v for k, v in p.report.metrics.items()})
                self._log_accuracy(log, a.node_id, p.report, final=True)
            else:
                rec.update(status=reasons.get(a.node_id, "missing"))
            self.metrics.node_round(rec)
        log.info("final_sync_done", accepted=len(results), failures={f.node_id: f.reason for f in failures})

    @staticmethod
    def _log_accuracy(log, node_id: str, report, final: bool) -> None:
        """The node's test accuracy as it logged it (same round, same set): one line per node and round."""
        m = report.metrics if report is not None else {}
        if "test_accuracy" in m:
            examples = m.get("test_examples")
            log.info("round_accuracy", node_id=node_id, final=final, test_accuracy=round(m["test_accuracy"], 4),
                     eval_set=f"{node_id}'s test_path, first {int(examples) if examples else '?'} examples",
                     model="final aggregate" if final else "global model this round started from")

    def _send_configs(self, rnd: int, attempt: int, assignments: list[Assignment]) -> dict[str, _Pending]:
        """Publish each participant's configuration and its slice of the global LoRA (chunked)."""
        deadline_ts = time.time() + self.cfg.coordinator.deadline_s
        pending: dict[str, _Pending] = {}
        encoded: dict[int, bytes] = {}  # nodes of equal structure and rank share one slice: serialise it once
        for a in assignments:
            up_tid = f"{self.run_id}.r{rnd}.a{attempt}.{a.node_id}.up"
            g = self.strategy.download_slice(a.node_id, a.rank)
            down_tid = f"{self.run_id}.r{rnd}.a{attempt}.{a.node_id}.down" if g is not None else None
            self.reassembler.expect(up_tid, a.node_id)
            cfg_msg = RoundConfig(
                run_id=self.run_id, round=rnd, target_sparsity=a.target_sparsity, rank=a.rank,
                local_steps=a.local_steps, deadline_ts=deadline_ts, upload_transfer_id=up_tid,
                download_transfer_id=down_tid, importance=a.importance,
                finish_s=a.finish_s, min_steps=a.min_steps, max_steps=a.max_steps,
            )
            pending[a.node_id] = _Pending(assignment=a, upload_tid=up_tid, sent_at=time.monotonic(), config=cfg_msg)
            self.transport.publish(self.topics.node(a.node_id, "config"), encode(cfg_msg), qos=1)
            if g is not None:
                if id(g) not in encoded:
                    encoded[id(g)] = g.to_bytes()
                self.transport.send_transfer(self.topics.node(a.node_id, "download"), encoded[id(g)], down_tid,
                                             COORDINATOR_ID)
        return pending

    def _dispatch_idle(self, ev: tuple, log) -> None:
        """Handle an event that arrives outside a round's collection window."""
        kind, node_id, payload = ev
        if kind == "status":
            self._apply_status(node_id, payload)
        elif kind == "missing":
            self.transport.resend(self.topics.node(node_id, "download"), payload)
        else:
            log.info("late_message_dropped", kind=kind, node=node_id)

    def _collect(self, rnd: int, pending: dict[str, _Pending], deadline: float, log):
        """Each participant's report and upload until all answered or ``deadline`` (the bookkeeping: RoundCollector,
        coordinator/collect.py): (accepted NodeResults, Failures), each in node order.  Presence is applied to the
        registry and download resend requests are answered as they come."""
        col = RoundCollector(pending, run_id=self.run_id, round=rnd, accept=lambda p: self._accept(p, log),
                             transport=self.transport, reassembler=self.reassembler, topics=self.topics, log=log,
                             grace_s=OFFLINE_GRACE_S)
        while col.open and not self._stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            ev = self._drain(min(1.0, deadline - now))
            if ev is not None:
                kind, node_id, payload = ev
                if kind == "status":
                    self._apply_status(node_id, payload)
                    col.on_status(node_id, self.registry.is_live(node_id))
                elif kind == "missing":
                    self.transport.resend(self.topics.node(node_id, "download"), payload)
                elif kind == "report":
                    col.on_report(node_id, payload)
                elif kind == "upload":
                    col.on_upload(node_id, *payload)  # (transfer id, data, digest)
                else:
                    log.info("late_or_duplicate_dropped", kind=kind, node=node_id)
            col.scan(time.monotonic())
        results, failures = col.finish()
        # In node order, not arrival order: floating-point sums then do not depend on which upload came first, so
        # the same accepted updates always give the same global model (and the audit's replay reproduces it).
        return [results[n] for n in sorted(results)], [failures[n] for n in sorted(failures)]

    def _accept(self, p: _Pending, log) -> NodeResult | Failure:
        """The node's answer under the one acceptance rule (``accept_answer``, which the regions apply too)."""
        nid = p.assignment.node_id
        assert p.report is not None and p.payload is not None
        try:
            return accept_answer(p.config, p.report, p.payload, self.strategy.global_,
                                 self.strategy.state(nid).structure, self.limits, wall_s=p.received_at - p.sent_at)
        except UpdateError as exc:
            log.warning("update_rejected", node=nid, error=str(exc))
            return Failure(nid, "rejected")

    def _write_metrics(self, rnd, assignments, results, failures, summary, pending, cost: dict) -> None:
        by_node = {res.node_id: res for res in results}
        reasons = {f.node_id: f.reason for f in failures}
        for a in assignments:
            res, p = by_node.get(a.node_id), pending[a.node_id]
            rec = {"round": rnd, "node": a.node_id, "method": self.cfg.coordinator.method,
                   "target_sparsity": a.target_sparsity, "rank": a.rank, "arm": a.arm, "planned_s": a.planned_s,
                   "finish_s": a.finish_s}
            if res is not None and p.report is not None:
                rep = p.report
                rec.update(status="ok", loss_start=rep.loss_start, loss_end=rep.loss_end, samples=rep.samples,
                           steps=res.steps, examples=rep.examples, train_s=rep.train_s, compute_s=rep.compute_s,
                           upload_s=rep.upload_s, virtual_s=rep.virtual_s,
                           round_time_s=res.round_time_s, wall_s=p.received_at - p.sent_at,
                           sparsity=rep.sparsity, upload_bytes=res.upload_bytes,
                           energy_j=rep.energy_j,
                           avg_power_w=rep.avg_power_w, power_source=rep.power_source,
                           peak_memory_mb=rep.peak_memory_mb, **{f"m_{k}": v for k, v in rep.metrics.items()},
                           update_sha256=p.digest)  # audit: what was aggregated
            else:
                rec.update(status=reasons.get(a.node_id, "missing"))
            rec.update(summary.node_fields(a.node_id))
            self.metrics.node_round(rec)
        self.metrics.round_summary({"round": rnd, "method": self.cfg.coordinator.method, "participants": len(assignments),
                                    "accepted": len(results), **cost, **summary.round_fields()})

    def _export(self) -> dict[str, ExportReport]:
        """Tell every node to export its final pruned, merged model locally and collect their reports."""
        live = {n.node_id for n in self.registry.live()}
        self.transport.publish(self.topics.broadcast_command,
                               encode(Command(command="export", run_id=self.run_id, round=self.round)), qos=1)
        self.log.info("export_requested", nodes=sorted(live))
        reports: dict[str, ExportReport] = {}
        end = time.monotonic() + self.cfg.coordinator.deadline_s
        while live - reports.keys() and time.monotonic() < end and not self._stop.is_set():
            ev = self._drain(min(1.0, end - time.monotonic()))
            if ev is None:
                continue
            kind, node_id, payload = ev
            if kind == "report" and isinstance(payload, ExportReport) and payload.run_id == self.run_id:
                reports[node_id] = payload
                self.metrics.export(payload)
                m = payload.metrics
                self.log.info("node_exported", node=node_id, status=payload.status, size_bytes=payload.size_bytes,
                              params=payload.params, sparsity=payload.sparsity, latency_ms=payload.latency_ms,
                              **({"test_accuracy": round(m["test_accuracy"], 4),
                                  "test_examples": int(m.get("test_examples", 0)),
                                  "file_accuracy": round(m.get("accuracy", float("nan")), 4),
                                  "file_examples": int(m.get("examples", 0))} if "test_accuracy" in m else {}))
            elif kind == "status":
                self._apply_status(node_id, payload)
                if not self.registry.is_live(node_id):
                    live.discard(node_id)
        return reports
