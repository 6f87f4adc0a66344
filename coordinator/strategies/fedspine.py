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
from coordinator.reward import RewardInput, RoundStats, Slowest, rewards, slowest_other, slowest_two
from coordinator.strategies.base import Failure, NodeInfo, NodeResult, NodeState, RoundSummary, Strategy

DELTA_P = (0.0, 0.05, 0.10, 0.15)  # the bandit's pruning increments
DISCOUNT = 0.95  # λ
EXPLORATION = 0.05  # s, the exploration bonus weight (rewards lie in [0, 1])


class FedSpine(Strategy):
    """Per node, S-UCB picks the pruning increment and LoRA rank each round; beyond s* only the node that holds the
    round back prunes further (up to its tier's s_max); mask-aware average.

    Under regional aggregators each region runs one for its own nodes (coordinator/region.py): what a node's choice
    and reward need of the rest of the fleet comes in as the fleet's two slowest completions at τ (``begin_round``'s
    ``fleet``) and the round's ``RoundStats`` (``learn_from``)."""

    name = "fedspine"
    per_node_policy = ("its S-UCB bandit chooses each node's pruning increment and LoRA rank every round, from "
                       "that node's rewards and timing")

    def __init__(self, cfg, total_rounds: int, seed: int = 0) -> None:
        super().__init__(cfg, total_rounds, seed)
        self.bandit = FleetBandit(DELTA_P, cfg.bandit.ranks, discount=DISCOUNT, exploration=EXPLORATION,
                                  target_sparsity=cfg.pruning.target_sparsity, total_rounds=total_rounds, seed=seed)
        self._slowest: Slowest = ()  # this round's participants: the two slowest completions at τ steps as they are
        self._tiers: dict[str, str] = {}

    def deploy_rank(self) -> int:
        return max(self.cfg.bandit.ranks)

    def _time(self, node_id: str, sparsity: float, rank: int) -> float | None:
        """The node's completion time at τ steps at (sparsity, rank), by the step-cost model (None before a timing)."""
        speed = self.state(node_id).speed
        return None if speed is None else planning.time_at(speed, sparsity, rank, self.tau)

    def _at_tau(self, node_id: str) -> float | None:
        """The node's completion time at τ steps at its current sparsity and rank."""
        st = self.state(node_id)
        return self._time(node_id, st.sparsity, st.rank or max(self.cfg.bandit.ranks))

    def slowest_at_tau(self, nodes: Sequence[NodeInfo]) -> Slowest:
        """The two slowest completions at τ steps of ``nodes`` as they are (those timed by an accepted round)."""
        return slowest_two([(n.node_id, t) for n in nodes if (t := self._at_tau(n.node_id)) is not None])

    def begin_round(self, rnd: int, nodes: Sequence[NodeInfo], fleet: Slowest | None = None) -> None:
        """``fleet``: the whole fleet's ``slowest_at_tau`` where ``nodes`` are one region's."""
        self._tiers.update({n.node_id: n.device_type for n in nodes})
        self._slowest = self.slowest_at_tau(nodes) if fleet is None else fleet

    def _beyond_target(self, node_id: str, st: NodeState, cap: float) -> list[float]:
        """The increments a node at or above s* may take: none unless it holds the round back, then those up to the
        first that brings its time at τ steps down to the slowest other node's (within its cap)."""
        others, mine = slowest_other(self._slowest, node_id), self._at_tau(node_id)
        if mine is None or others is None or mine <= others:
            return [0.0]
        allowed, rank = [0.0], st.rank or max(self.cfg.bandit.ranks)
        for d in sorted(x for x in DELTA_P if x > 0):
            s = min(st.sparsity + d, cap)
            if s <= st.sparsity + EPS:
                break
            allowed.append(d)
            if (self._time(node_id, s, rank) or 0.0) <= others:
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

    def _modelled(self, r: NodeResult) -> float:
        """The node's modelled completion time at τ steps in the round of ``r`` (its measured round time before the
        model has its speed)."""
        return self._time(r.node_id, float(r.sparsity), r.rank) or r.round_time_s

    def round_shares(self, results: Sequence[NodeResult], slowest: Slowest | None = None) -> dict[str, float]:
        """Each node's time term: D_best / D (coordinator/reward.py), from its modelled completion time at τ steps;
        ``slowest``: the whole round's two slowest of those (default: of ``results``)."""
        at = {r.node_id: self._modelled(r) for r in results}
        top = slowest_two(at) if slowest is None else slowest
        shares = {}
        for r in results:
            others = slowest_other(top, r.node_id) or 0.0
            cap = self.cfg.pruning.cap(self._tiers.get(r.node_id, "default"))
            fastest = self._time(r.node_id, max(cap, float(r.sparsity)), min(self.cfg.bandit.ranks))
            best = max(fastest if fastest is not None else at[r.node_id], others)
            shares[r.node_id] = min(1.0, best / max(at[r.node_id], others)) if at[r.node_id] > 0 else 1.0
        return shares

    def _inputs(self, results: Sequence[NodeResult], shares: dict[str, float]) -> list[RewardInput]:
        return [RewardInput(node_id=r.node_id, loss_start=r.loss_start, loss_end=r.loss_end,
                            round_share=shares.get(r.node_id, 1.0), importance=r.update_norm, energy_j=r.energy_j,
                            samples=r.samples) for r in results]

    def round_stats(self, results: Sequence[NodeResult]) -> RoundStats:
        """What the rewards of other nodes need of ``results`` (merged across regions: ``RoundStats.merge``)."""
        return RoundStats.of(self._inputs(results, {}), {r.node_id: self._modelled(r) for r in results})

    def learn_from(self, results: Sequence[NodeResult], fleet: RoundStats) -> dict[str, dict]:
        """Reward each node of ``results`` against the whole round's statistics ``fleet`` and credit its arm; the
        terms and rewards by node."""
        terms = rewards(self._inputs(results, self.round_shares(results, fleet.slowest)), self.cfg.bandit.reward,
                        fleet)
        for r in results:
            a = self._pending.get(r.node_id, (None, 0.0))[0]
            if a is not None and a.arm is not None:
                self.bandit.update(r.node_id, a.arm, terms[r.node_id]["reward"])
        return terms

    def learn(self, rnd: int, results: Sequence[NodeResult], summary: RoundSummary) -> None:
        summary.node_terms = self.learn_from(results, self.round_stats(results))

    def policy_state(self) -> dict:
        return {"bandit": self.bandit.state_dict(), "tiers": self._tiers}

    def load_policy_state(self, d: dict) -> None:
        self.bandit.load_state_dict(d.get("bandit", {}))
        self._tiers = dict(d.get("tiers", {}))
