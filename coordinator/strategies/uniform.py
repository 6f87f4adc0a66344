"""Uniform iterative prune-and-tune: FedSpine's node procedure with one schedule for every node (no bandit):
the same linear increments for all, reaching s* after two thirds of the rounds, at a fixed rank."""

from __future__ import annotations

import math

from coordinator.strategies.base import Strategy


class Uniform(Strategy):
    """Every node the same linear schedule to s* by two thirds of the rounds, one fixed rank; mask-aware average."""

    name = "uniform"

    def reach(self) -> int:
        """The round by which every node is at s*."""
        return max(1, math.ceil(2 * self.total_rounds / 3))

    def fleet_schedule(self, rnd: int):
        target = self.cfg.pruning.target_sparsity
        return min(target, target * rnd / self.reach()), self.cfg.lora.rank

    def will_prune(self, rnd: int) -> bool:
        return rnd < self.reach()
