"""The Strategy interface (configure a round, aggregate a round, state to checkpoint) and what every method shares.

A method is a subclass that overrides only its algorithm: ``fleet_schedule`` (every node's sparsity and LoRA rank for
the round) where its schedule is one for the whole fleet, with ``tier_ranks`` where each device tier trains at its own
rank (HetLoRA), or ``schedule`` (each node's) where its policy is per node (it then says what in ``per_node_policy``:
regional aggregators run such a policy for their own nodes, ``choose`` and ``assign``, instead of relaying the
fleet-wide assignment, ``fleet_plan``),
``deploy_rank`` (the rank of the final model), ``make_aggregator`` (how updates combine) and, for a learning
policy, ``learn`` (what a round's results teach it).  Everything else is a system mechanism every method gets alike:
aligned and paced local steps (coordinator/planning.py), FedNova weighting and mask-aware aggregation
(coordinator/aggregation.py), the global model sent at the deployed rank, cuts made only with the fleet's averaged
importance, and importance tracked only by nodes that will still be cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch

from coordinator import planning
from coordinator.aggregation import GlobalLora, ZeroPadLora
from coordinator.config import CoordinatorConfig
from shared.messages import RoundConfig, RoundReport
from shared.updates import LORA_ALPHA, LoraUpdate, UpdateError, UpdateLimits


@dataclass(frozen=True)
class NodeInfo:
    """What the coordinator knows of a live node when it configures a round (from its presence message)."""

    node_id: str
    device_type: str = "default"
    memory_mb: int = 0
    step_s: float = 0.0  # seconds per local step it measured when it joined (0: unknown)
    overhead_s: float = 0.0  # and of its round's work outside the steps
    step_sparsity: float = 0.0  # the sparsity those steps ran at


@dataclass(frozen=True)
class Assignment:
    """One node's configuration for a round, as sent in its RoundConfig."""

    node_id: str
    target_sparsity: float
    rank: int
    local_steps: int
    importance: bool = True  # track LoRA-guided importance during the steps (the node will still be cut)
    arm: tuple[float, int] | None = None  # FedSpine: the bandit arm (Δp, rank) behind it
    planned_s: float | None = None  # the completion time the plan expects (None: not planned)
    # A paced round: the node stops at the step boundary nearest finish_s, the round's planned completion, after at
    # least min_steps and at most max_steps; local_steps is the plan (RoundConfig.steps_error checks the answer).
    finish_s: float | None = None
    min_steps: int = 0
    max_steps: int = 0


@dataclass(frozen=True)
class FleetPlan:
    """One round's assignment for every node of a sub-fleet, which a regional aggregator relays to each of its nodes
    (coordinator/region.py; it keeps a node's sparsity if it is already above ``target_sparsity``, and aligns and
    paces each node's steps to the fleet's finish as ``configure_round`` does: ``fleet_timing``)."""

    target_sparsity: float
    rank: int
    sent_rank: int  # rank of the global slice each node is sent (it trains from the first ``rank`` components)
    local_steps: int
    importance: bool  # track importance during the steps (a cut is still to come)
    # Each device tier's rank (HetLoRA; a tier the table does not name trains at ``rank``, and a node is sent the
    # slice at its rank where that is above ``sent_rank``); None: every node trains at ``rank``
    tier_ranks: dict[str, int] | None = None
    zero_pad_rank: int | None = None  # aggregation by zero padding to this rank (HetLoRA); None: the mask-aware one


