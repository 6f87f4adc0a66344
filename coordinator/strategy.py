"""Round policy: which configuration each node gets, and what an accepted round does to the global state.

One ``Strategy`` class serves FedSpine and the baselines of the spec; they differ only in how a round is
configured (the schedule) and how updates are combined:

| method    | sparsity schedule                                  | rank                 | aggregation  |
|-----------|----------------------------------------------------|----------------------|--------------|
| fedspine  | per-node S-UCB increments, every node ends >= s*   | per-node S-UCB       | coverage avg |
| fedlora   | none                                               | static_rank          | coverage avg |
| hetlora   | none                                               | by device tier       | zero-padding |
| uniform   | the same linear increments for all, s* by 2/3 of T | static_rank          | coverage avg |
| prune_ft  | s* in round 1 (pruned after its τ steps)           | static_rank          | coverage avg |
| ft_prune  | none, then s* in the last ~15 % of rounds          | static_rank          | coverage avg |
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from coordinator.aggregation import GlobalLora, ZeroPadLora
from coordinator.bandit import Choice, FleetBandit
from coordinator.config import CoordinatorConfig
from coordinator.reward import RewardInput, rewards
from shared.updates import LoraUpdate, UpdateError

LORA_ALPHA = 16.0  # LoRA alpha of the nodes' TrainSettings default: a slice of rank r has scale alpha / r


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    device_type: str = "default"
    memory_mb: int = 0
    step_s: float = 0.0  # seconds per local step the node measured when it joined (0: unknown)
    overhead_s: float = 0.0  # and of its round's work outside the steps
    step_sparsity: float = 0.0  # the sparsity and LoRA rank of those steps (rank 0: unknown)
    step_rank: int = 0


@dataclass(frozen=True)
class Assignment:
    node_id: str
    target_sparsity: float
    rank: int
    local_steps: int
    arm: tuple[float, int] | None = None
    prune_random: bool = False
    planned_s: float | None = None  # the completion time step alignment planned for it (None: not aligned)
    held: bool = False  # its increment was lowered: it waited at the step cap (Strategy._hold_capped)
    # A paced round (``[coordinator] pace_steps``): the node stops at the step boundary nearest finish_s, the
    # round's planned completion, after at least min_steps and at most max_steps; local_steps is the plan.
    finish_s: float | None = None
    min_steps: int = 0
    max_steps: int = 0

    def allows(self, steps: int) -> bool:
        """Whether a node that ran ``steps`` local steps did as assigned."""
        if self.finish_s is not None:
            return self.min_steps <= steps <= self.max_steps
        return steps == self.local_steps


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
    train_sparsity: float | None = None  # the sparsity the local steps ran at (None: unknown, taken as sparsity)

    def timing(self) -> tuple[float, float] | None:
        """(seconds of the round outside the local steps, seconds per local step), or None if not reported."""
        if self.train_s <= 0 or self.steps <= 0:
            return None
        return max(self.round_time_s - self.train_s, 0.0), self.train_s / self.steps

    @property
    def steps_at(self) -> tuple[float, int]:
        """The (sparsity, LoRA rank) its local steps ran at."""
        return float(self.sparsity if self.train_sparsity is None else self.train_sparsity), int(self.rank)

    def paced_time_s(self, tau: int) -> float:
        """The completion time this node would have had at τ local steps (its round time when it ran τ)."""
        t = self.timing()
        return self.round_time_s if t is None else t[0] + tau * t[1]


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
    node_terms: dict[str, dict] = field(default_factory=dict)  # node -> {"terms": {...}, "reward": r}
    effective_steps: int | None = None  # the round moved the global state this many steps (None: the mean step count)

    def log_fields(self) -> dict:
        return {"idle_fraction": round(self.idle_fraction, 4), "max_round_time_s": round(self.max_round_time_s, 3),
                "rewards": {n: round(v["reward"], 4) for n, v in self.node_terms.items()},
                "effective_steps": self.effective_steps}

    def node_fields(self, node_id: str) -> dict:
        v = self.node_terms.get(node_id)
        if v is None:
            return {}
        return {"reward": v["reward"], **{f"r_{k}": t for k, t in v["terms"].items()}}

    def round_fields(self) -> dict:
        return {"idle_fraction": self.idle_fraction, "mean_round_time_s": self.mean_round_time_s,
                "max_round_time_s": self.max_round_time_s, "effective_steps": self.effective_steps}


def aligned_steps(timing: dict[str, tuple[float, float]], tau: int, most: int) -> dict[str, int]:
    """Local steps per node so that every node finishes with the slowest one at τ steps (ours).

    ``timing``: node -> (fixed seconds of its round, seconds per local step), from its last round.  A round
    takes as long as its slowest node, so a node that would finish early runs more steps in that time instead
    of waiting: up to ``most``, never fewer than τ.  The S-UCB configuration (pruning, rank) still decides how
    fast each node is; this only fills the wait that pruning and rank cannot remove.
    """
    if not timing or most <= tau:
        return {n: tau for n in timing}
    finish = round_finish(timing, tau)
    return {n: max(tau, min(most, int((finish - fixed) / per_step))) for n, (fixed, per_step) in timing.items()}


def round_finish(timing: dict[str, tuple[float, float]], tau: int) -> float:
    """The round's planned completion time: its slowest node's at τ steps (``timing`` as for aligned_steps)."""
    return max((fixed + tau * per_step for fixed, per_step in timing.values()), default=0.0)


def step_cost(at: tuple[float, int], cost_sparsity: float, cost_rank: float) -> float:
    """The step-cost model (ours): time per local step at ``at`` = (sparsity, LoRA rank), relative to a dense
    step without LoRA, (1 - cost_sparsity·s)(1 + cost_rank·r).  Pruning removes heads and FFN channels, whose
    multiply-adds are most of a step; the LoRA factors add work in proportion to the rank."""
    return (1 - cost_sparsity * at[0]) * (1 + cost_rank * at[1])


def step_cost_ratio(was: tuple[float, int], now: tuple[float, int], cost_sparsity: float, cost_rank: float) -> float:
    """Time per local step at configuration ``now`` over that at ``was`` (each (sparsity, LoRA rank)), by the
    step-cost model.  A rank of 0 (unknown) is taken as unchanged."""
    was = (was[0], was[1] or now[1])
    return step_cost(now, cost_sparsity, cost_rank) / step_cost(was, cost_sparsity, cost_rank)


def idle_fraction(times: Sequence[float]) -> float:
    """Mean share of the round each node waits for the slowest one."""
    slowest = max(times, default=0.0)
    if slowest <= 0:
        return 0.0
    return sum((slowest - t) / slowest for t in times) / len(times)


@dataclass
class NodeState:
    sparsity: float = 0.0
    rank: int = 0
    structure: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # kept rows/cols per module
    last_time_s: float | None = None  # completion time at τ steps in the node's last accepted round
    behind: bool | None = None  # it held the fleet back in that round (Strategy.aggregate_round)
    # The last ``speed_window`` accepted rounds' (time outside the local steps, time per step at step cost 1),
    # newest last: the step-cost model's view of the node (Strategy.median_speed, Strategy._timing)
    speeds: list[tuple[float, float]] = field(default_factory=list)


class Strategy:
    """Configure rounds and aggregate them, for FedSpine and every baseline (``method``)."""

    def __init__(self, cfg: CoordinatorConfig, total_rounds: int, seed: int = 0) -> None:
        self.cfg, self.method, self.total_rounds = cfg, cfg.coordinator.method, total_rounds
        b = cfg.bandit
        self.alpha = LORA_ALPHA
        self.bandit = FleetBandit(b.delta_p, b.ranks, discount=b.discount, exploration=b.exploration,
                                  target_sparsity=b.target_sparsity, total_rounds=total_rounds, seed=seed,
                                  factored=b.factored)
        c = cfg.coordinator
        self.global_ = ZeroPadLora() if self.method == "hetlora" else GlobalLora(c.coverage, c.min_keepers)
        self.nodes: dict[str, NodeState] = {}
        # node -> (assignment, sparsity before, whether the bandit chose its Δp at or above the target)
        self._pending: dict[str, tuple[Assignment, float, bool]] = {}

    @property
    def name(self) -> str:
        return self.method

    # ---- configure ----------------------------------------------------------------------------------------
    def _state(self, node_id: str) -> NodeState:
        return self.nodes.setdefault(node_id, NodeState())

    def _schedule(self, rnd: int, node: NodeInfo, st: NodeState) -> tuple[float, int, Choice | None]:
        b, T = self.cfg.bandit, self.total_rounds
        target, rank = b.target_sparsity, b.static_rank
        if self.method == "fedspine":
            c = self.bandit.choose(node.node_id, rnd, st.sparsity, b.cap(node.device_type), behind=st.behind)
            return c.target_sparsity, c.rank, c
        if self.method == "fedlora":
            return st.sparsity, rank, None
        if self.method == "hetlora":
            return st.sparsity, int(b.tier_ranks.get(node.device_type, b.tier_ranks.get("default", rank))), None
        if self.method == "uniform":
            reach = max(1, math.ceil(2 * T / 3))
            return max(st.sparsity, min(target, target * rnd / reach)), rank, None
        if self.method == "prune_ft":
            return max(st.sparsity, target), rank, None
        if self.method == "ft_prune":
            prune_round = T - max(1, round(0.15 * T)) + 1 if T > 1 else 1
            return (max(st.sparsity, target) if rnd >= prune_round else st.sparsity), rank, None
        raise ValueError(f"unknown method {self.method!r}")

    def configure_round(self, rnd: int, nodes: Sequence[NodeInfo]) -> list[Assignment]:
        c = self.cfg.coordinator
        plans = []
        for node in nodes:
            st = self._state(node.node_id)
            target, rank, choice = self._schedule(rnd, node, st)
            plans.append([node, st, float(max(target, st.sparsity)), int(rank), choice])
        steps, timing, held = {}, {}, set()
        if self.method in c.align_steps:
            held = self._hold_capped(rnd, plans) if self.method == "fedspine" else set()
            timing = self._timing(plans)
            steps = aligned_steps(timing, c.local_steps, c.max_steps)
        out = []
        self._pending = {}
        paced = c.pace_steps and c.max_steps > c.local_steps
        finish = round_finish(timing, c.local_steps)
        for node, st, target, rank, choice in plans:
            n = steps.get(node.node_id, c.local_steps)
            fixed_per_step = timing.get(node.node_id)  # empty unless steps are aligned
            pace = {"finish_s": finish, "min_steps": c.pace_min_steps, "max_steps": c.max_steps} \
                if fixed_per_step and paced else {}
            a = Assignment(node_id=node.node_id, target_sparsity=target, rank=rank, local_steps=n,
                           arm=choice.arm if choice else None,
                           planned_s=fixed_per_step[0] + n * fixed_per_step[1] if fixed_per_step else None,
                           held=node.node_id in held, **pace)
            self._pending[node.node_id] = (a, st.sparsity, bool(choice and choice.beyond_target))
            out.append(a)
        return out

    def _timing(self, plans: Sequence[list], cut: bool = False) -> dict[str, tuple[float, float]]:
        """node -> (seconds of its round outside the local steps, seconds per step) at this round's configuration.

        From the step-cost model at the node's median speed (``plan_from_model``; else its last round's); before
        it has an accepted round, from what it measured when it joined.  The steps run at the
        target sparsity, except a node's first cut, which comes after its steps (it has no importance yet;
        LocalTrainer.run_round); ``cut=True`` plans every node at its target (the speed its cut gives it)."""
        c = self.cfg.coordinator
        timing = {}
        for node, st, target, rank, _ in plans:
            now = (target if cut or st.structure is not None else st.sparsity, rank)
            if st.speeds:
                fixed, unit = self.median_speed(node.node_id) if c.plan_from_model else st.speeds[-1]
                timing[node.node_id] = (fixed, unit * self._step_cost(now))
            elif node.step_s > 0:
                was = (node.step_sparsity, node.step_rank)
                timing[node.node_id] = (node.overhead_s, node.step_s * step_cost_ratio(
                    was, now, c.step_cost_sparsity, c.step_cost_rank))
        return timing

    def _hold_capped(self, rnd: int, plans: Sequence[list]) -> set[str]:
        """Keep a node that would wait at the step cap from pruning ahead of the round's slowest node (ours).
        Returns the nodes whose increment was lowered.

        With aligned steps a round lasts as long as its slowest node at τ steps, and a faster node fills it with
        more steps, up to the cap (``max_steps_factor`` × τ).  A node at the cap cannot use more speed: pruning it
        further only makes it wait longer and costs its model capacity early, for target progress it can make once
        the slow node has caught up (the bandit keeps the target reachable).  So when, at the sparsity the bandit
        chose, a node would run at the cap and still wait more than ``idle_tolerance`` of the round, it gets the
        largest allowed increment that keeps it at or below the slowest node's sparsity (the smallest allowed if
        none does): the spec's ordering, slow nodes prune faster than fast ones.  Speeds are taken with every node
        at its chosen sparsity, first cuts included (those come after this round's steps: the choice sets the
        speed of the next one).
        """
        c, b = self.cfg.coordinator, self.cfg.bandit
        timing = self._timing(plans, cut=True)
        if c.max_steps <= c.local_steps or len(timing) < 2:
            return set()
        at_tau = {n: fixed + c.local_steps * per_step for n, (fixed, per_step) in timing.items()}
        slowest = max(at_tau, key=at_tau.get)
        finish = at_tau[slowest]
        ceiling = next(plan[2] for plan in plans if plan[0].node_id == slowest)
        held = set()
        for plan in plans:
            node, st, target, rank, choice = plan
            if choice is None or node.node_id not in timing or target <= ceiling + self.bandit.grain:
                continue
            fixed, per_step = timing[node.node_id]
            if finish - (fixed + c.max_steps * per_step) <= c.idle_tolerance * finish:
                continue
            lowered = self.bandit.at_most(node.node_id, rnd, st.sparsity, b.cap(node.device_type), rank, ceiling)
            if lowered.target_sparsity < target - 1e-9:
                plan[2], plan[3], plan[4] = float(max(lowered.target_sparsity, st.sparsity)), lowered.rank, lowered
                held.add(node.node_id)
        return held

    def final_rank(self) -> int:
        """Rank of the slice each node receives in the final sync: the largest any node trained with. The node
        merges it into its pruned weights for export, so the deployed model costs the same at any rank, and a
        low training rank (a slow device's) should not truncate the global model it deploys."""
        b = self.cfg.bandit
        if self.method == "fedspine":
            return max(b.ranks)
        if self.method == "hetlora":
            return max(int(r) for r in b.tier_ranks.values())
        return int(b.static_rank)

    def _sent_rank(self, rank: int) -> int:
        """The rank of the slice a node of training rank ``rank`` is sent (``eval_at_deploy_rank``)."""
        return max(rank, self.final_rank()) if self.cfg.coordinator.eval_at_deploy_rank else rank

    def download_slice(self, node_id: str, rank: int) -> LoraUpdate | None:
        """What a node of training rank ``rank`` is sent: the global slice at its structure, at the deployed rank
        when ``eval_at_deploy_rank`` (and that is larger), else at ``rank``.  The node evaluates the slice as it
        is and trains from its first ``rank`` components (``global_slice``)."""
        if isinstance(self.global_, ZeroPadLora):
            return self.global_.slice_for(self._sent_rank(rank), self.alpha)
        return self.global_.slice_for(self._state(node_id).structure, self._sent_rank(rank), self.alpha)

    def global_slice(self, node_id: str, rank: int) -> LoraUpdate | None:
        """The slice a node of training rank ``rank`` starts its local steps from: the first ``rank`` components
        of what it was sent (for FedSpine the best rank-``rank`` approximation; for HetLoRA the first ``rank``
        zero-padded components)."""
        if isinstance(self.global_, ZeroPadLora):  # (its aggregation takes no starts: nothing to share)
            sent = self.download_slice(node_id, rank)
            return sent.leading(rank) if sent is not None else None
        return self.global_.start_for(self._state(node_id).structure, rank, self._sent_rank(rank), self.alpha)

    # ---- aggregate ----------------------------------------------------------------------------------------
    def check_update(self, node_id: str, update: LoraUpdate, assignment: Assignment) -> None:
        """Refuse an update that cannot be this node's answer to ``assignment`` (raises UpdateError)."""
        ranks = {m.rank for m in update.modules.values()}
        if ranks and ranks != {assignment.rank}:
            raise UpdateError(f"update ranks {sorted(ranks)} differ from the assigned rank {assignment.rank}")
        if isinstance(self.global_, GlobalLora):
            self.global_.check(update)
        prev = self._state(node_id).structure
        if prev is not None:
            for name, m in update.modules.items():
                if name in prev and not (set(m.rows.tolist()) <= set(prev[name][0].tolist())
                                         and set(m.cols.tolist()) <= set(prev[name][1].tolist())):
                    raise UpdateError(f"lora.{name}: kept indices grew back (pruning is monotone)")

    def record_failures(self, rnd: int, failures: Sequence[Failure]) -> None:
        """Out-of-memory failures exclude that arm and every heavier one for the node."""
        for f in failures:
            if f.reason == "oom" and f.node_id in self._pending:
                a = self._pending[f.node_id][0]
                self.bandit.out_of_memory(f.node_id, a.target_sparsity, a.rank)

    def aggregate_round(self, rnd: int, results: Sequence[NodeResult], failures: Sequence[Failure]) -> RoundSummary:
        self.record_failures(rnd, failures)
        tau = self.cfg.coordinator.local_steps
        pairs = list(zip([r.update for r in results], node_weights(results, tau), strict=True))
        effective = tau if isinstance(self.global_, GlobalLora) and self._tuning(results) else None
        if isinstance(self.global_, GlobalLora):
            # What each node started from: the slice configure/send gave it (its structure and rank before this
            # round's results; cached in the global state until it changes, so this recomputes nothing).
            self.global_.aggregate(pairs, starts=[self.global_slice(r.node_id, r.rank) for r in results],
                                   steps=[r.steps or tau for r in results], effective_steps=effective)
        else:
            self.global_.aggregate(pairs)
        was = {}  # node -> its configuration before this round, if it had an accepted round before
        for r in results:
            st = self._state(r.node_id)
            was[r.node_id] = (st.sparsity, st.rank or r.rank) if st.last_time_s is not None else None
            st.sparsity = max(st.sparsity, float(r.sparsity))
            st.rank = r.rank
            st.structure = {n: (m.rows.clone(), m.cols.clone()) for n, m in r.update.modules.items()}
            if (t := r.timing()) is not None:
                speed = (t[0], t[1] / self._step_cost(r.steps_at))
                st.speeds = [*st.speeds, speed][-self.cfg.coordinator.speed_window:]
        times = [r.round_time_s for r in results]
        summary = RoundSummary(round=rnd, idle_fraction=idle_fraction(times),
                               mean_round_time_s=sum(times) / max(len(times), 1), max_round_time_s=max(times, default=0.0),
                               effective_steps=effective)
        # The bandit judges speed at equal work: each node's time had it run τ steps (aligned steps fill the
        # wait, so actual completion times say nothing about which configuration made a node fast).
        paced = {r.node_id: r.paced_time_s(tau) for r in results}
        prev = {r.node_id: self._state(r.node_id).last_time_s for r in results}
        modelled = {r.node_id: self.modelled_time_s(r.node_id, (float(r.sparsity), r.rank)) for r in results} \
            if self.cfg.coordinator.time_from_model else {}
        if modelled and all(v is not None for v in modelled.values()):
            # Now and before both on the node's median speed: the gain in alignment is what its choice changed.
            paced = modelled  # type: ignore[assignment]
            prev = {n: self.modelled_time_s(n, w) if w is not None else None for n, w in was.items()}
        inputs = [RewardInput(node_id=r.node_id, loss_start=r.loss_start, loss_end=r.loss_end,
                              delta_sparsity=self._progress(r),
                              round_time_s=paced[r.node_id], importance=r.update.norm(), energy_j=r.energy_j,
                              samples=r.samples, prev_time_s=prev[r.node_id])
                  for r in results]
        summary.node_terms = rewards(inputs, self.cfg.reward, self.cfg.bandit.target_sparsity)
        mean_paced = sum(paced.values()) / max(len(paced), 1)
        capped = self._capped(results, summary.idle_fraction)
        for r in results:
            st = self._state(r.node_id)
            st.last_time_s = paced[r.node_id]
            # Behind: it held the fleet back.  Where the round's steps were aligned, nobody waited for a slow node
            # unless another node was held at the step cap and the round idled beyond tolerance (``_capped``).
            others_capped = capped is None or bool(capped - {r.node_id})
            st.behind = paced[r.node_id] > mean_paced and others_capped if len(results) > 1 else None
        if self.method == "fedspine":
            for r in results:
                a, _, beyond = self._pending.get(r.node_id, (None, 0.0, False))
                if a is not None and a.arm is not None:
                    self.bandit.update(r.node_id, self.bandit.arms.index(a.arm), summary.node_terms[r.node_id]["reward"],
                                       beyond_target=beyond)
        return summary

    def _step_cost(self, at: tuple[float, int]) -> float:
        c = self.cfg.coordinator
        return step_cost(at, c.step_cost_sparsity, c.step_cost_rank)

    def median_speed(self, node_id: str) -> tuple[float, float] | None:
        """(seconds of a round outside the local steps, seconds per step at step cost 1): the medians over the
        node's last ``speed_window`` accepted rounds; None before it reported a timing.  One slow or fast reading
        on a shared machine moves them little."""
        speeds = self._state(node_id).speeds
        if not speeds:
            return None
        return statistics.median(f for f, _ in speeds), statistics.median(u for _, u in speeds)

    def modelled_time_s(self, node_id: str, at: tuple[float, int]) -> float | None:
        """The node's completion time at τ local steps at configuration ``at`` = (sparsity, LoRA rank), by the
        step-cost model at its median speed (``[coordinator] time_from_model``); None before it reported a
        timing.  Two configurations of one node compare at the same speed: their difference is the model's alone."""
        if (speed := self.median_speed(node_id)) is None:
            return None
        return speed[0] + self.cfg.coordinator.local_steps * speed[1] * self._step_cost(at)

    def _tuning(self, results: Sequence[NodeResult]) -> bool:
        """Whether this round's averaged per-step change moves the global state τ steps (ours,
        ``[coordinator] tune_at_tau``): with aligned steps, once every node of the round trained at the target
        sparsity or beyond.

        FedNova scales the averaged per-step change by the nodes' mean step count, so with aligned steps a round
        moves the global state as far as 2-3 τ steps would, while the pruning it recovers from goes on.  Once every
        node is at the target there is no further cut to recover from, and the baselines' rounds (τ steps each)
        move τ steps: from then on FedSpine's do too, and its extra steps only average the direction over more of
        the nodes' data (a smaller step toward the end, as a decaying learning rate would give)."""
        c = self.cfg.coordinator
        if not c.tune_at_tau or self.method not in c.align_steps or not results:
            return False
        goal = self.cfg.bandit.target_sparsity - self.bandit.grain
        return all(r.steps_at[0] >= goal for r in results)

    def _capped(self, results: Sequence[NodeResult], idle: float) -> set[str] | None:
        """The nodes of the round held at the step cap while it idled beyond ``idle_tolerance`` (none otherwise),
        or None if the round's steps were not aligned (ours).

        With aligned steps the fast nodes fill a slow node's round with more steps, so pruning the slow node
        further shortens the round without removing any waiting: the others just run fewer steps.  Only a node
        held at the cap (``max_steps_factor`` × τ; in a paced round, one that ran that many steps) waits, and only
        then does a shorter round remove idle time; up to the tolerance, the slow node's accuracy is worth more
        than the waiting it would remove.
        """
        c = self.cfg.coordinator
        pending = [self._pending.get(r.node_id, (None, 0.0, False))[0] for r in results]
        if not pending or any(a is None or a.planned_s is None for a in pending):
            return None
        if idle <= c.idle_tolerance:
            return set()
        return {r.node_id for r, a in zip(results, pending, strict=True) if (r.steps or a.local_steps) >= c.max_steps}

    def _progress(self, r: NodeResult) -> float:
        """Sparsity gained this round toward the fleet target (pruning beyond s* earns no progress)."""
        before = self._pending.get(r.node_id, (None, 0.0, False))[1]
        goal = self.cfg.bandit.target_sparsity
        return max(min(float(r.sparsity), goal) - min(before, goal), 0.0)

    # ---- persistence --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able state plus ``tensors`` (global state and node structures) for the checkpoint store."""
        tensors = dict(self.global_.state_tensors())
        nodes = {}
        for nid, st in self.nodes.items():
            nodes[nid] = {"sparsity": st.sparsity, "rank": st.rank, "last_time_s": st.last_time_s, "behind": st.behind,
                          "speeds": [list(v) for v in st.speeds],
                          "modules": sorted(st.structure or {})}
            for name, (rows, cols) in (st.structure or {}).items():
                tensors[f"structure.{nid}.{name}.rows"] = rows
                tensors[f"structure.{nid}.{name}.cols"] = cols
        return {"method": self.method, "bandit": self.bandit.state_dict(), "nodes": nodes, "tensors": tensors}

    def load_state_dict(self, d: dict) -> None:
        if d.get("method") != self.method:
            raise ValueError(f"checkpoint was written by method {d.get('method')!r}, not {self.method!r}")
        tensors = d.get("tensors", {})
        self.bandit.load_state_dict(d["bandit"])
        self.global_.load_tensors({k: v for k, v in tensors.items() if not k.startswith("structure.")})
        self.nodes = {}
        for nid, st in d["nodes"].items():
            structure = {name: (tensors[f"structure.{nid}.{name}.rows"], tensors[f"structure.{nid}.{name}.cols"])
                         for name in st["modules"]} or None
            self.nodes[nid] = NodeState(sparsity=float(st["sparsity"]), rank=int(st["rank"]), structure=structure,
                                        last_time_s=st.get("last_time_s"), behind=st.get("behind"),
                                        speeds=[(float(f), float(u)) for f, u in st.get("speeds", [])]
                                        [-self.cfg.coordinator.speed_window:])


def node_weights(results: Sequence[NodeResult], tau: int) -> list[float]:
    """Aggregation weight of each node: its training examples (FedAvg's n_i) when every node reported them,
    else its samples per local step (equal batches: equal weights, whatever the steps)."""
    if results and all(r.examples > 0 for r in results):
        return [float(r.examples) for r in results]
    return [r.samples / (r.steps or tau) for r in results]


def make_strategy(cfg: CoordinatorConfig, total_rounds: int, seed: int = 0) -> Strategy:
    return Strategy(cfg, total_rounds=total_rounds, seed=seed)
