"""HetLoRA: a static LoRA rank per device tier, no pruning, zero-padding aggregation (B and A averaged apart)."""

from __future__ import annotations

from coordinator.aggregation import ZeroPadLora
from coordinator.strategies.base import Strategy


class HetLoRA(Strategy):
    """No pruning, a fixed rank per device tier; zero-padding aggregation of A and B.

    Its schedule is fleet-wide, with a rank per tier (``tier_ranks``; a tier the table does not name trains at its
    ``default``, else at ``[lora] rank``), and zero padding splits into partial sums padded to the largest of those
    ranks (``ZeroPadLora``): under regional aggregators each region gets the table with the round and gives each of
    its nodes its tier's rank, as the flat schedule does."""

    name = "hetlora"
    prunes = False

    def fleet_schedule(self, rnd: int) -> tuple[float, int]:
        return 0.0, self.cfg.lora.tier_rank("default")

    def tier_ranks(self) -> dict[str, int]:
        return {tier: int(r) for tier, r in self.cfg.lora.tier_ranks.items()}

    def deploy_rank(self) -> int:
        """The largest rank any tier trains at (a tier missing from the table trains at the default)."""
        return max([*self.tier_ranks().values(), self.cfg.lora.tier_rank("default")])

    def make_aggregator(self) -> ZeroPadLora:
        return ZeroPadLora(rank=self.deploy_rank())  # every partial pads to it, so that regions' sums add
