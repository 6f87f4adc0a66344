"""Prune→FT: every node cut to s* at the first opportunity (the first round the fleet's importance exists), then
federated LoRA at a fixed rank."""

from __future__ import annotations

from coordinator.strategies.base import Strategy


class PruneFT(Strategy):
    """Every node cut to s* at the first opportunity (round 2), then one fixed rank; mask-aware average."""

    name = "prune_ft"

    def fleet_schedule(self, rnd: int):
        return self.cfg.pruning.target_sparsity, self.cfg.lora.rank

    def will_prune(self, rnd: int) -> bool:
        return not self.has_fleet_importance()  # round 1 scores the groups; round 2 cuts
