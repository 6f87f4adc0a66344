"""HetLoRA: a static LoRA rank per device tier, no pruning, zero-padding aggregation (B and A averaged apart)."""

from __future__ import annotations

from coordinator.aggregation import ZeroPadLora
from coordinator.strategies.base import NodeInfo, NodeState, Strategy


class HetLoRA(Strategy):
    name = "hetlora"
    prunes = False

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        return st.sparsity, self.cfg.bandit.tier_rank(node.device_type), None

    def deploy_rank(self) -> int:
        return max(int(r) for r in self.cfg.bandit.tier_ranks.values())

    def make_aggregator(self) -> ZeroPadLora:
        return ZeroPadLora()
