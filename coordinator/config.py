"""Configuration of the coordinator: one TOML file with [broker], [coordinator], [pruning], [lora] and [bandit]."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import BrokerConfig, ConfigError, Sections
from shared.topics import TopicError, check_node_id

METHODS = ("fedspine", "fedlora", "hetlora", "uniform", "prune_ft", "ft_prune")
REWARD_TERMS = ("loss", "time", "importance", "energy")
# The tier table travels in every RegionRound: at most shared.messages.MAX_MAP_ITEMS entries (not imported: this
# module is loaded by the Ansible roles' config check, which has no msgpack)
MAX_TIERS = 64


@dataclass(frozen=True)
class RoundSettings:
    """[coordinator]: the run, its rounds, and who takes part."""

    method: str = field(default="uniform", metadata={
        "help": f"training method, one of {', '.join(METHODS)} (uniform: FedSpine's bandit did not beat it, "
                "docs/results.md)"})
    rounds: int = field(default=20, metadata={"help": "federated rounds before the final sync and export"})
    local_steps: int = field(default=20, metadata={
        "help": "τ: local steps of the round's slowest node; faster nodes fill the round with more (up to 5τ)"})
    min_nodes: int = field(default=1, metadata={"help": "live nodes to wait for before round 1"})
    fraction: float = field(default=1.0, metadata={"help": "share of live nodes asked per flat round (at least min_nodes); under regions all take part"})
    quorum: float = field(default=0.5, metadata={
        "help": "share of a round's participants whose uploads must arrive for it to count (else it is retried)"})
    deadline_s: float = field(default=600.0, metadata={"help": "a round waits at most this long for uploads"})
    join_timeout_s: float = field(default=0.0, metadata={
        "help": "how long to wait for min_nodes live nodes; 0 waits without limit (a service's Jetsons may reboot)"})
    state_dir: str = field(default="/var/lib/fedspine/coordinator", metadata={
        "help": "checkpoint and metrics.jsonl; a restarted coordinator resumes from here"})
    labels: tuple[str, ...] = field(default=(), metadata={
        "help": "the fleet's class names in order; empty: those of the first node that joins"})
    base_model: str = field(default="", metadata={
        "help": "SHA-256 of the fleet's base model (a node logs it as base_model); empty: the first node's"})
    seed: int = field(default=0, metadata={"help": "seed of participant sampling and the bandit's tie-breaks"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"[coordinator] method {self.method!r} must be one of {METHODS}")
        if self.rounds < 1 or self.local_steps < 1:
            raise ConfigError(f"[coordinator] rounds {self.rounds} and local_steps {self.local_steps} must be >= 1")
        if not 0 < self.fraction <= 1 or not 0 < self.quorum <= 1:
            raise ConfigError(f"[coordinator] fraction {self.fraction} / quorum {self.quorum} outside (0, 1]")
        if self.base_model and not re.fullmatch(r"[0-9a-f]{64}", self.base_model):
            raise ConfigError(f"[coordinator] base_model {self.base_model!r} must be a sha256 digest in lowercase hex")
        if self.join_timeout_s < 0:
            raise ConfigError(f"[coordinator] join_timeout_s {self.join_timeout_s} must be >= 0 (0: no limit)")
        if self.deadline_s <= 0 or self.min_nodes < 1:
            raise ConfigError("[coordinator] deadline_s must be > 0 and min_nodes >= 1")

    @property
    def metrics_file(self) -> Path:
        return Path(self.state_dir) / "metrics.jsonl"


@dataclass(frozen=True)
class PruningSettings:
    """[pruning]: the sparsity bounds of every pruning method (uniform, prune_ft, ft_prune, fedspine)."""

    target_sparsity: float = field(default=0.3, metadata={
        "help": "s*: every node of a pruning method ends at or above it"})
    max_sparsity: dict = field(default_factory=lambda: {"default": 0.5}, metadata={
        "help": "s_max per device tier (a table, e.g. {agx = 0.4, tx2 = 0.5, default = 0.5})"})

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ConfigError(f"[pruning] target_sparsity {self.target_sparsity} outside [0, 1)")
        for tier, cap in self.max_sparsity.items():
            if not isinstance(cap, (int, float)) or not self.target_sparsity <= cap < 1:
                raise ConfigError(f"[pruning] max_sparsity[{tier}] {cap} must be in [target_sparsity, 1)")

    def cap(self, tier: str) -> float:
        """s_max of a device tier."""
        return float(self.max_sparsity.get(tier, self.max_sparsity.get("default", 0.5)))


@dataclass(frozen=True)
class LoraSettings:
    """[lora]: the LoRA rank of the fixed-rank methods (and of the deployed model) and HetLoRA's rank per tier."""

    rank: int = field(default=8, metadata={"help": "LoRA rank of the fixed-rank methods (all but fedspine and hetlora)"})
    tier_ranks: dict = field(default_factory=lambda: {"agx": 16, "nx": 8, "tx2": 4, "default": 8}, metadata={
        "help": "HetLoRA's rank per device tier"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"[lora] rank {self.rank} must be >= 1")
        if len(self.tier_ranks) > MAX_TIERS:
            raise ConfigError(f"[lora] tier_ranks has {len(self.tier_ranks)} tiers; at most {MAX_TIERS}")
        for tier, r in self.tier_ranks.items():
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"[lora] tier_ranks[{tier}] {r!r} must be an integer >= 1")

    def tier_rank(self, tier: str) -> int:
        return int(self.tier_ranks.get(tier, self.tier_ranks.get("default", self.rank)))


