"""FT→Prune: federated LoRA at a fixed rank, then every node cut to s* once, in the last ~15 % of the rounds (the
rounds after the cut are its recovery)."""

from __future__ import annotations

from coordinator.strategies.base import Strategy


class FTPrune(Strategy):
    """No pruning until the last ~15 % of the rounds, then every node cut to s* once; mask-aware average."""

    name = "ft_prune"

    def prune_round(self) -> int:
        T = self.total_rounds
        return T - max(1, round(0.15 * T)) + 1 if T > 1 else 1

    def fleet_schedule(self, rnd: int):
        return (self.cfg.pruning.target_sparsity if rnd >= self.prune_round() else 0.0), self.cfg.lora.rank

    def will_prune(self, rnd: int) -> bool:
        return rnd < self.prune_round()  # the steps before the cut score the groups it removes
