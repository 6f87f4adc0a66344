"""Prune→FT: every node cut to s* at the first opportunity (the first round the fleet's importance exists), then
federated LoRA at a fixed rank."""

from __future__ import annotations

from coordinator.strategies.base import NodeInfo, NodeState, Strategy


class PruneFT(Strategy):
    name = "prune_ft"

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        return max(st.sparsity, self.cfg.bandit.target_sparsity), self.cfg.bandit.rank, None

    def will_prune(self, rnd: int) -> bool:
        return not self.has_fleet_importance()  # round 1 scores the groups; round 2 cuts
