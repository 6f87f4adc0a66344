"""FedSpine: each node's pruning increment and LoRA rank chosen every round by its S-UCB bandit (coordinator/bandit.py).

Below the fleet target s* every node prunes as its bandit chooses, the target kept reachable.  Beyond s* a node
prunes further only while it holds the round back: with aligned steps a round lasts as long as its slowest node at
τ steps, so pruning any other node would cost its accuracy and shorten nothing.  Such a node may take the increments
up to the first that brings its time at τ steps down to the slowest other node's, never beyond its tier's s_max, and
its bandit weighs the shorter round against the accuracy the cut costs.  The reward (coordinator/reward.py) values
the node's loss reduction, how close to the fastest possible round its configuration brought the fleet, the size of
its LoRA update and its energy per sample.  Final sparsity then differs per node, between s* and s_max.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator import planning
from coordinator.bandit import EPS, FleetBandit
from coordinator.reward import RewardInput, rewards
from coordinator.strategies.base import Failure, NodeInfo, NodeResult, NodeState, RoundSummary, Strategy

DELTA_P = (0.0, 0.05, 0.10, 0.15)  # the bandit's pruning increments
DISCOUNT = 0.95  # λ
EXPLORATION = 0.05  # s, the exploration bonus weight (rewards lie in [0, 1])


class FedSpine(Strategy):
    """Per node, S-UCB picks the pruning increment and LoRA rank each round; beyond s* only the node that holds the
    round back prunes further (up to its tier's s_max); mask-aware average."""

    name = "fedspine"
    per_node_policy = ("its S-UCB bandit chooses each node's pruning increment and LoRA rank every round, from "
                       "that node's rewards and timing")

    def __init__(self, cfg, total_rounds: int, seed: int = 0) -> None:
        super().__init__(cfg, total_rounds, seed)
        self.bandit = FleetBandit(DELTA_P, cfg.bandit.ranks, discount=DISCOUNT, exploration=EXPLORATION,
                                  target_sparsity=cfg.pruning.target_sparsity, total_rounds=total_rounds, seed=seed)
        self._at_tau: dict[str, float] = {}  # this round's participants: completion time at τ steps as they are
        self._tiers: dict[str, str] = {}

    def deploy_rank(self) -> int:
        return max(self.cfg.bandit.ranks)

    def _time(self, node_id: str, sparsity: float, rank: int) -> float | None:
        """The node's completion time at τ steps at (sparsity, rank), by the step-cost model (None before a timing)."""
        speed = self.state(node_id).speed
        return None if speed is None else planning.time_at(speed, sparsity, rank, self.tau)

    def begin_round(self, rnd: int, nodes: Sequence[NodeInfo]) -> None:
        self._tiers.update({n.node_id: n.device_type for n in nodes})
        self._at_tau = {}
        for n in nodes:
            st = self.state(n.node_id)
            t = self._time(n.node_id, st.sparsity, st.rank or max(self.cfg.bandit.ranks))
            if t is not None:
                self._at_tau[n.node_id] = t

    def _beyond_target(self, node_id: str, st: NodeState, cap: float) -> list[float]:
        """The increments a node at or above s* may take: none unless it holds the round back, then those up to the
        first that brings its time at τ steps down to the slowest other node's (within its cap)."""
        others = [t for n, t in self._at_tau.items() if n != node_id]
        mine = self._at_tau.get(node_id)
        if mine is None or not others or mine <= max(others):
            return [0.0]
        allowed, rank = [0.0], st.rank or max(self.cfg.bandit.ranks)
        for d in sorted(x for x in DELTA_P if x > 0):
            s = min(st.sparsity + d, cap)
            if s <= st.sparsity + EPS:
                break
            allowed.append(d)
            if (self._time(node_id, s, rank) or 0.0) <= max(others):
                break
        return allowed

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        cap = self.cfg.pruning.cap(node.device_type)
        beyond = st.sparsity >= self.bandit.goal(cap) - self.bandit.grain
        c = self.bandit.choose(node.node_id, rnd, st.sparsity, cap,
                               allowed=self._beyond_target(node.node_id, st, cap) if beyond else None)
        return c.target_sparsity, c.rank, c.arm

    def record_failures(self, rnd: int, failures: Sequence[Failure]) -> None:
        """Out-of-memory failures exclude that configuration and every heavier one for the node."""
        for f in failures:
            if f.reason == "oom" and f.node_id in self._pending:
                a = self._pending[f.node_id][0]
                self.bandit.out_of_memory(f.node_id, a.target_sparsity, a.rank)

    def round_shares(self, results: Sequence[NodeResult]) -> dict[str, float]:
        """Each node's time term: D_best / D (coordinator/reward.py), from its modelled completion time at τ steps
        (its measured round time before the model has its speed)."""
        at = {r.node_id: self._time(r.node_id, float(r.sparsity), r.rank) or r.round_time_s for r in results}
        # the slowest of the others: the slowest overall, or for the slowest node itself the runner-up (O(n))
        top = sorted(at.items(), key=lambda kv: kv[1], reverse=True)[:2]
        shares = {}
        for r in results:
            others = next((t for n, t in top if n != r.node_id), 0.0)
            cap = self.cfg.pruning.cap(self._tiers.get(r.node_id, "default"))
            fastest = self._time(r.node_id, max(cap, float(r.sparsity)), min(self.cfg.bandit.ranks))
            best = max(fastest if fastest is not None else at[r.node_id], others)
            shares[r.node_id] = min(1.0, best / max(at[r.node_id], others)) if at[r.node_id] > 0 else 1.0
        return shares

    def learn(self, rnd: int, results: Sequence[NodeResult], summary: RoundSummary) -> None:
        shares = self.round_shares(results)
        inputs = [RewardInput(node_id=r.node_id, loss_start=r.loss_start, loss_end=r.loss_end,
                              round_share=shares[r.node_id], importance=r.update.norm(), energy_j=r.energy_j,
                              samples=r.samples) for r in results]
        summary.node_terms = rewards(inputs, self.cfg.bandit.reward)
        for r in results:
            a = self._pending.get(r.node_id, (None, 0.0))[0]
            if a is not None and a.arm is not None:
                self.bandit.update(r.node_id, a.arm, summary.node_terms[r.node_id]["reward"])

    def policy_state(self) -> dict:
        return {"bandit": self.bandit.state_dict(), "tiers": self._tiers}

    def load_policy_state(self, d: dict) -> None:
        self.bandit.load_state_dict(d.get("bandit", {}))
        self._tiers = dict(d.get("tiers", {}))
