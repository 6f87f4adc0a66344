"""FedLoRA: one LoRA rank for every node, no pruning."""

from __future__ import annotations

from coordinator.strategies.base import NodeInfo, NodeState, Strategy


class FedLoRA(Strategy):
    name = "fedlora"
    prunes = False

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        return st.sparsity, self.cfg.bandit.rank, None
