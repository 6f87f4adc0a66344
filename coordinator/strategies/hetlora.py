"""HetLoRA: a static LoRA rank per device tier, no pruning, zero-padding aggregation (B and A averaged apart)."""

from __future__ import annotations

from coordinator.aggregation import ZeroPadLora
from coordinator.strategies.base import NodeInfo, NodeState, Strategy


class HetLoRA(Strategy):
    """No pruning, a fixed rank per device tier; zero-padding aggregation of A and B."""

    name = "hetlora"
    prunes = False
    per_node_policy = ("each device tier trains at its own LoRA rank, and zero-padding aggregation has no partial "
                       "sums to add across regions")

    def schedule(self, rnd: int, node: NodeInfo, st: NodeState):
        return st.sparsity, self.cfg.bandit.tier_rank(node.device_type), None

    def deploy_rank(self) -> int:
        return max(int(r) for r in self.cfg.bandit.tier_ranks.values())

    def make_aggregator(self) -> ZeroPadLora:
        return ZeroPadLora()
