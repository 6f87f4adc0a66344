"""Checkpoints of the coordinator: written atomically after every round, read back on restart.

Two files per checkpoint: ``global-<round>.safetensors`` (every tensor: the global LoRA, node structures) and
``checkpoint.json`` (round, run id, bandit, registry, … and the name of its tensor file).  The tensor file is
written first and the JSON replaces the previous one atomically (temp file + fsync + ``os.replace``), so a
crash at any point leaves the previous checkpoint or the new one, never a mix.  Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.dir / CHECKPOINT

    def save(self, state: dict[str, Any]) -> Path:
        """Persist ``state``; tensors found under ``state["strategy"]["tensors"]`` go to safetensors."""
        state = dict(state)
        strategy = dict(state.get("strategy", {}))
        tensors = {k: v.detach().contiguous().cpu() for k, v in strategy.pop("tensors", {}).items()}
        tensor_file = f"global-{int(state.get('round', 0)):06d}.safetensors"
        _atomic_write(self.dir / tensor_file, lambda p: save_file(tensors, str(p), metadata={"format": "fedspine-ckpt"}))
        state["strategy"] = strategy
        state["tensor_file"] = tensor_file
        _atomic_write(self.path, lambda p: p.write_text(json.dumps(state, separators=(",", ":"), sort_keys=True)))
        for old in self.dir.glob("global-*.safetensors"):
            if old.name != tensor_file:
                old.unlink(missing_ok=True)
        return self.path

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when there is none."""
        if not self.path.exists():
            return None
        state = json.loads(self.path.read_text())
        tensors: dict[str, torch.Tensor] = load_file(str(self.dir / state["tensor_file"]))
        state["strategy"] = {**state.get("strategy", {}), "tensors": tensors}
        return state
