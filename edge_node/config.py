"""Configuration of an edge node agent (one TOML file: [broker], [node], [train], [telemetry])."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import BrokerConfig, ConfigError, from_mapping, load_toml
from shared.topics import check_node_id


@dataclass(frozen=True)
class NodeSettings:
    """Who the node is and where its model and private data live (the data never leaves the device)."""

    id: str
    device_type: str = "generic"  # tier: agx, nx, tx2, or anything the operator uses
    model_path: str = ""  # local Hugging Face model folder (offline)
    data_path: str = ""  # CSV/JSONL with text,label (classification) or prompt,completion / text (causal LM)
    labels: tuple[str, ...] = ()  # the fleet's class labels in order; empty = sorted labels of the local data
    test_path: str = ""  # optional held-out test file on the device (evaluation only, never uploaded)
    task: str = "seq_cls"  # seq_cls | causal_lm
    state_dir: str = "/var/lib/fedspine/node"
    export_dir: str = ""  # where the final pruned, merged model goes; default <state_dir>/export
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 (frozen base only; LoRA stays fp32)
    memory_budget_mb: int = 0  # 0 = measure (total device/host memory)
    gradient_checkpointing: bool = False
    torch_threads: int = 0  # 0 = torch default
    seed: int = 0
    calibration_steps: int = 5  # local steps timed before joining (sizes the first round; 0 = none)
    # Simulation only: the device profile this process stands for (virtual clock), see benchmarks/fleet.
    profile_speed: float = 1.0
    profile_uplink_mbps: float = 0.0  # 0 = real network, no virtual upload time
    profile_latency_s: float = 0.0

    def __post_init__(self) -> None:
        try:
            check_node_id(self.id)
        except ValueError as exc:
            raise ConfigError(f"[node] id: {exc}") from None
        if self.task not in ("seq_cls", "causal_lm"):
            raise ConfigError(f"[node] task {self.task!r} must be seq_cls or causal_lm")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"[node] dtype {self.dtype!r} must be auto, float32, float16 or bfloat16")
        if not 0 <= self.calibration_steps <= 100:
            raise ConfigError(f"[node] calibration_steps {self.calibration_steps} outside [0, 100]")
        if self.profile_speed <= 0:
            raise ConfigError(f"[node] profile_speed {self.profile_speed} must be > 0")


@dataclass(frozen=True)
class TrainSettings:
    """Local training hyper-parameters (rank, τ and sparsity come from the coordinator each round)."""

    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    val_fraction: float = 0.1
    eval_batches: int = 4  # batches of the local validation split used for loss_start / loss_end
    test_batches: int = 8  # batches of the test file (if any) evaluated each round, for accuracy curves
    importance_beta: float = 0.9
    # weight of the fleet's averaged importance (sent by the coordinator) against this node's own when pruning:
    # 0 = own data only (the spec's node-side rule), 1 = the fleet's view only (the default; docs/results.md,
    # registered seventh)
    fleet_importance: float = 1.0
    # ours: with fleet_importance > 0, a node's first cut waits for a global slice that carries the fleet's
    # importance (from round 2), instead of cutting at the end of round 1 on its own shard's importance alone
    # (a shard that lacks a class cuts what that class needs, for good); false restores the spec's order
    first_cut_with_fleet: bool = True
    round_multiple: int = 1  # round kept FFN channels to a multiple of this (never below the target)
    # ours (classification): local steps train on logits + logit_adjustment · log(the node's class prior), the
    # logit-adjusted loss (Menon et al., 2021; FedLC/FedBSM in federated learning), so a node whose data lacks or
    # floods a class learns which class a text is rather than its own label mix, and its update pulls the fleet's
    # head less toward it.  Evaluation and exported models use the plain logits.  0: plain cross-entropy.  On a
    # balanced shard the shift is the same for every class and changes nothing.  Default 1.0 (Menon et al.'s value)
    # since the thirteenth registration (docs/results.md, runs 49-51).
    logit_adjustment: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.logit_adjustment <= 4:
            raise ConfigError(f"[train] logit_adjustment {self.logit_adjustment} outside [0, 4]")
        if self.batch_size < 1 or self.max_length < 8:
            raise ConfigError(f"[train] batch_size {self.batch_size} / max_length {self.max_length} too small")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"[train] learning_rate {self.learning_rate} outside (0, 1)")
        if not 0 <= self.importance_beta < 1:
            raise ConfigError(f"[train] importance_beta {self.importance_beta} outside [0, 1)")
        if not 0 <= self.fleet_importance <= 1:
            raise ConfigError(f"[train] fleet_importance {self.fleet_importance} outside [0, 1]")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"[train] val_fraction {self.val_fraction} outside (0, 0.5)")


@dataclass(frozen=True)
class TelemetrySettings:
    provider: str = "auto"  # auto (jtop on a Jetson, else psutil) | jtop | psutil
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "jtop", "psutil"):
            raise ConfigError(f"[telemetry] provider {self.provider!r} must be auto, jtop or psutil")
        if not 0.1 <= self.interval_s <= 3600:
            raise ConfigError(f"[telemetry] interval_s {self.interval_s} outside [0.1, 3600]")


@dataclass(frozen=True)
class NodeConfig:
    broker: BrokerConfig
    node: NodeSettings
    train: TrainSettings = field(default_factory=TrainSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @classmethod
    def from_dict(cls, data: dict) -> NodeConfig:
        unknown = sorted(set(data) - {"broker", "node", "train", "telemetry"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}")
        if "node" not in data:
            raise ConfigError("[node] section is required (at least id)")
        return cls(
            broker=from_mapping(BrokerConfig, data.get("broker"), "broker"),
            node=from_mapping(NodeSettings, data.get("node"), "node"),
            train=from_mapping(TrainSettings, data.get("train"), "train"),
            telemetry=from_mapping(TelemetrySettings, data.get("telemetry"), "telemetry"),
        )

    @classmethod
    def load(cls, path: str | Path) -> NodeConfig:
        return cls.from_dict(load_toml(path))

    def check_files(self) -> None:
        """The files a real node reads, checked before it loads anything (``fedspine node``), so that a wrong path
        is a configuration error naming the key, not a traceback from deep inside the model or data loading."""
        n = self.node
        for key, what in (("model_path", "a local Hugging Face model folder"),
                          ("data_path", "the node's CSV/JSONL training data")):
            if not getattr(n, key):
                raise ConfigError(f"[node] {key} is required: {what}")
        for key in ("model_path", "data_path", "test_path"):
            value = getattr(n, key)
            if value and not Path(value).exists():
                raise ConfigError(f"[node] {key} {value!r} does not exist")
            if value and not os.access(value, os.R_OK):
                raise ConfigError(f"[node] {key} {value!r} is not readable by this user")