@dataclass(frozen=True)
class BanditSettings:
    """[bandit]: FedSpine's S-UCB only (method = "fedspine"): its rank arms and its reward weights."""

    ranks: tuple[int, ...] = field(default=(2, 4, 8, 16), metadata={"help": "LoRA ranks FedSpine's bandit chooses from"})
    reward: dict = field(default_factory=lambda: {"loss": 1.0, "time": 1.0, "importance": 0.25, "energy": 0.5},
                         metadata={
        "help": f"weights of FedSpine's S-UCB reward terms ({', '.join(REWARD_TERMS)}); a term left out weighs 0"})

    def __post_init__(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ConfigError(f"[bandit] ranks {self.ranks} must be >= 1")
        if unknown := sorted(set(self.reward) - set(REWARD_TERMS)):
            raise ConfigError(f"[bandit] reward has unknown term(s) {unknown}; known: {list(REWARD_TERMS)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.reward.values()):
            raise ConfigError(f"[bandit] reward weights {self.reward} must be numbers >= 0")

    def weight(self, term: str) -> float:
        return float(self.reward.get(term, 0.0))


@dataclass(frozen=True)
class CoordinatorConfig(Sections):
    broker: BrokerConfig
    coordinator: RoundSettings = field(default_factory=RoundSettings)
    pruning: PruningSettings = field(default_factory=PruningSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    bandit: BanditSettings = field(default_factory=BanditSettings)

    SECTIONS = {"broker": BrokerConfig, "coordinator": RoundSettings, "pruning": PruningSettings, "lora": LoraSettings,
                "bandit": BanditSettings}
    # Keys that [bandit] held until the split (never released): refused with the section they belong in now
    MOVED = {"bandit": {"target_sparsity": "pruning", "max_sparsity": "pruning", "rank": "lora", "tier_ranks": "lora"}}


# The regional aggregator's file (coordinator/region.py), here with the other loaders: it loads without torch, so
# provisioning can check a rendered region.toml cheaply (ansible/roles/region).
@dataclass(frozen=True)
class RegionSettings:
    """[region]: who this aggregator is and how long it waits for its nodes."""

    region_id: str = field(default="region-1", metadata={
        "help": "this aggregator's id (a topic level, [A-Za-z0-9_-]); its nodes' topic_root is <root>/region/<id>"})
    deadline_s: float = field(default=300.0, metadata={
        "help": "a round waits at most this long for its nodes' uploads; keep it below the root's deadline_s"})
    quorum: float = field(default=0.5, metadata={
        "help": "share of its round's nodes whose updates must arrive for the region to forward a partial"})

    def __post_init__(self) -> None:
        try:
            check_node_id(self.region_id)
        except TopicError as exc:
            raise ConfigError(f"[region] region_id: {exc}") from None
        if self.deadline_s <= 0 or not 0 < self.quorum <= 1:
            raise ConfigError(f"[region] deadline_s {self.deadline_s} must be > 0 and quorum {self.quorum} in (0, 1]")


@dataclass(frozen=True)
class RegionConfig(Sections):
    broker: BrokerConfig
    region: RegionSettings = field(default_factory=RegionSettings)

    SECTIONS = {"broker": BrokerConfig, "region": RegionSettings}
