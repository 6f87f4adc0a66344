"""Configuration of the coordinator (one TOML file: [broker], [coordinator], [bandit], [reward])."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import BrokerConfig, ConfigError, from_mapping, load_toml

METHODS = ("fedspine", "fedlora", "hetlora", "uniform", "prune_ft", "ft_prune")
COVERAGE = ("kept", "round")  # whose weight divides a coordinate's averaged change (coordinator/aggregation.py)
# Step-cost model of alignment, t(s, r) ∝ (1 - a·s)(1 + b·r): the fit of `python -m benchmarks.pruning.run
# --step-cost` on 2026-11-29 (all-MiniLM-L6-v2, one CPU thread, batch 16 × 64; rank: no measurable effect;
# docs/results.md).
STEP_COST_SPARSITY = 0.92
STEP_COST_RANK = 0.0


@dataclass(frozen=True)
class RoundSettings:
    """Round orchestration: who takes part, how long to wait, when a round counts."""

    rounds: int = 20
    method: str = "fedspine"  # fedspine | fedlora | hetlora | uniform | prune_ft | ft_prune
    min_nodes: int = 1  # wait for this many live nodes before round 1
    fraction: float = 1.0  # share of live nodes asked per round (at least min_nodes)
    local_steps: int = 20  # τ
    deadline_s: float = 600.0  # a round waits at most this long for uploads
    quorum: float = 0.5  # share of participants whose uploads must arrive for the round to count
    max_retries: int = 3  # a round below quorum is retried this often, then training stops
    # how long to wait for min_nodes live nodes (before round 1, and after a round below quorum); 0 = as long as it
    # takes, as a service does while its Jetsons are still being provisioned or rebooting (it logs every minute)
    join_timeout_s: float = 0.0
    # the fleet's class names in order (classification); empty = those of the first node that joins.  A node whose
    # head has another list is refused: averaging heads across different classes would corrupt both.
    labels: tuple[str, ...] = ()
    # the SHA-256 of the fleet's base model (what `fedspine node` logs as base_model in trainer_ready, or
    # `sha256sum` over config.json and the weight files: edge_node.model.base_model_digest); empty = that of the
    # first node that joins.  A node on other base weights is refused: LoRA updates only add up on the same base.
    base_model: str = ""
    state_dir: str = "/var/lib/fedspine/coordinator"
    metrics_file: str = ""  # default <state_dir>/metrics.jsonl
    seed: int = 0
    export_at_end: bool = True
    coverage: str = "kept"  # one of COVERAGE
    # A coordinate of the global update changes only where at least this many of the round's nodes kept it (ours;
    # 1 = the spec's rule): a coordinate one node alone still has is not trained on that node's data alone.
    min_keepers: int = 2
    # Step alignment (ours): for these methods a node that would finish early runs more local steps, up to
    # max_steps_factor × τ, so that it completes with the round's slowest node at τ steps (strategy.aligned_steps).
    align_steps: tuple[str, ...] = ("fedspine",)
    max_steps_factor: float = 5.0
    # Paced rounds (ours): with aligned steps, each node is sent the round's planned finish as well and stops at
    # the step boundary nearest it (at least pace_min_fraction·τ steps, at most the cap), measuring its own steps
    # as it runs, so a node that runs slower or faster than planned still finishes with the round.  false:
    # exactly the planned steps.
    pace_steps: bool = True
    # A paced node may stop at the round's planned finish once it ran this share of τ (ours; at least one step):
    # the slowest node, planned at τ, that runs slower than its plan stops with the round instead of keeping the
    # others waiting for its overrun.  1.0: at least τ steps (the slowest node's overrun is waited for).
    pace_min_fraction: float = 0.5
    # Beyond the target a slow node prunes further only to remove waiting that alignment cannot fill (ours): where
    # steps were aligned, only while another node was held at the step cap and the round idled more than this
    # share.  Below it, the node's accuracy is worth more than the idle time left (strategy.Strategy._capped).
    # And a node that would wait more than this share at the step cap prunes no further than the round's slowest
    # node (strategy.Strategy._hold_capped).
    idle_tolerance: float = 0.10
    # With aligned steps, once every node of a round trained at the target sparsity, the round's averaged per-step
    # change moves the global state τ steps, as the baselines' rounds do, instead of the nodes' mean step count
    # (ours; strategy.Strategy._tuning).  false: the mean step count throughout (FedNova's τ_eff).
    tune_at_tau: bool = True
    # Step-cost model for alignment (ours): a node's time per local step at sparsity s and LoRA rank r is taken as
    # proportional to (1 - step_cost_sparsity·s)(1 + step_cost_rank·r), so a node that changes its configuration
    # is planned at its new speed (strategy.step_cost_ratio).  0 and 0: every node keeps its last speed.  The
    # defaults are the fit of `python -m benchmarks.pruning.run --step-cost` (MiniLM, one CPU thread).
    step_cost_sparsity: float = STEP_COST_SPARSITY
    step_cost_rank: float = STEP_COST_RANK
    # Each node is sent the global slice at the rank the global model is deployed at (Strategy.final_rank) when
    # that is above its training rank (ours): a node that evaluates a test split reports the global model as it
    # would be deployed, not its low-rank truncation, and trains from the leading components of that slice,
    # which are the slice at its own rank.  Costs download bytes (up to final_rank / rank times the slice).
    # false: only the slice at the training rank is sent, and the reported test figures are of that truncation.
    eval_at_deploy_rank: bool = True
    # The S-UCB reward's time term and the ``behind`` flag take each node's completion time at τ steps from the
    # step-cost model, over the median of the node's measured speeds (ours; Strategy.modelled_time_s): a node
    # whose configuration did not change gains or loses no alignment by the noise of one reading, and the time
    # it is credited with is that of the configuration it chose.  false: that round's measured time.
    time_from_model: bool = True
    # The plans (aligned steps, the finish paced nodes stop at, the hold) take each node's speed from the same
    # model (ours; Strategy.median_speed): one slow reading on a shared machine no longer sets the next round's
    # finish for the whole fleet.  false: the node's last round's fixed time and time per step.
    plan_from_model: bool = True
    # The model's speed is the median of the node's last ``speed_window`` accepted rounds: the checkpoint stays
    # bounded, and a lasting change of speed (a throttling Jetson) takes over the median within half the window.
    speed_window: int = 9

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"[coordinator] method {self.method!r} must be one of {METHODS}")
        if self.coverage not in COVERAGE:
            raise ConfigError(f"[coordinator] coverage {self.coverage!r} must be one of {COVERAGE}")
        if self.min_keepers < 1:
            raise ConfigError(f"[coordinator] min_keepers {self.min_keepers} must be >= 1")
        if self.speed_window < 1:
            raise ConfigError(f"[coordinator] speed_window {self.speed_window} must be >= 1")
        if self.rounds < 1 or self.local_steps < 1:
            raise ConfigError(f"[coordinator] rounds {self.rounds} and local_steps {self.local_steps} must be >= 1")
        if not 0 < self.fraction <= 1 or not 0 < self.quorum <= 1:
            raise ConfigError(f"[coordinator] fraction {self.fraction} / quorum {self.quorum} outside (0, 1]")
        if unknown := sorted(set(self.align_steps) - set(METHODS)):
            raise ConfigError(f"[coordinator] align_steps {unknown} are not methods {METHODS}")
        if not 0 <= self.step_cost_sparsity < 1 or not 0 <= self.step_cost_rank <= 1:
            raise ConfigError(f"[coordinator] step_cost_sparsity {self.step_cost_sparsity} outside [0, 1) or "
                              f"step_cost_rank {self.step_cost_rank} outside [0, 1]")
        if not 0 <= self.idle_tolerance < 1:
            raise ConfigError(f"[coordinator] idle_tolerance {self.idle_tolerance} outside [0, 1)")
        if not 0 < self.pace_min_fraction <= 1:
            raise ConfigError(f"[coordinator] pace_min_fraction {self.pace_min_fraction} outside (0, 1]")
        if not 1 <= self.max_steps_factor <= 100:
            raise ConfigError(f"[coordinator] max_steps_factor {self.max_steps_factor} outside [1, 100]")
        if self.base_model and not re.fullmatch(r"[0-9a-f]{64}", self.base_model):
            raise ConfigError(f"[coordinator] base_model {self.base_model!r} must be a sha256 digest in lowercase hex")
        if self.join_timeout_s < 0:
            raise ConfigError(f"[coordinator] join_timeout_s {self.join_timeout_s} must be >= 0 (0: no limit)")
        if self.deadline_s <= 0 or self.min_nodes < 1:
            raise ConfigError("[coordinator] deadline_s must be > 0 and min_nodes >= 1")

    @property
    def max_steps(self) -> int:
        """The most local steps an aligned node runs in a round: max_steps_factor × τ."""
        return int(self.max_steps_factor * self.local_steps)

    @property
    def pace_min_steps(self) -> int:
        """The fewest local steps a paced node runs before it may stop at the round's planned finish."""
        return max(1, math.ceil(self.pace_min_fraction * self.local_steps - 1e-9))  # ≤ τ: the share is ≤ 1


