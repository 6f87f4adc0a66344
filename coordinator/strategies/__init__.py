"""One strategy per method; ``make_strategy`` maps a method name from the configuration to its class."""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.strategies.base import (
    Assignment,
    Failure,
    FleetPlan,
    NodeInfo,
    NodeResult,
    NodeState,
    RoundSummary,
    Strategy,
    accept_answer,
    node_weights,
)
from coordinator.strategies.fedlora import FedLoRA
from coordinator.strategies.fedspine import FedSpine
from coordinator.strategies.ft_prune import FTPrune
from coordinator.strategies.hetlora import HetLoRA
from coordinator.strategies.prune_ft import PruneFT
from coordinator.strategies.uniform import Uniform

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedSpine, FedLoRA, HetLoRA, Uniform, PruneFT, FTPrune)}

__all__ = ["Assignment", "Failure", "FleetPlan", "NodeInfo", "NodeResult", "NodeState", "RoundSummary", "STRATEGIES",
           "Strategy",
           "accept_answer", "make_strategy", "node_weights"]


def make_strategy(cfg: CoordinatorConfig, total_rounds: int, seed: int = 0) -> Strategy:
    """The strategy of ``cfg``'s method."""
    return STRATEGIES[cfg.coordinator.method](cfg, total_rounds=total_rounds, seed=seed)