@dataclass(frozen=True)
class NodeResult:
    """One node's accepted round result (validated at the boundary)."""

    node_id: str
    update: LoraUpdate
    samples: int
    loss_start: float
    loss_end: float
    compute_s: float
    round_time_s: float  # completion time: virtual (simulated device) or measured
    sparsity: float
    rank: int
    energy_j: float | None
    upload_bytes: int
    steps: int = 0  # local steps run (0: unknown, taken as τ)
    examples: int = 0  # the node's training examples (0: unknown; the weight falls back to samples per step)
    train_s: float = 0.0  # the local steps' share of round_time_s (0: unknown)
    upload_s: float = 0.0  # the upload's share of round_time_s

    @cached_property
    def update_norm(self) -> float:
        """‖scale·B·A‖ summed over the update's modules (``LoraUpdate.norm``; the reward's LoRA importance term),
        computed once per result."""
        return self.update.norm()

    def speed(self) -> planning.Speed | None:
        """The node's speed this round (planning.measured_speed), or None if it reported no timing."""
        return planning.measured_speed(self.round_time_s, self.train_s, self.upload_s, self.steps, self.sparsity,
                                       self.rank)

    @classmethod
    def from_report(cls, update: LoraUpdate, r: RoundReport, *, steps: int, upload_bytes: int,
                    wall_s: float) -> NodeResult:
        """A node's accepted answer: its update and report, the local steps it ran and, when it reported no virtual
        time, ``wall_s`` (from its configuration's publication to its upload's arrival) as its round time.  The root
        and the regional aggregators (coordinator/region.py) time their nodes alike."""
        round_time = r.virtual_s if r.virtual_s > 0 else wall_s
        return cls(node_id=r.node_id, update=update, samples=r.samples, loss_start=r.loss_start, loss_end=r.loss_end,
                   compute_s=r.compute_s, round_time_s=round_time, sparsity=r.sparsity, rank=r.rank,
                   energy_j=r.energy_j, upload_bytes=upload_bytes, steps=steps, examples=r.examples,
                   train_s=min(r.train_s, round_time), upload_s=min(r.upload_s, round_time))


def accept_answer(cfg: RoundConfig, rep: RoundReport, data: bytes, global_: GlobalLora | ZeroPadLora,
                  prev_structure: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None, limits: UpdateLimits, *,
                  wall_s: float) -> NodeResult:
    """A node's answer to ``cfg`` (its report ``rep`` and uploaded bytes ``data``) as a NodeResult, or UpdateError
    naming why it cannot be one: the upload is not the size the report gives, the node ran other than its assigned
    local steps (``RoundConfig.steps_error``; they weight its change), the bytes are no valid update within
    ``limits``, its rank is not the assigned one (the round's, or its tier's under HetLoRA), it does not fit
    ``global_`` (its modules and shapes), or a module kept indices that the node's last accepted structure
    ``prev_structure`` had cut (pruning is monotone).  ``wall_s`` is its round time where it reported no virtual time
    (``NodeResult.from_report``).  The one acceptance rule of the root (``server.Coordinator._accept``) and of the
    regional aggregators (``region.Region._accept``); each caller logs a refusal."""
    if rep.upload_bytes and rep.upload_bytes != len(data):
        raise UpdateError(f"reported upload_bytes {rep.upload_bytes} != received {len(data)}")
    steps = rep.steps or cfg.local_steps  # 0: not reported, taken as assigned
    if why := cfg.steps_error(steps):  # the steps weight the node's change (aggregation.py)
        raise UpdateError(why)
    update = LoraUpdate.from_bytes(data, limits)
    ranks = {m.rank for m in update.modules.values()}
    if ranks and ranks != {cfg.rank}:
        raise UpdateError(f"update ranks {sorted(ranks)} differ from the assigned rank {cfg.rank}")
    global_.check(update)
    if prev_structure:
        for name, m in update.modules.items():
            if name in prev_structure and not (set(m.rows.tolist()) <= set(prev_structure[name][0].tolist())
                                               and set(m.cols.tolist()) <= set(prev_structure[name][1].tolist())):
                raise UpdateError(f"lora.{name}: kept indices grew back (pruning is monotone)")
    return NodeResult.from_report(update, rep, steps=steps, upload_bytes=len(data), wall_s=wall_s)


@dataclass(frozen=True)
class Failure:
    node_id: str
    reason: str  # timeout | oom | error | rejected | offline


