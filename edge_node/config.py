"""Configuration of an edge node agent: one TOML file with [broker], [node], [train] and [telemetry]."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import BrokerConfig, ConfigError, Sections
from shared.topics import check_node_id


@dataclass(frozen=True)
class NodeSettings:
    """[node]: who the node is and where its model and private data live (the data never leaves the device)."""

    id: str = field(metadata={"help": "node id; must equal the node's broker username (the ACL pins it to its topics)"})
    device_type: str = field(default="generic", metadata={
        "help": "device tier (agx, nx, tx2, ...): selects s_max and HetLoRA's rank on the coordinator"})
    model_path: str = field(default="", metadata={"help": "local Hugging Face model folder (offline)"})
    data_path: str = field(default="", metadata={
        "help": "private training data: CSV/JSONL with text,label (seq_cls) or prompt,completion / text (causal_lm)"})
    test_path: str = field(default="", metadata={
        "help": "optional held-out test file on the device (evaluation only, never uploaded)"})
    labels: tuple[str, ...] = field(default=(), metadata={
        "help": "the fleet's class names in order (the same on every node); empty: the sorted labels of the data"})
    task: str = field(default="seq_cls", metadata={"help": "seq_cls (classification) or causal_lm"})
    state_dir: str = field(default="/var/lib/fedspine/node", metadata={
        "help": "resume state; the final pruned, merged model is exported to <state_dir>/export"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of the frozen base weights: auto, float32, float16 or bfloat16 (LoRA stays float32)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "trade compute for activation memory on small devices"})
    seed: int = field(default=0, metadata={"help": "seed of the local train/validation split and LoRA initialisation"})

    def __post_init__(self) -> None:
        try:
            check_node_id(self.id)
        except ValueError as exc:
            raise ConfigError(f"[node] id: {exc}") from None
        if self.task not in ("seq_cls", "causal_lm"):
            raise ConfigError(f"[node] task {self.task!r} must be seq_cls or causal_lm")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"[node] dtype {self.dtype!r} must be auto, float32, float16 or bfloat16")

    @property
    def export_dir(self) -> Path:
        return Path(self.state_dir) / "export"


@dataclass(frozen=True)
class TrainSettings:
    """[train]: local training (the LoRA rank, the steps and the sparsity come from the coordinator each round)."""

    batch_size: int = field(default=16, metadata={"help": "examples per local step"})
    max_length: int = field(default=64, metadata={"help": "tokens per example (longer texts are truncated)"})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the LoRA factors and task head"})
    test_batches: int = field(default=8, metadata={
        "help": "batches of the test file every test accuracy is on: each round's, the final evaluation's and the "
                "export's (which also reports the whole file's, named as such)"})

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 8:
            raise ConfigError(f"[train] batch_size {self.batch_size} / max_length {self.max_length} too small")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"[train] learning_rate {self.learning_rate} outside (0, 1)")
        if self.test_batches < 0:
            raise ConfigError(f"[train] test_batches {self.test_batches} must be >= 0")


@dataclass(frozen=True)
class TelemetrySettings:
    """[telemetry]: power and utilisation published on the node's telemetry topic."""

    provider: str = field(default="auto", metadata={"help": "auto (jtop on a Jetson, else psutil), jtop or psutil"})
    interval_s: float = field(default=5.0, metadata={"help": "seconds between telemetry messages"})

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "jtop", "psutil"):
            raise ConfigError(f"[telemetry] provider {self.provider!r} must be auto, jtop or psutil")
        if not 0.1 <= self.interval_s <= 3600:
            raise ConfigError(f"[telemetry] interval_s {self.interval_s} outside [0.1, 3600]")


@dataclass(frozen=True)
class NodeConfig(Sections):
    broker: BrokerConfig
    node: NodeSettings
    train: TrainSettings = field(default_factory=TrainSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    SECTIONS = {"broker": BrokerConfig, "node": NodeSettings, "train": TrainSettings, "telemetry": TelemetrySettings}

    @classmethod
    def from_dict(cls, data: dict) -> NodeConfig:
        if "node" not in data and not set(data) - set(cls.SECTIONS):
            raise ConfigError("[node] section is required (at least id)")
        return super().from_dict(data)

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
        if not (Path(n.model_path) / "config.json").is_file():  # else a tokenizer error from deep in transformers
            raise ConfigError(f"[node] model_path {n.model_path!r} holds no config.json: it must be the Hugging Face "
                              "model folder itself (config.json, weights, tokenizer files)")
