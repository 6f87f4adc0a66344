"""FT→Prune: federated LoRA at a fixed rank, then every node cut to s* once, in the last ~15 % of the rounds (the
rounds after the cut are its recovery)."""

from __future__ import annotations

from coordinator.strategies.base import NodeInfo, NodeState, Strategy


class FTPrune(Strategy):
    name = "ft_prune"

    def prune_round(self) -> int:
        T = self.total_rounds
        return T - max(1, round(0.15 * T)) + 1 if T > 1 else 1

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        target = self.cfg.bandit.target_sparsity
        return (max(st.sparsity, target) if rnd >= self.prune_round() else st.sparsity), self.cfg.bandit.rank, None

    def will_prune(self, rnd: int) -> bool:
        return rnd < self.prune_round()  # the steps before the cut score the groups it removes