@dataclass
class RoundSummary:
    round: int
    idle_fraction: float
    mean_round_time_s: float
    max_round_time_s: float
    node_terms: dict[str, dict] = field(default_factory=dict)  # node -> {"terms": {...}, "reward": r} (FedSpine)

    def log_fields(self) -> dict:
        return {"idle_fraction": round(self.idle_fraction, 4), "max_round_time_s": round(self.max_round_time_s, 3),
                **({"rewards": {n: round(v["reward"], 4) for n, v in self.node_terms.items()}} if self.node_terms else {})}

    def node_fields(self, node_id: str) -> dict:
        v = self.node_terms.get(node_id)
        if v is None:
            return {}
        return {"reward": v["reward"], **{f"r_{k}": t for k, t in v["terms"].items()}}

    def round_fields(self) -> dict:
        return {"idle_fraction": self.idle_fraction, "mean_round_time_s": self.mean_round_time_s,
                "max_round_time_s": self.max_round_time_s}


@dataclass
class NodeState:
    """The coordinator's view of one node across rounds."""

    sparsity: float = 0.0
    rank: int = 0
    structure: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # kept rows/cols per module
    speeds: list[planning.Speed] = field(default_factory=list)  # its last SPEED_WINDOW measured speeds

    @property
    def speed(self) -> planning.Speed | None:
        return planning.median_speed(self.speeds)

    def record(self, r: NodeResult, structure: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """What an accepted round tells of the node: its sparsity (never lower), rank, kept structure and speed."""
        self.sparsity = max(self.sparsity, float(r.sparsity))
        self.rank = r.rank
        self.structure = structure
        if (speed := r.speed()) is not None:
            self.speeds = [*self.speeds, speed][-planning.SPEED_WINDOW:]


class StructureTable:
    """Kept-index structures (each module's kept rows and cols) interned: one shared object per distinct structure.
    Nodes alike then share one slice cache entry and one copy in the checkpoint, and a fleet holds few distinct
    structures however many nodes it has.  The root's strategy and each regional aggregator record their nodes'
    structures (``NodeState.structure``) through one."""

    def __init__(self) -> None:
        self._known: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def intern(self, update: LoraUpdate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The update's kept rows/cols per module: the object already held for an equal structure, else a copy that
        is held from now on."""
        key = tuple((n, m.rows.numpy().tobytes(), m.cols.numpy().tobytes()) for n, m in sorted(update.modules.items()))
        found = self._known.get(key)
        if found is None:
            found = self._known[key] = {n: (m.rows.clone(), m.cols.clone()) for n, m in update.modules.items()}
        return found


def node_timing(node: NodeInfo, st: NodeState, sparsity: float, rank: int) -> planning.Timing | None:
    """(fixed seconds, seconds per step) of a node at ``sparsity`` and ``rank``: from the step-cost model at its
    median speed, or before it has an accepted round, from what it measured when it joined (None: neither)."""
    if (speed := st.speed) is not None:
        return planning.timing_at(speed, sparsity, rank)
    if node.step_s > 0:
        return node.overhead_s, node.step_s * planning.step_cost(sparsity) / planning.step_cost(node.step_sparsity)
    return None


def fleet_timing(nodes: Sequence[NodeInfo], states: Mapping[str, NodeState], target: float,
                 rank: int | Mapping[str, int]) -> dict[str, planning.Timing]:
    """Each node's timing under a fleet-wide ``target`` sparsity and ``rank`` (a node already sparser at its own; a
    mapping: each node's rank by id, HetLoRA's tier ranks), as ``Strategy.configure_round`` times a fleet-wide round:
    a regional aggregator plans its nodes with it."""
    timing = {}
    for node in nodes:
        st = states.get(node.node_id) or NodeState()
        r = rank if isinstance(rank, int) else rank[node.node_id]
        if (t := node_timing(node, st, max(target, st.sparsity), r)) is not None:
            timing[node.node_id] = t
    return timing


def node_weights(results: Sequence[NodeResult], tau: int) -> list[float]:
    """Aggregation weight of each node: its training examples (FedAvg's n_i) when every node reported them, else its
    samples per local step (equal batches: equal weights, whatever the steps)."""
    if results and all(r.examples > 0 for r in results):
        return [float(r.examples) for r in results]
    return [r.samples / (r.steps or tau) for r in results]


class Strategy:
    """Configure rounds and aggregate them.  Subclasses override the algorithm only (see the module docstring)."""

    name: ClassVar[str]
    prunes: ClassVar[bool] = True  # whether the method ever cuts (its nodes then track importance)
    # What of the method's policy is per node ("": its schedule is fleet-wide, ``fleet_schedule``); under regions each
    # region then runs the policy for its own nodes (coordinator/region.py).
    per_node_policy: ClassVar[str] = ""

    def __init__(self, cfg: CoordinatorConfig, total_rounds: int, seed: int = 0) -> None:
        self.cfg, self.total_rounds, self.seed = cfg, total_rounds, seed
        self.tau = cfg.coordinator.local_steps
        self.global_ = self.make_aggregator()
        self.nodes: dict[str, NodeState] = {}
        self._pending: dict[str, tuple[Assignment, float]] = {}  # node -> (assignment, sparsity before the round)
        self._structures = StructureTable()  # nodes' kept-index structures, one object per distinct one

    # ---- the algorithm: what a method overrides -------------------------------------------------------------
    def begin_round(self, rnd: int, nodes: Sequence[NodeInfo], fleet=None) -> None:
        """Called before the round's ``schedule`` calls, with all of its participants (a region: its own, and in
        ``fleet`` what the method needs of the others, FedSpine's ``slowest_at_tau``)."""

    def fleet_schedule(self, rnd: int) -> tuple[float, int]:
        """(every node's sparsity after this round's cut, their LoRA rank): a fleet-wide method's whole schedule."""
        raise NotImplementedError(f"{self.name} has a per-node policy: {self.per_node_policy}")

    def tier_ranks(self) -> dict[str, int] | None:
        """Each device tier's LoRA rank, where the method trains every tier at its own (HetLoRA; a tier the table does
        not name trains at ``fleet_schedule``'s rank); None: every node at that rank."""
        return None

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState) -> tuple[float, int, tuple[float, int] | None]:
        """(the node's sparsity after this round's cut, its LoRA rank, the bandit arm behind them or None); a
        per-node policy overrides it, a fleet-wide one gives every node ``fleet_schedule`` (at its tier's rank
        where the method has ``tier_ranks``: the rule a region applies, ``RegionRound.rank_for``)."""
        target, rank = self.fleet_schedule(rnd)
        tiers = self.tier_ranks()
        return max(st.sparsity, target), tiers.get(node.device_type, rank) if tiers else rank, None

    def deploy_rank(self) -> int:
        """Rank of the slice each node deploys (merged into its weights: at inference a rank costs nothing)."""
        return self.cfg.lora.rank

    def make_aggregator(self) -> GlobalLora | ZeroPadLora:
        return GlobalLora()

    def learn(self, rnd: int, results: Sequence[NodeResult], summary: RoundSummary) -> None:
        """What an accepted round teaches the policy (FedSpine: rewards and the bandit)."""

    def will_prune(self, rnd: int) -> bool:
        """Whether any node may still be cut after round ``rnd`` (its steps then track importance)."""
        return self.prunes

    def policy_state(self) -> dict:
        return {}

    def load_policy_state(self, d: dict) -> None:
        pass

    def record_failures(self, rnd: int, failures: Sequence[Failure]) -> None:
        """Failed nodes of a round (e.g. out of memory), for a policy that learns from them."""

    # ---- configure --------------------------------------------------------------------------------------------
    def state(self, node_id: str) -> NodeState:
        return self.nodes.setdefault(node_id, NodeState())

    def configure_round(self, rnd: int, nodes: Sequence[NodeInfo]) -> list[Assignment]:
        return self.assign(rnd, self.choose(rnd, nodes))

    def choose(self, rnd: int, nodes: Sequence[NodeInfo], *, cut: bool | None = None, fleet=None) -> list[list]:
        """Each node's configuration for round ``rnd``, before its steps are planned: [node, its state, target
        sparsity, rank, arm].  No cut before the fleet's averaged importance exists (``cut``: whether it does, where
        the global state is another process's; default ``has_fleet_importance()``); ``fleet``: ``begin_round``'s."""
        plans = []
        self.begin_round(rnd, nodes, fleet)
        for node in nodes:
            st = self.state(node.node_id)
            target, rank, arm = self.schedule(rnd, node, st)
            plans.append([node, st, float(max(target, st.sparsity)), int(rank), arm])
        if not (self.has_fleet_importance() if cut is None else cut):
            # A cut ranks groups by the fleet's averaged importance, which comes with the slice once a round with
            # importance scores was aggregated: until then nobody is cut.
            for plan in plans:
                plan[2] = plan[1].sparsity
                if plan[4] is not None:  # the arm played is the one that ran: no increment
                    plan[4] = (0.0, plan[3])
        return plans

    def planned_finish(self, plans: Sequence[list]) -> float:
        """The slowest completion at τ steps under ``plans`` (``planning.round_finish``; 0: no node has a timing)."""
        return planning.round_finish(self._timing(plans), self.tau)

    def assign(self, rnd: int, plans: Sequence[list], finish: float | None = None, *,
               paced: bool = True) -> list[Assignment]:
        """The round's assignments from ``choose``'s ``plans``: steps aligned and paced to ``finish`` (default the
        slowest of ``plans``: a region passes the fleet's), or with ``paced`` False τ steps unpaced; remembered for
        what the round teaches (``record_failures``, ``learn``)."""
        work = planning.plan_round(self._timing(plans) if paced else {}, [p[0].node_id for p in plans], self.tau,
                                   finish)
        track = self.will_prune(rnd)
        out, self._pending = [], {}
        for node, st, target, rank, arm in plans:
            w = work[node.node_id]
            a = Assignment(node_id=node.node_id, target_sparsity=target, rank=rank, local_steps=w.steps,
                           importance=track, arm=arm, planned_s=w.planned_s, finish_s=w.finish_s,
                           min_steps=w.min_steps, max_steps=w.max_steps)
            self._pending[node.node_id] = (a, st.sparsity)
            out.append(a)
        return out

    def _timing(self, plans: Sequence[list]) -> dict[str, planning.Timing]:
        """node -> (fixed seconds, seconds per step) at its planned sparsity and rank (``node_timing``)."""
        timing = {}
        for node, st, target, rank, _ in plans:
            if (t := node_timing(node, st, target, rank)) is not None:
                timing[node.node_id] = t
        return timing

    def fleet_plan(self, rnd: int, *, fleet_importance: bool | None = None) -> FleetPlan:
        """Round ``rnd``'s one assignment for every node under the regional aggregators: the fleet-wide schedule with
        the rules ``configure_round`` applies (no cut before the fleet's averaged importance exists; importance
        tracked while a cut is still to come) and τ local steps, which each region aligns and paces for its nodes
        (``fleet_timing``); with the method's tier ranks and, for zero-padding aggregation, its padding rank (HetLoRA:
        each node then trains at its tier's rank, and the region sums zero-padded factors).  ``fleet_importance``
        stands for ``has_fleet_importance()`` when the root announces the next round's plan before this one is
        aggregated.  A per-node policy has none (NotImplementedError): the regions run it (``choose``, ``assign``)."""
        target, rank = self.fleet_schedule(rnd)
        if not (self.has_fleet_importance() if fleet_importance is None else fleet_importance):
            target = 0.0  # a region keeps each node's own sparsity: nobody is cut
        zero_pad = self.global_.padding_rank() if isinstance(self.global_, ZeroPadLora) else None
        return FleetPlan(target_sparsity=float(target), rank=int(rank), sent_rank=self._sent_rank(int(rank)),
                         local_steps=self.tau, importance=self.will_prune(rnd), tier_ranks=self.tier_ranks(),
                         zero_pad_rank=zero_pad)

    def has_fleet_importance(self) -> bool:
        return isinstance(self.global_, GlobalLora) and bool(self.global_.importance)

    # ---- what each node is sent -------------------------------------------------------------------------------
    def _sent_rank(self, rank: int) -> int:
        """A node is sent the global model at the deployed rank (or its own, if larger): what it evaluates is the
        model as deployed, and it trains from the slice's leading ``rank`` components."""
        return max(rank, self.deploy_rank())

    def download_slice(self, node_id: str, rank: int) -> LoraUpdate | None:
        if isinstance(self.global_, ZeroPadLora):
            return self.global_.slice_for(self._sent_rank(rank), LORA_ALPHA)
        return self.global_.slice_for(self.state(node_id).structure, self._sent_rank(rank), LORA_ALPHA)

    def global_slice(self, node_id: str, rank: int) -> LoraUpdate | None:
        """The slice a node of training rank ``rank`` starts its local steps from: the first ``rank`` components of
        what it was sent."""
        if isinstance(self.global_, ZeroPadLora):
            sent = self.download_slice(node_id, rank)
            return sent.leading(rank) if sent is not None else None
        return self.global_.start_for(self.state(node_id).structure, rank, self._sent_rank(rank), LORA_ALPHA)

    # ---- aggregate --------------------------------------------------------------------------------------------
    def aggregate_round(self, rnd: int, results: Sequence[NodeResult], failures: Sequence[Failure]) -> RoundSummary:
        self.record_failures(rnd, failures)
        pairs = list(zip([r.update for r in results], node_weights(results, self.tau), strict=True))
        if isinstance(self.global_, GlobalLora):
            # What each node started from: the slice configure/send gave it (cached in the global state).
            self.global_.aggregate(pairs, starts=[self.global_slice(r.node_id, r.rank) for r in results],
                                   steps=[r.steps or self.tau for r in results])
        else:
            self.global_.aggregate(pairs)
        for r in results:
            self.state(r.node_id).record(r, self._structures.intern(r.update))
        times = [r.round_time_s for r in results]
        summary = RoundSummary(round=rnd, idle_fraction=planning.idle_fraction(times),
                               mean_round_time_s=sum(times) / max(len(times), 1),
                               max_round_time_s=max(times, default=0.0))
        self.learn(rnd, results, summary)
        return summary

    # ---- persistence ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able state plus ``tensors`` (global state and node structures) for the checkpoint store."""
        tensors = dict(self.global_.state_tensors())
        tensors.update(self.global_.momentum_tensors())
        nodes, keys = {}, {}  # each distinct structure object is stored once, as structure.s<k>.<module>.rows/cols
        for nid, st in self.nodes.items():
            nodes[nid] = {"sparsity": st.sparsity, "rank": st.rank, "speeds": [list(v) for v in st.speeds],
                          "modules": sorted(st.structure or {})}
            if st.structure:
                if id(st.structure) not in keys:
                    keys[id(st.structure)] = f"s{len(keys)}"
                    for name, (rows, cols) in st.structure.items():
                        tensors[f"structure.{keys[id(st.structure)]}.{name}.rows"] = rows
                        tensors[f"structure.{keys[id(st.structure)]}.{name}.cols"] = cols
                nodes[nid]["structure"] = keys[id(st.structure)]
        return {"method": self.name, "policy": self.policy_state(), "nodes": nodes, "tensors": tensors}

    def load_state_dict(self, d: dict) -> None:
        if d.get("method") != self.name:
            raise ValueError(f"checkpoint was written by method {d.get('method')!r}, not {self.name!r}")
        tensors = d.get("tensors", {})
        self.global_.load_tensors({k: v for k, v in tensors.items() if not k.startswith("structure.")})
        self.nodes = {}
        shared: dict[str, dict] = {}
        for nid, st in d["nodes"].items():
            key = st.get("structure", nid)  # older checkpoints: one copy per node, under its id
            if key not in shared:
                shared[key] = {name: (tensors[f"structure.{key}.{name}.rows"], tensors[f"structure.{key}.{name}.cols"])
                               for name in st["modules"]}
            structure = shared[key] or None
            self.nodes[nid] = NodeState(sparsity=float(st["sparsity"]), rank=int(st["rank"]), structure=structure,
                                        speeds=[tuple(float(x) for x in v) for v in st.get("speeds", [])])
        self.load_policy_state(d.get("policy", {}))
