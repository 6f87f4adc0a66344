"""FedLoRA: one LoRA rank for every node, no pruning."""

from __future__ import annotations

from coordinator.strategies.base import Strategy


class FedLoRA(Strategy):
    """No pruning, one fixed rank for every node; mask-aware average."""

    name = "fedlora"
    prunes = False

    def fleet_schedule(self, rnd: int):
        return 0.0, self.cfg.lora.rank
