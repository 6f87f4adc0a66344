"""FedSpine: per-node S-UCB choice of the pruning increment and LoRA rank, every node ending at or above s*."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator import planning
from coordinator.bandit import FleetBandit
from coordinator.reward import RewardInput, rewards
from coordinator.strategies.base import Failure, NodeInfo, NodeResult, NodeState, RoundSummary, Strategy

DELTA_P = (0.0, 0.05, 0.10, 0.15)  # the bandit's pruning increments
DISCOUNT = 0.95  # λ
EXPLORATION = 0.05  # s, the exploration bonus weight (rewards lie in [0, 1])
IDLE_TOLERANCE = 0.10  # waiting a round may keep before a node at the step cap holds others back (ours)


class FedSpine(Strategy):
    name = "fedspine"
    aligned = True

    def __init__(self, cfg, total_rounds: int, seed: int = 0) -> None:
        super().__init__(cfg, total_rounds, seed)
        b = cfg.bandit
        self.bandit = FleetBandit(DELTA_P, b.ranks, discount=DISCOUNT, exploration=EXPLORATION,
                                  target_sparsity=b.target_sparsity, total_rounds=total_rounds, seed=seed)
        self.last_time_s: dict[str, float] = {}  # completion time at τ steps in the node's last accepted round
        self.behind: dict[str, bool | None] = {}  # it held the fleet back in that round
        self._beyond: dict[str, bool] = {}  # the bandit chose its Δp at or above the target this round
        self._held: set[str] = set()

    def deploy_rank(self) -> int:
        return max(self.cfg.bandit.ranks)

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        c = self.bandit.choose(node.node_id, rnd, st.sparsity, self.cfg.bandit.cap(node.device_type),
                               behind=self.behind.get(node.node_id))
        self._beyond[node.node_id] = c.beyond_target
        return c.target_sparsity, c.rank, c.arm

    def adjust(self, rnd: int, plans: list[list], timing: dict[str, planning.Timing]) -> None:
        """Keep a node that would wait at the step cap from pruning ahead of the round's slowest node (ours).

        A round lasts as long as its slowest node at τ steps, and a faster node fills it with more steps, up to the
        cap.  A node at the cap cannot use more speed: pruning it further only makes it wait longer and costs its
        model capacity early.  So when, at the sparsity the bandit chose, a node would run at the cap and still wait
        more than IDLE_TOLERANCE of the round, it gets the largest allowed increment that keeps it at or below the
        slowest node's sparsity: slow nodes prune faster than fast ones."""
        self._held = set()
        _, most = planning.pace_bounds(self.tau)
        if most <= self.tau or len(timing) < 2:
            return
        at_tau = {n: fixed + self.tau * per_step for n, (fixed, per_step) in timing.items()}
        slowest = max(at_tau, key=at_tau.get)
        finish = at_tau[slowest]
        ceiling = next(plan[2] for plan in plans if plan[0].node_id == slowest)
        b = self.cfg.bandit
        for plan in plans:
            node, st, target, rank, arm = plan
            if arm is None or node.node_id not in timing or target <= ceiling + self.bandit.grain:
                continue
            fixed, per_step = timing[node.node_id]
            if finish - (fixed + most * per_step) <= IDLE_TOLERANCE * finish:
                continue
            lowered = self.bandit.at_most(node.node_id, rnd, st.sparsity, b.cap(node.device_type), rank, ceiling)
            if lowered.target_sparsity < target - 1e-9:
                plan[2], plan[3], plan[4] = float(max(lowered.target_sparsity, st.sparsity)), lowered.rank, lowered.arm
                self._held.add(node.node_id)

    def effective_steps(self, results: Sequence[NodeResult]) -> float | None:
        """Once every node of the round trained at the target sparsity, the averaged per-step change moves the global
        state τ steps, as an unaligned round does: there is no cut left to recover from (ours)."""
        goal = self.cfg.bandit.target_sparsity - self.bandit.grain
        return self.tau if results and all(r.sparsity >= goal for r in results) else None

    def record_failures(self, rnd: int, failures: Sequence[Failure]) -> None:
        """Out-of-memory failures exclude that arm and every heavier one for the node."""
        for f in failures:
            if f.reason == "oom" and f.node_id in self._pending:
                a = self._pending[f.node_id][0]
                self.bandit.out_of_memory(f.node_id, a.target_sparsity, a.rank)

    def modelled_time_s(self, node_id: str, sparsity: float) -> float | None:
        """The node's completion time at τ steps and ``sparsity`` at its median speed (None before a timing)."""
        speed = self.state(node_id).speed
        return None if speed is None else planning.time_at(speed, sparsity, self.tau)

    def learn(self, rnd: int, results: Sequence[NodeResult], summary: RoundSummary) -> None:
        """Reward each node's arm.  Times are compared at τ steps on the step-cost model at each node's median
        speed, so a node that kept its configuration gains or loses nothing by one noisy reading."""
        was = {r.node_id: self._pending.get(r.node_id, (None, 0.0))[1] for r in results}
        paced = {r.node_id: self.modelled_time_s(r.node_id, float(r.sparsity)) for r in results}
        prev = {n: (self.modelled_time_s(n, was[n]) if n in self.last_time_s else None) for n in paced}
        goal = self.cfg.bandit.target_sparsity
        inputs = [RewardInput(node_id=r.node_id, loss_start=r.loss_start, loss_end=r.loss_end,
                              delta_sparsity=max(min(float(r.sparsity), goal) - min(was[r.node_id], goal), 0.0),
                              round_time_s=paced[r.node_id] or r.round_time_s, importance=r.update.norm(),
                              energy_j=r.energy_j, samples=r.samples, prev_time_s=prev[r.node_id])
                  for r in results]
        summary.node_terms = rewards(inputs, self.cfg.bandit.reward, goal)
        times = {x.node_id: x.round_time_s for x in inputs}
        mean_t = sum(times.values()) / max(len(times), 1)
        capped = self._capped(results, summary.idle_fraction)
        for r in results:
            self.last_time_s[r.node_id] = times[r.node_id]
            # Behind: it held the fleet back.  With aligned steps nobody waited for a slow node unless another node
            # was held at the step cap and the round idled beyond tolerance.
            others_capped = capped is None or bool(capped - {r.node_id})
            self.behind[r.node_id] = (times[r.node_id] > mean_t and others_capped) if len(results) > 1 else None
            a = self._pending.get(r.node_id, (None, 0.0))[0]
            if a is not None and a.arm is not None:
                self.bandit.update(r.node_id, self.bandit.arms.index(a.arm), summary.node_terms[r.node_id]["reward"],
                                   beyond_target=self._beyond.get(r.node_id, False))

    def _capped(self, results: Sequence[NodeResult], idle: float) -> set[str] | None:
        """The nodes of the round held at the step cap while it idled beyond IDLE_TOLERANCE (none otherwise), or
        None if the round's steps were not planned (no node timing yet)."""
        pending = {r.node_id: self._pending.get(r.node_id, (None, 0.0))[0] for r in results}
        if any(a is None or a.planned_s is None for a in pending.values()):
            return None
        if idle <= IDLE_TOLERANCE:
            return set()
        _, most = planning.pace_bounds(self.tau)
        return {r.node_id for r in results if (r.steps or pending[r.node_id].local_steps) >= most}

    def policy_state(self) -> dict:
        return {"bandit": self.bandit.state_dict(), "last_time_s": self.last_time_s, "behind": self.behind}

    def load_policy_state(self, d: dict) -> None:
        if "bandit" in d:
            self.bandit.load_state_dict(d["bandit"])
        self.last_time_s = {k: float(v) for k, v in d.get("last_time_s", {}).items()}
        self.behind = dict(d.get("behind", {}))