@dataclass(frozen=True)
class BanditSettings:
    """S-UCB: arms are (Δp, rank); sparsity only grows; every node ends at >= target_sparsity."""

    delta_p: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15)
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    discount: float = 0.95  # λ
    exploration: float = 0.05  # s, the exploration bonus weight (rewards lie in [0, 1])
    factored: bool = True  # one UCB over Δp and one over rank per node (ours); false: joint (Δp, r) arms
    target_sparsity: float = 0.3  # s*: every node must end at or above it
    max_sparsity: dict = field(default_factory=lambda: {"default": 0.5})  # s_max per device tier
    static_rank: int = 8  # rank used by fedlora / uniform / prune_ft / ft_prune
    tier_ranks: dict = field(default_factory=lambda: {"agx": 16, "nx": 8, "tx2": 4, "default": 8})  # hetlora

    def __post_init__(self) -> None:
        if not self.delta_p or any(not 0 <= d <= 1 for d in self.delta_p):
            raise ConfigError(f"[bandit] delta_p {self.delta_p} must be non-empty values in [0, 1]")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"[bandit] ranks {self.ranks} must be non-empty and >= 1")
        if not 0 < self.discount <= 1 or self.exploration < 0:
            raise ConfigError(f"[bandit] discount {self.discount} in (0, 1], exploration {self.exploration} >= 0")
        if not 0 <= self.target_sparsity < 1:
            raise ConfigError(f"[bandit] target_sparsity {self.target_sparsity} outside [0, 1)")
        for tier, cap in self.max_sparsity.items():
            if not self.target_sparsity <= cap < 1:
                raise ConfigError(f"[bandit] max_sparsity[{tier}] {cap} must be in [target_sparsity, 1)")

    def cap(self, tier: str) -> float:
        return float(self.max_sparsity.get(tier, self.max_sparsity.get("default", 0.5)))


@dataclass(frozen=True)
class RewardSettings:
    """Weights of the reward terms (each term normalised to about [0, 1] across the round's nodes)."""

    loss: float = 1.0
    progress: float = 0.5
    time: float = 2.0
    importance: float = 0.25
    energy: float = 0.5

    def __post_init__(self) -> None:
        for name in ("loss", "progress", "time", "importance", "energy"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[reward] weight {name} = {getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class CoordinatorConfig:
    broker: BrokerConfig
    coordinator: RoundSettings = field(default_factory=RoundSettings)
    bandit: BanditSettings = field(default_factory=BanditSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)

    @classmethod
    def from_dict(cls, data: dict) -> CoordinatorConfig:
        unknown = sorted(set(data) - {"broker", "coordinator", "bandit", "reward"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}")
        return cls(
            broker=from_mapping(BrokerConfig, data.get("broker"), "broker"),
            coordinator=from_mapping(RoundSettings, data.get("coordinator"), "coordinator"),
            bandit=from_mapping(BanditSettings, data.get("bandit"), "bandit"),
            reward=from_mapping(RewardSettings, data.get("reward"), "reward"),
        )

    @classmethod
    def load(cls, path: str | Path) -> CoordinatorConfig:
        return cls.from_dict(load_toml(path))
