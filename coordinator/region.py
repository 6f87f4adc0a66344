"""A regional aggregator (``fedspine region --config region.toml``): one coordinator's work for a sub-fleet.

Its nodes are ordinary nodes whose ``topic_root`` is ``<root>/region/<rid>`` (``Topics.region_root``): to them the
region is the coordinator.  Upward it is one participant of the root's rounds on ``<root>/region/<rid>/...``:

    root --RegionRound + global state (chunked)--> region --RoundConfig + slice (chunked)--> each live node
    root <--partial aggregate (chunked) + report-- region <--update (chunked) + RoundReport-- each node

The region slices the global state for each node exactly as the root would (``GlobalLora.slice_for`` is
deterministic), validates each update by the root's rule (``accept_answer``) and forwards ``GlobalLora.partial`` of
the accepted ones: per-coordinate sums that the root adds across regions, so the root's global state equals flat
aggregation of the same updates (tests/coordinator/test_hierarchy.py).  Under HetLoRA (the RegionRound's
``zero_pad_rank``) the state is ``ZeroPadLora``'s zero-padded factors, each node is sent them at its tier's rank
(``tier_ranks``) and the partial is ``ZeroPadLora.partial``: the weighted factors padded to the fleet's padding
rank, which add just the same.  Every transfer is chunked, digest-verified and resumable (shared/chunking.py), both
ways.  The root's work per round grows with regions, not nodes.  Downward the region speaks as the nodes'
coordinator (its chunks and resend requests carry the sender ``coordinator``).

For a fleet-wide method the assignment is its schedule (``Strategy.fleet_plan``: target sparsity, rank or each
device tier's rank, τ steps, whether to track importance); the region keeps a node that is already sparser at its
own sparsity, as the root does.  A per-node method (FedSpine's bandit) runs here instead, for this region's nodes:
the region holds their bandits (``policy``, made from the root's settings that each per-node RegionPlanQuery
carries) and gets from the root what the choice and the reward need of the other regions' nodes, extremes that
merge (coordinator/reward.py ``RoundStats``).  Each round the root asks twice: stage ``timing``, this region's two
slowest completions at τ; stage ``choose``, with the fleet's two slowest and the last round's merged statistics:
the region learns from its nodes' last results (held since its report, which carried their statistics), chooses
and holds their configurations for that round and attempt (``Strategy.choose``) and answers with their slowest
completion; the RegionRound (``per_node``) that follows, paced to the latest answer, sends each node its
configuration (``Strategy.assign``).  So every node gets what a flat run gives it and the bandits learn what a flat
run's do (tests/coordinator/test_region_rounds.py).  The bandits live in memory only: a restarted region starts
them afresh.

Steps are aligned and paced as in a flat round, where the timings are: the region keeps each node's state as the
flat strategy does (``NodeState``: sparsity, rank, structure, measured speeds) and plans its nodes with
``planning.plan_round`` to the fleet's finish that the RegionRound carries.  The root takes that finish as the
latest of its regions' slowest completions at τ steps, which each region reports with its previous round for the
plan the root announced then (``RegionReport.next_finish_s``): ``planning.round_finish`` over every node, as flat.
Where the root has none for a round's exact plan (its first hierarchical round, the first after this region joined,
a retried round with another plan) it asks first (RegionPlanQuery of stage ``finish`` on the config topic); the
region answers at once with the same computation (RegionPlan on its report topic; nodes not yet measured by their
startup timings, as a flat round 1), from its main loop between events, also mid-round, without touching the round
in progress (a per-node stage changes only the policy's state for the next round).

One identity for the fleet: the region refuses any of its nodes whose labels or base model differ from the
fleet's (``FleetIdentity``, the root's rule and log lines, ``node_refused_*``): the root's, which every RegionRound
carries, or while the root has none, its first node's, held provisionally and reported in each RegionReport (the
root adopts the first region's and refuses the partial of a region with another).  When the root's arrives, the
provisional one is dropped and every node's presence is checked again.

The end of the run goes through the region too: a RegionRound with ``local_steps`` 0 is the final sync (relayed
to every live node, which evaluates the final state and keeps it, at its last target under a per-node method; the
region reports how many took part and sends no partial), and the root's export Command, sent on the region's
config topic, is relayed on the sub-fleet's broadcast topic; the region counts its nodes' ExportReports by status
and answers with one RegionExport.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import threading
import time

from coordinator import planning
from coordinator.aggregation import GlobalLora, ZeroPadLora, load_state_bytes
from coordinator.collect import OFFLINE_GRACE_S, Participant, RoundCollector, quorum_count
from coordinator.config import BanditSettings, CoordinatorConfig, PruningSettings, RegionConfig, RoundSettings
from coordinator.registry import FleetIdentity, Registry, identity_of
from coordinator.reward import RoundStats, slowest_two
from coordinator.strategies.base import (
    Assignment,
    Failure,
    NodeInfo,
    NodeResult,
    NodeState,
    StructureTable,
    accept_answer,
    fleet_timing,
    node_weights,
)
from coordinator.strategies.fedspine import FedSpine
from shared.chunking import Reassembler
from shared.config import ConfigError
from shared.logs import LiveRoundLogger, get_logger
from shared.messages import (
    Chunk,
    Command,
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
from shared.updates import LORA_ALPHA, LoraUpdate, UpdateError, UpdateLimits

STATUS_EVERY_S = 1.0  # the region's presence (with its live node count) is republished at most this often


class Region:
    """One regional aggregator process. ``transport`` may be injected (tests use an in-memory bus)."""

    def __init__(self, cfg: RegionConfig, *, transport=None, log=None) -> None:
        self.cfg = cfg
        self.rid = cfg.region.region_id
        self.up = cfg.broker.topics
        self.down = self.up.region_root(self.rid)
        self.round = 0
        self.log = LiveRoundLogger((log or get_logger("region")).bind(node_id=self.rid), lambda: self.round)
        self.limits = UpdateLimits()
        self.reassembler = Reassembler(max_bytes=self.limits.max_bytes, timeout_s=max(cfg.region.deadline_s, 60.0))
        self.registry = Registry()
        # The fleet's labels and base model: the root's (RegionRound), or until it has one, the first node's
        # (provisional: reported upward, where the root adopts the first region's and refuses another's partial).
        self.identity = FleetIdentity(provisional=True)
        self._presence: dict[str, NodeStatus] = {}  # each node's latest presence, re-checked when the identity changes
        self.global_: GlobalLora | ZeroPadLora = GlobalLora()
        self.nodes: dict[str, NodeState] = {}  # as the flat strategy keeps them, from each node's accepted rounds
        self.structures = StructureTable()  # their kept-index structures, shared as at the root
        # A per-node method (FedSpine): its policy for this region's nodes, made from the root's settings
        # (RegionPlanQuery), the configurations chosen for the next round (round, attempt, ``Strategy.choose``'s
        # plans), the last round's accepted results until the fleet's statistics come to learn from, and each node's
        # last target (for the final sync)
        self.policy: FedSpine | None = None
        self._policy_key: tuple = ()
        self._chosen: tuple[int, int, list] | None = None
        self._unlearned: tuple[int, list[NodeResult]] | None = None
        self._last_target: dict[str, float] = {}
        self.events: queue.Queue = queue.Queue()
        self.chunk_limit = cfg.broker.chunk_size + CHUNK_OVERHEAD
        self._stop = threading.Event()
        self._announced = (-1, 0.0)  # (live count, when) last published
        off = encode(RegionStatus(region_id=self.rid, state="offline", ts=time.time()))
        self.transport = transport or MqttTransport(
            cfg.broker, client_id=f"fedspine-region-{self.rid}", will=(self.up.region(self.rid, "status"), off),
            on_connect=lambda: self._announce(force=True), log=self.log.bind(logger="transport"), persistent=True)

    # ---- network thread: decode and enqueue only ----------------------------------------------------------
    def _on_status(self, topic: str, payload: bytes) -> None:
        nid = self.down.sender(topic, "status", self.log)
        st = nid and payload and decode_from(payload, NodeStatus, topic=topic, log=self.log, sender=nid)
        if st:
            self.events.put(("status", nid, st))

    def _on_report(self, topic: str, payload: bytes) -> None:
        nid = self.down.sender(topic, "report", self.log)
        rep = nid and decode_from(payload, (RoundReport, ExportReport), topic=topic, log=self.log, sender=nid)
        if rep:
            self.events.put(("report", nid, rep))

    def _on_upload(self, topic: str, payload: bytes) -> None:
        nid = self.down.sender(topic, "upload", self.log)
        self._feed(topic, payload, nid, "upload")

    def _feed(self, topic: str, payload: bytes, sender: str | None, kind: str) -> None:
        chunk = sender and decode_from(payload, Chunk, topic=topic, log=self.log, max_bytes=self.chunk_limit,
                                       event="chunk_rejected")
        if chunk:
            whole = self.reassembler.feed(chunk, sender)
            if whole is not None:
                self.events.put((kind, sender, (chunk.transfer_id, whole)))

    def _on_missing(self, topic: str, payload: bytes) -> None:
        nid = self.down.sender(topic, "missing", self.log)
        req = nid and decode_from(payload, ResendRequest, topic=topic, log=self.log, sender=nid,
                                  sender_field="requester")
        if req:
            self.events.put(("missing", nid, req))

    def _on_round(self, topic: str, payload: bytes) -> None:
        msg = decode_from(payload, (RegionRound, Command, RegionPlanQuery), topic=topic, log=self.log)
        if isinstance(msg, Command):  # the root's end of run: relayed to this region's nodes
            self.events.put(("command", None, msg))
        elif isinstance(msg, RegionPlanQuery):  # answered between events, whatever the main loop is doing
            self.events.put(("plan_query", None, msg))
        elif msg:
            if msg.download_transfer_id:  # before its chunks arrive (a chunk that came first is asked for again)
                self.reassembler.expect(msg.download_transfer_id, COORDINATOR_ID)
            self.events.put(("round", None, msg))

    def _on_download(self, topic: str, payload: bytes) -> None:
        self._feed(topic, payload, COORDINATOR_ID, "global")

    def _on_resend(self, topic: str, payload: bytes) -> None:
        req = decode_from(payload, ResendRequest, topic=topic, log=self.log)
        if req:
            self.events.put(("resend", None, req))

    # ---- main thread ------------------------------------------------------------------------------------
    def _announce(self, force: bool = False) -> None:
        live, last = self._announced
        n = self.registry.live_count()
        if not force and (n == live or time.monotonic() - last < STATUS_EVERY_S):
            return
        self._announced = (n, time.monotonic())
        msg = RegionStatus(region_id=self.rid, state="online", ts=time.time(), nodes=n)
        self.transport.publish(self.up.region(self.rid, "status"), encode(msg), qos=1, retain=True)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, lambda *_: self.stop())
        t = self.transport
        for kind, handler in (("status", self._on_status), ("report", self._on_report),
                              ("upload", self._on_upload), ("missing", self._on_missing)):
            t.subscribe(self.down.node_filter(kind), handler)
        for kind, handler in (("config", self._on_round), ("download", self._on_download),
                              ("resend", self._on_resend)):
            t.subscribe(self.up.region(self.rid, kind), handler)
        t.start()
        self.log.info("region_started", sub_root=self.down.root, settings=vars(self.cfg.region))
        try:
            while not self._stop.is_set():
                ev = self._get(0.5)
                if ev is not None and ev[0] == "round":
                    self._run_round(ev[2])
                elif ev is not None and ev[0] == "command":
                    self._command(ev[2])
                elif ev is not None:
                    self._idle(ev)
                self._announce()
        finally:
            off = RegionStatus(region_id=self.rid, state="offline", ts=time.time(), nodes=0)
            t.publish(self.up.region(self.rid, "status"), encode(off), qos=1, retain=True)
            t.wait_published(5.0)
            t.stop()
            self.log.info("region_stopped", rounds=self.round)
        return 0

    def _get(self, timeout: float) -> tuple | None:
        try:
            return self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def _idle(self, ev: tuple) -> None:
        kind, nid, payload = ev
        if kind == "status":
            self._apply_status(nid, payload)
        elif kind == "missing":
            self.transport.resend(self.down.node(nid, "download"), payload)
        elif kind == "resend":
            self.transport.resend(self.up.region(self.rid, "upload"), payload)
        elif kind == "plan_query":
            self._answer_plan(payload)
        else:
            self.log.info("late_message_dropped", kind=kind, node=nid)

    def _apply_status(self, nid: str, status: NodeStatus) -> None:
        """A node's presence, through the fleet's identity: one that disagrees is refused (the root's rule and log
        lines, ``FleetIdentity.admit``) and counts as offline for this region's rounds."""
        self._presence[nid] = status
        got = identity_of(status.labels, status.base_model)
        wrong = self.identity.admit(nid, got, self.log) if status.state == "online" else []
        if wrong:
            status = NodeStatus(node_id=nid, state="offline", ts=status.ts)  # refused: as if gone
            if self.identity.settled(wrong):  # told, as the root tells its own nodes (not for a provisional value)
                self.transport.publish(self.down.node(nid, "config"),
                                       encode(self.identity.refusal(nid, got, wrong)), qos=1)
        self.registry.apply(status, time.time(), self.round)

    def _follow_root(self, rr: RegionRound) -> None:
        """Enforce the identity the root sends (its provisional one dropped): every node's presence is checked again,
        so one admitted under the provisional identity may be refused now, and one refused may join."""
        if self.identity.follow(identity_of(rr.labels, rr.base_model)):
            self.log.info("fleet_identity_from_root", labels=rr.labels or None, base_model=rr.base_model)
            for nid, status in sorted(self._presence.items()):
                self._apply_status(nid, status)

    def _fetch_global(self, rr: RegionRound, end: float) -> bool:
        """Wait for the round's global state (asking the root for missing chunks); False: none by ``end``."""
        if rr.download_transfer_id is None:
            self.global_ = GlobalLora() if rr.zero_pad_rank is None else ZeroPadLora(rank=rr.zero_pad_rank)
            return True
        tid = rr.download_transfer_id
        while time.monotonic() < end and not self._stop.is_set():
            ev = self._get(0.5)
            if ev is not None and ev[0] == "global" and ev[2][0] == tid:
                try:
                    self.global_ = load_state_bytes(ev[2][1], self.limits, rr.zero_pad_rank)
                    return True
                except UpdateError as exc:
                    self.log.warning("global_state_rejected", error=str(exc))
                    self.reassembler.expect(tid, COORDINATOR_ID)
            elif ev is not None and ev[0] not in ("round", "global"):
                self._idle(ev)
            req = self.reassembler.resend_request(tid, self.rid, idle_s=1.0)  # resume: ask for what is missing
            if req is not None:
                self.transport.publish(self.up.region(self.rid, "missing"), encode(req), qos=1)
        return False

    def _run_round(self, rr: RegionRound) -> None:
        cpu0 = time.process_time()
        self._follow_root(rr)  # before the round starts: a node it admits now takes part in it
        self.round = rr.round
        end = time.monotonic() + min(self.cfg.region.deadline_s, max(1.0, rr.deadline_ts - time.time()))
        if not self._fetch_global(rr, end):
            self._report(rr, cpu0, error="no global state from the root within the deadline")
            return
        per_node = rr.per_node and rr.local_steps > 0
        if per_node and (self.policy is None or self._chosen is None or self._chosen[:2] != (rr.round, rr.attempt)):
            self._report(rr, cpu0, error="no configurations chosen for this round and attempt: its plan query (stage "
                                         "choose) did not arrive")
            return
        sent = self._send_configs(rr, self.registry.live(for_round=rr.round), end)
        accepted, failures = self._collect(rr, sent, end)
        failed = len(failures)
        if per_node:
            self.policy.record_failures(rr.round, failures)  # out of memory: as the flat strategy, quorum or not
        if rr.local_steps == 0:  # the final sync: the nodes evaluated the final state and keep it for the export
            self._report(rr, cpu0, accepted=len(accepted), failed=failed)
            return
        if not sent or len(accepted) < quorum_count(self.cfg.region.quorum, len(sent)):
            self._report(rr, cpu0, error=f"{len(accepted)} of {len(sent)} nodes' updates arrived", failed=failed)
            return
        results = [accepted[n] for n in sorted(accepted)]
        pairs = list(zip([r.update for r in results], node_weights(results, rr.local_steps), strict=True))
        if isinstance(self.global_, ZeroPadLora):  # HetLoRA: the factors zero-padded, the states averaged
            partial = self.global_.partial(pairs)
        else:  # each node's change from the start it was sent (its first `rank` components)
            starts = [self.global_.start_for(self.state(r.node_id).structure, sent[r.node_id].config.rank,
                                             self._sent_rank(rr, sent[r.node_id].config.rank), LORA_ALPHA)
                      for r in results]
            partial = self.global_.partial(pairs, starts, [r.steps for r in results])  # FedNova: own steps
        data = partial.to_bytes()
        self.transport.send_transfer(self.up.region(self.rid, "upload"), data, rr.upload_transfer_id, self.rid)
        for r in results:
            self.state(r.node_id).record(r, self.structures.intern(r.update))
        stats = None
        if per_node:  # learnt from once the root sends the fleet's statistics (the next round's plan query)
            stats, self._unlearned = self.policy.round_stats(results), (rr.round, results)
            self._last_target.update({nid: p.config.target_sparsity for nid, p in sent.items()})
        self._report(rr, cpu0, accepted=len(results), failed=failed, size=len(data), stats=stats)

    def state(self, node_id: str) -> NodeState:
        return self.nodes.setdefault(node_id, NodeState())

    def _report(self, rr: RegionRound, cpu0: float, *, error: str = "", accepted: int = 0, failed: int = 0,
                size: int = 0, stats: RoundStats | None = None) -> None:
        """The round's RegionReport, with (if the root asked) the slowest completion at τ steps of the nodes live
        now under the next round's announced plan, which the root paces the next round to, and a per-node round's
        statistics of the accepted nodes (``stats``)."""
        next_finish = None
        if rr.next_rank is not None and rr.next_target_sparsity is not None:
            next_finish = self._slowest(rr.round + 1, rr.next_target_sparsity,
                                        lambda tier: rr.rank_for(tier, rr.next_rank), rr.local_steps)
        rep = RegionReport(run_id=rr.run_id, round=rr.round, region_id=self.rid, status="error" if error else "ok",
                           error=error, transfer_id=rr.upload_transfer_id, upload_bytes=size, accepted=accepted,
                           failed=failed, cpu_s=time.process_time() - cpu0, next_finish_s=next_finish,
                           labels=list(self.identity.labels or ()), base_model=self.identity.base_model,
                           **(stats.fields() if stats is not None else {}))
        self.transport.publish(self.up.region(self.rid, "report"), encode(rep), qos=1)
        (self.log.warning if error else self.log.info)("region_round_done", accepted=accepted, failed=failed,
                                                         upload_bytes=size, error=error, cpu_s=round(rep.cpu_s, 3),
                                                         next_finish_s=next_finish)

    def _slowest(self, rnd: int, sparsity: float, rank_for, tau: int) -> float:
        """The slowest completion at ``tau`` steps of the nodes live for round ``rnd`` under a plan (``sparsity``,
        each node's rank by its tier, ``rank_for``): ``planning.round_finish`` over their timings (``fleet_timing``:
        measured speeds, else presence timings; 0: none has one), as the root computes a flat round's finish."""
        live = self.registry.live(for_round=rnd)
        timing = fleet_timing(live, self.nodes, sparsity, {n.node_id: rank_for(n.device_type) for n in live})
        return planning.round_finish(timing, tau)

    def _answer_plan(self, q: RegionPlanQuery) -> None:
        """Answer the root's plan query at once.  Stage ``finish`` (a fleet-wide plan whose finish the root lacks: its
        first hierarchical round, the first after this region joined, a retried round with another plan): the
        slowest completion of the nodes live now under it; read-only, a round in progress is not disturbed.  The
        per-node stages (``_answer_per_node``) use and change only the policy's state for the next round."""
        if q.stage != "finish":
            self._answer_per_node(q)
            return
        finish = self._slowest(q.round, q.target_sparsity, q.rank_for, q.local_steps)
        ans = RegionPlan(run_id=q.run_id, round=q.round, attempt=q.attempt, region_id=self.rid, finish_s=finish)
        self.transport.publish(self.up.region(self.rid, "report"), encode(ans), qos=1)
        self.log.info("region_plan_answered", round_asked=q.round, attempt=q.attempt, finish_s=finish)

    def _answer_per_node(self, q: RegionPlanQuery) -> None:
        """A per-node policy's round, as a flat strategy's ``configure_round`` runs it over the whole fleet: stage
        ``timing`` gives the root this region's two slowest completions at τ of the nodes live now; stage ``choose``
        learns from the last round (``_learn``), chooses each live node's configuration with the fleet's two
        slowest, holds them for the RegionRound of this round and attempt and answers with their slowest completion
        at τ (the root paces the round to the latest of its regions'); stage ``learn`` (before the final sync) only
        learns."""
        policy = self._policy_for(q)
        if policy is None:
            return  # the root hears nothing: logged there (region_plans_missing) and here
        live = self.registry.live(for_round=q.round)
        ans = RegionPlan(run_id=q.run_id, round=q.round, attempt=q.attempt, region_id=self.rid)
        if q.stage == "timing":
            ans = dataclasses.replace(ans, slowest_at_tau=dict(policy.slowest_at_tau(live)))
        else:  # choose or learn: what the last round taught first, as a flat strategy learns before configuring
            self._learn(policy, q)
        if q.stage == "choose":
            plans = policy.choose(q.round, live, cut=q.cut, fleet=slowest_two(q.slowest_at_tau))
            self._chosen = (q.round, q.attempt, plans)
            ans = dataclasses.replace(ans, finish_s=policy.planned_finish(plans))
            self.log.info("region_configs_chosen", round_asked=q.round, attempt=q.attempt,
                          configs={p[0].node_id: {"sparsity": round(p[2], 4), "rank": p[3], "arm": p[4]} for p in plans})
        self.transport.publish(self.up.region(self.rid, "report"), encode(ans), qos=1)
        self.log.info("region_plan_answered", round_asked=q.round, attempt=q.attempt, stage=q.stage,
                      finish_s=ans.finish_s, slowest_at_tau=ans.slowest_at_tau or None)

    def _policy_for(self, q: RegionPlanQuery) -> FedSpine | None:
        """The per-node policy under the root's settings in ``q``: made at a run's first query and kept while they
        hold (its bandits live here); None if the settings are invalid (logged)."""
        key = (q.run_id, q.target_sparsity, sorted(q.caps.items()), q.ranks, sorted(q.reward.items()), q.total_rounds,
               q.seed, q.local_steps)
        if self.policy is not None and key == self._policy_key:
            return self.policy
        try:
            cfg = CoordinatorConfig(
                broker=self.cfg.broker,
                coordinator=RoundSettings(method="fedspine", rounds=q.total_rounds, local_steps=q.local_steps,
                                          seed=q.seed),
                pruning=PruningSettings(target_sparsity=q.target_sparsity, max_sparsity=dict(q.caps)),
                bandit=BanditSettings(ranks=tuple(q.ranks), reward=dict(q.reward)))
        except (ConfigError, TypeError, ValueError) as exc:
            self.log.error("region_policy_refused", error=str(exc))
            return None
        self.policy, self._policy_key = FedSpine(cfg, total_rounds=q.total_rounds, seed=q.seed), key
        self.policy.nodes = self.nodes  # one view of each node's state (speeds, sparsity, rank), the region's
        self._chosen = self._unlearned = None
        self.log.info("region_policy_started", method=self.policy.name, run_id=q.run_id, ranks=q.ranks,
                      target_sparsity=q.target_sparsity, caps=q.caps, total_rounds=q.total_rounds)
        return self.policy

    def _learn(self, policy: FedSpine, q: RegionPlanQuery) -> None:
        """Learn from this region's results of round ``q.learn_round`` against the fleet's statistics of that round,
        if the root aggregated this region's partial (``learn_regions``) - as a flat strategy learns after
        aggregating, before it configures the next round.  Results of any other round (a try the root did not
        count) are dropped."""
        held, self._unlearned = self._unlearned, None
        if held is None:
            return
        rnd, results = held
        if rnd != q.learn_round or self.rid not in q.learn_regions or not q.slowest:
            self.log.info("region_results_not_learned", results_round=rnd, learn_round=q.learn_round,
                          counted=self.rid in q.learn_regions)
            return
        terms = policy.learn_from(results, RoundStats.from_fields(q))
        self.log.info("region_learned", learn_round=rnd, rewards={n: round(v["reward"], 4) for n, v in terms.items()})

    def _command(self, cmd: Command) -> None:
        """The root's export: relayed to this region's live nodes; their ExportReports are counted by status and
        the summary (RegionExport) goes up on the region's report topic."""
        if cmd.command != "export":
            self.log.info("command_ignored", command=cmd.command)
            return
        live = {n.node_id for n in self.registry.live()}
        self.transport.publish(self.down.broadcast_command, encode(cmd), qos=1)
        self.log.info("export_requested", nodes=sorted(live))
        got: dict[str, str] = {}
        end = time.monotonic() + self.cfg.region.deadline_s
        while live - got.keys() and time.monotonic() < end and not self._stop.is_set():
            ev = self._get(min(0.5, end - time.monotonic()))
            if ev is None:
                continue
            kind, nid, payload = ev
            if kind == "report" and isinstance(payload, ExportReport) and payload.run_id == cmd.run_id and nid in live:
                got[nid] = payload.status
                self.log.info("node_exported", node=nid, status=payload.status, size_bytes=payload.size_bytes,
                              sparsity=payload.sparsity)
            elif kind == "status":
                self._idle(ev)
                if not self.registry.is_live(nid):
                    live.discard(nid)
            elif kind in ("round", "global", "command"):
                self.log.warning("round_overlap_dropped", kind=kind)
            else:
                self._idle(ev)
        statuses = [got.get(n, "missing") for n in sorted(live | got.keys())]
        rep = RegionExport(run_id=cmd.run_id, region_id=self.rid, nodes=len(statuses), ok=statuses.count("ok"),
                           skipped=statuses.count("skipped"), missing=statuses.count("missing"),
                           failed=sum(s in ("error", "oom") for s in statuses))
        self.transport.publish(self.up.region(self.rid, "report"), encode(rep), qos=1)
        (self.log.info if rep.ok == rep.nodes else self.log.warning)(
            "region_exported", nodes=rep.nodes, ok=rep.ok, skipped=rep.skipped, failed=rep.failed, missing=rep.missing)

    def _send_configs(self, rr: RegionRound, nodes: list[NodeInfo], end: float) -> dict[str, Participant]:
        """Send each node its configuration (``_assignments``) with its slice of the global state; node -> its
        Participant (the config as sent and when: its round time runs from then, as at the root)."""
        deadline_ts = time.time() + max(0.0, end - time.monotonic())
        sent, encoded = {}, {}
        for a in self._assignments(rr, nodes):
            nid, st = a.node_id, self.state(a.node_id)
            up = f"{rr.run_id}.r{rr.round}.a{rr.attempt}.{self.rid}.{nid}.up"  # a retried round's differ
            g = self._slice(st, self._sent_rank(rr, a.rank))
            down = f"{rr.run_id}.r{rr.round}.a{rr.attempt}.{self.rid}.{nid}.down" if g is not None else None
            self.reassembler.expect(up, nid)
            msg = RoundConfig(run_id=rr.run_id, round=rr.round, rank=a.rank, local_steps=a.local_steps,
                              target_sparsity=a.target_sparsity, importance=rr.importance, deadline_ts=deadline_ts,
                              upload_transfer_id=up, download_transfer_id=down, finish_s=a.finish_s,
                              min_steps=a.min_steps, max_steps=a.max_steps)
            sent[nid] = Participant(config=msg, upload_tid=up, sent_at=time.monotonic())
            self.transport.publish(self.down.node(nid, "config"), encode(msg), qos=1)
            if g is not None:
                if id(g) not in encoded:
                    encoded[id(g)] = g.to_bytes()
                self.transport.send_transfer(self.down.node(nid, "download"), encoded[id(g)], down, COORDINATOR_ID)
        return sent

    def _assignments(self, rr: RegionRound, nodes: list[NodeInfo]) -> list[Assignment]:
        """Each node's configuration for ``rr``, its steps aligned and paced to the fleet's finish ``rr.finish_s`` as
        a flat round's (none: τ unpaced).  A per-node round: the configurations chosen for it (``_answer_per_node``)
        of the nodes still live, as the policy assigns them; otherwise the root's fleet-wide assignment (a node
        already sparser keeps its sparsity; HetLoRA: its tier's rank), or at a per-node run's final sync, each
        node's last target."""
        if rr.per_node and rr.local_steps > 0:
            live = {n.node_id for n in nodes}
            plans = [p for p in self._chosen[2] if p[0].node_id in live]
            return self.policy.assign(rr.round, plans, rr.finish_s, paced=rr.finish_s is not None)
        ranks = {n.node_id: rr.rank_for(n.device_type) for n in nodes}  # the round's rank, or its tier's (HetLoRA)
        timing = fleet_timing(nodes, self.nodes, rr.target_sparsity, ranks) if rr.finish_s is not None else {}
        work = planning.plan_round(timing, [n.node_id for n in nodes], rr.local_steps, rr.finish_s)
        out = []
        for n in nodes:
            st, w = self.state(n.node_id), work[n.node_id]
            target = self._last_target.get(n.node_id, st.sparsity) if rr.per_node else max(rr.target_sparsity,
                                                                                          st.sparsity)
            out.append(Assignment(node_id=n.node_id, target_sparsity=target, rank=ranks[n.node_id],
                                  local_steps=w.steps, importance=rr.importance, finish_s=w.finish_s,
                                  min_steps=w.min_steps, max_steps=w.max_steps))
        return out

    @staticmethod
    def _sent_rank(rr: RegionRound, rank: int) -> int:
        """The rank of the slice a node training at ``rank`` is sent: the round's, or its own if higher (as
        ``Strategy._sent_rank``)."""
        return max(rr.sent_rank, rank)

    def _slice(self, st: NodeState, rank: int) -> LoraUpdate | None:
        """A node's slice of the global state at ``rank`` (its kept structure; zero padding: the leading factors)."""
        if isinstance(self.global_, ZeroPadLora):
            return self.global_.slice_for(rank, LORA_ALPHA)
        return self.global_.slice_for(st.structure, rank, LORA_ALPHA)

    def _collect(self, rr: RegionRound, sent: dict[str, Participant], end: float):
        """Reports and uploads of the round's nodes until each answered or ``end``, by the root's bookkeeping
        (RoundCollector, coordinator/collect.py): (node -> NodeResult of the accepted ones, how many failed).  Presence
        goes to the registry and anything else to ``_idle``; the root's next round, global state or command while
        this one is collected is dropped (``round_overlap_dropped``)."""
        col = RoundCollector(sent, run_id=rr.run_id, round=rr.round, accept=self._accept, transport=self.transport,
                             reassembler=self.reassembler, topics=self.down, log=self.log, grace_s=OFFLINE_GRACE_S)
        while col.open and time.monotonic() < end and not self._stop.is_set():
            ev = self._get(min(0.5, end - time.monotonic()))
            if ev is not None:
                kind, nid, payload = ev
                if kind == "status":
                    self._idle(ev)
                    col.on_status(nid, self.registry.is_live(nid))
                elif kind == "report" and isinstance(payload, ExportReport):
                    self._idle(ev)
                elif kind == "report":
                    col.on_report(nid, payload)
                elif kind == "upload":
                    col.on_upload(nid, *payload)  # (transfer id, data)
                elif kind in ("round", "global", "command"):
                    self.log.warning("round_overlap_dropped", kind=kind)
                else:
                    self._idle(ev)
            col.scan(time.monotonic())
        accepted, failures = col.finish()
        for p in sent.values():
            self.reassembler.forget(p.upload_tid)
        return accepted, [failures[n] for n in sorted(failures)]

    def _accept(self, p: Participant) -> NodeResult | Failure:
        """The node's answer under the root's acceptance rule (``accept_answer``); a refusal is logged."""
        assert p.report is not None and p.payload is not None
        nid = p.report.node_id
        try:
            return accept_answer(p.config, p.report, p.payload, self.global_, self.state(nid).structure, self.limits,
                                 wall_s=p.received_at - p.sent_at)
        except UpdateError as exc:
            self.log.warning("update_rejected", node=nid, error=str(exc))
            return Failure(nid, "rejected")


def main_region(config: str) -> int:
    return Region(RegionConfig.load(config)).run()
