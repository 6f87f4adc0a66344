"""The LoRA update exchange format: LoRA factors plus kept-index maps in the unpruned model's coordinates.

A node that pruned its model still speaks about the *unpruned* model: for every adapted module it sends
its factors ``A`` (r x len(cols)) and ``B`` (len(rows) x r), the sorted indices ``rows`` / ``cols`` of the
output / input features it kept, the unpruned ``shape`` (out, in) and the LoRA ``scale`` (alpha / r), so
that its update is ``scale * B @ A`` scattered into ``rows x cols`` of a zero (out, in) matrix.  Fully
trained parameters that are never pruned (the task head) travel densely in ``dense``.

On the wire an update is safetensors bytes (never pickle)::

    lora.<module>.A       float32 [r, len(cols)]
    lora.<module>.B       float32 [len(rows), r]
    lora.<module>.rows    int64   [len(rows)]   sorted, unique, in [0, out)
    lora.<module>.cols    int64   [len(cols)]   sorted, unique, in [0, in)
    lora.<module>.shape   int64   [2]           (out, in) of the unpruned module
    lora.<module>.scale   float32 [1]           alpha / r
    dense.<param>         float32 [...]         e.g. dense.classifier.weight
    importance.<layer>.<heads|channels>.idx    int64   [k]  groups scored, sorted, unique, in [0, size)
    importance.<layer>.<heads|channels>.score  float32 [k]  finite, >= 0 (a node's scores are L2-normalised)
    importance.<layer>.<heads|channels>.size   int64   [1]  the layer's unpruned group count

The optional ``importance`` section carries group importance in unpruned numbering: a node reports the
smoothed scores of the groups it still has, and the coordinator sends back the fleet's coverage-weighted
average, so that a node whose data is skewed does not prune what the rest of the fleet needs.

``<module>`` is the module's name relative to the transformers model (no peft prefixes), e.g.
``bert.encoder.layer.0.attention.self.query`` or ``model.layers.0.mlp.up_proj``.
``from_bytes`` validates everything (dtypes, shapes, index ranges, finite values, size limits) and raises
``UpdateError`` naming the offending key; nothing unvalidated reaches the math.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# LoRA alpha of the whole fleet: a factor pair of rank r has scale alpha / r on every node and in the
# coordinator's factorisations (one source, not an option: nodes with other alphas could not share updates).
LORA_ALPHA = 16.0

FORMAT = "fedspine-lora"
FORMAT_VERSION = "1"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class UpdateError(ValueError):
    """An update that is malformed, inconsistent or outside the configured limits."""


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds applied when decoding an update from the network."""

    max_bytes: int = 512 * 1024 * 1024
    max_rank: int = 256
    max_dim: int = 1 << 17
    max_modules: int = 4096


@dataclass(frozen=True)
class ModuleUpdate:
    """One adapted module's LoRA factors and kept-index maps (unpruned coordinates)."""

    A: torch.Tensor
    B: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    shape: tuple[int, int]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """The update on the kept coordinates: ``scale * B @ A`` (len(rows) x len(cols)), float32."""
        return self.scale * (self.B.float() @ self.A.float())

    def norm(self) -> float:
        """The Frobenius norm of ``delta()`` from the factors' Gram matrices, ‖sBA‖² = s²·Σ (BᵀB)∘(AAᵀ), in float64:
        r×r products instead of the rows×cols matrix (a twelfth of the time for a MiniLM update at rank 8)."""
        a, b = self.A.double(), self.B.double()
        return abs(self.scale) * float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt())

    def dense_delta(self) -> torch.Tensor:
        """The update scattered into a zero matrix of the unpruned shape."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        out[self.rows.unsqueeze(1), self.cols.unsqueeze(0)] = self.delta()
        return out

    def leading(self, rank: int) -> ModuleUpdate:
        """The first ``rank`` components (all of them when there are fewer), at the same scale.  The coordinator
        orders components by importance (singular values for FedSpine, HetLoRA's own order for zero-padding), so
        this is the update a node of that rank trains from."""
        if rank >= self.rank:
            return self
        return replace(self, A=self.A[:rank], B=self.B[:, :rank])

    def validate(self, name: str, limits: UpdateLimits = UpdateLimits()) -> None:
        _check_module(name, self, limits)


@dataclass(frozen=True)
class GroupScores:
    """Importance of one layer's head groups or FFN channels, for the groups in ``idx`` (unpruned numbering)."""

    idx: torch.Tensor  # int64 [k], sorted, unique, in [0, size)
    score: torch.Tensor  # float32 [k], finite, >= 0
    size: int  # the layer's unpruned number of groups

    def validate(self, key: str, limits: UpdateLimits = UpdateLimits()) -> None:
        layer, _, kind = key.partition(".")
        if not layer.isdigit() or kind not in IMPORTANCE_KINDS:
            raise UpdateError(f"importance.{key}: key must be <layer>.heads or <layer>.channels")
        if not 0 < self.size <= limits.max_dim:
            raise UpdateError(f"importance.{key}.size: {self.size} outside (0, {limits.max_dim}]")
        if self.idx.dtype != torch.int64 or self.idx.dim() != 1:
            raise UpdateError(f"importance.{key}.idx: must be a 1-d int64 tensor")
        _check_index(f"importance.{key}", "idx", self.idx, self.size, prefix="")
        if self.score.dtype not in _FLOAT_DTYPES or tuple(self.score.shape) != (self.idx.numel(),):
            raise UpdateError(f"importance.{key}.score: must be a float vector as long as idx")
        if not bool(torch.isfinite(self.score).all()) or bool((self.score < 0).any()):
            raise UpdateError(f"importance.{key}.score: must be finite and >= 0")


IMPORTANCE_KINDS = ("heads", "channels")


@dataclass(frozen=True)
class LoraUpdate:
    """A whole update: adapted modules plus densely trained parameters (and optionally group importance)."""

    modules: Mapping[str, ModuleUpdate]
    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    importance: Mapping[str, GroupScores] = field(default_factory=dict)  # "<layer>.<heads|channels>"

    def validate(self, limits: UpdateLimits = UpdateLimits()) -> None:
        if len(self.modules) > limits.max_modules:
            raise UpdateError(f"update has {len(self.modules)} modules, more than {limits.max_modules}")
        if len(self.importance) > 2 * limits.max_modules:
            raise UpdateError(f"update has {len(self.importance)} importance entries, more than allowed")
        for name, mod in self.modules.items():
            _check_module(name, mod, limits)
        for key, g in self.importance.items():
            g.validate(key, limits)
        for name, t in self.dense.items():
            _check_name(name)
            if t.dtype not in _FLOAT_DTYPES:
                raise UpdateError(f"dense.{name}: dtype {t.dtype} is not a float type")
            if not _finite(t):
                raise UpdateError(f"dense.{name}: contains NaN or Inf")

    @property
    def rank(self) -> int:
        """The largest module rank (0 without modules)."""
        return max((m.rank for m in self.modules.values()), default=0)

    def leading(self, rank: int) -> LoraUpdate:
        """Every module cut to its first ``rank`` components (``ModuleUpdate.leading``)."""
        if rank >= self.rank:
            return self
        return replace(self, modules={n: m.leading(rank) for n, m in self.modules.items()})

    def norm(self) -> float:
        """Sum over modules of the Frobenius norm of ``scale * B @ A`` (the spec's LoRA importance term)."""
        return sum(m.norm() for m in self.modules.values())

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            p = f"lora.{name}"
            tensors[p + ".A"] = m.A.detach().float().contiguous().cpu()
            tensors[p + ".B"] = m.B.detach().float().contiguous().cpu()
            tensors[p + ".rows"] = m.rows.detach().to(torch.int64).contiguous().cpu()
            tensors[p + ".cols"] = m.cols.detach().to(torch.int64).contiguous().cpu()
            tensors[p + ".shape"] = torch.tensor(list(m.shape), dtype=torch.int64)
            tensors[p + ".scale"] = torch.tensor([m.scale], dtype=torch.float32)
        for name, t in self.dense.items():
            tensors[f"dense.{name}"] = t.detach().float().contiguous().cpu()
        for key, g in self.importance.items():
            tensors[f"importance.{key}.idx"] = g.idx.detach().to(torch.int64).contiguous().cpu()
            tensors[f"importance.{key}.score"] = g.score.detach().float().contiguous().cpu()
            tensors[f"importance.{key}.size"] = torch.tensor([g.size], dtype=torch.int64)
        return st_save(tensors, metadata={"format": FORMAT, "version": FORMAT_VERSION})

    @classmethod
    def from_bytes(cls, data: bytes, limits: UpdateLimits = UpdateLimits()) -> LoraUpdate:
        """Decode and validate; raise UpdateError for anything malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UpdateError(f"update must be bytes, got {type(data).__name__}")
        if len(data) > limits.max_bytes:
            raise UpdateError(f"update of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
        raw = bytes(data)  # one copy for both parsers
        meta = _read_metadata(raw)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise UpdateError(f"not a {FORMAT} v{FORMAT_VERSION} update (metadata {meta!r})")
        try:
            tensors = st_load(raw)
        except (SafetensorError, ValueError, RuntimeError) as exc:  # malformed safetensors
            raise UpdateError(f"malformed safetensors payload: {exc}") from None
        parts: dict[str, dict[str, torch.Tensor]] = {}
        dense: dict[str, torch.Tensor] = {}
        imp_parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("dense."):
                dense[key[len("dense."):]] = t.float() if t.dtype in _FLOAT_DTYPES else t
                continue
            if key.startswith("importance."):
                name, _, part = key[len("importance."):].rpartition(".")
                if part not in ("idx", "score", "size") or not name:
                    raise UpdateError(f"unexpected tensor {key!r}")
                imp_parts.setdefault(name, {})[part] = t
                continue
            if not key.startswith("lora."):
                raise UpdateError(f"unexpected tensor {key!r}")
            name, _, part = key[len("lora."):].rpartition(".")
            if part not in ("A", "B", "rows", "cols", "shape", "scale") or not name:
                raise UpdateError(f"unexpected tensor {key!r}")
            parts.setdefault(name, {})[part] = t
        modules: dict[str, ModuleUpdate] = {}
        for name, p in parts.items():
            missing = {"A", "B", "rows", "cols", "shape", "scale"} - p.keys()
            if missing:
                raise UpdateError(f"lora.{name}: missing {sorted(missing)}")
            for part in ("rows", "cols", "shape"):
                if p[part].dtype != torch.int64 or p[part].dim() != 1:
                    raise UpdateError(f"lora.{name}.{part}: must be a 1-d int64 tensor")
            if p["shape"].numel() != 2 or p["scale"].numel() != 1 or p["scale"].dtype not in _FLOAT_DTYPES:
                raise UpdateError(f"lora.{name}: shape must have 2 entries and scale 1 float")
            for part in ("A", "B"):
                if p[part].dtype not in _FLOAT_DTYPES:
                    raise UpdateError(f"lora.{name}.{part}: dtype {p[part].dtype} is not a float type")
            (out_dim, in_dim), (scale,) = p["shape"].tolist(), p["scale"].tolist()  # tolist: no tensor per entry
            modules[name] = ModuleUpdate(A=p["A"].float(), B=p["B"].float(), rows=p["rows"], cols=p["cols"],
                                         shape=(out_dim, in_dim), scale=float(scale))
        importance: dict[str, GroupScores] = {}
        for name, p in imp_parts.items():
            missing = {"idx", "score", "size"} - p.keys()
            if missing:
                raise UpdateError(f"importance.{name}: missing {sorted(missing)}")
            if p["size"].dtype != torch.int64 or p["size"].numel() != 1:
                raise UpdateError(f"importance.{name}.size: must be one int64")
            importance[name] = GroupScores(idx=p["idx"], score=p["score"].float() if p["score"].dtype in _FLOAT_DTYPES
                                           else p["score"], size=int(p["size"][0]))
        update = cls(modules=modules, dense=dense, importance=importance)
        update.validate(limits)
        return update


def _read_metadata(data: bytes) -> dict[str, str]:
    import json

    if len(data) < 8:
        raise UpdateError("update shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data) or n > 100 * 1024 * 1024:
        raise UpdateError(f"safetensors header length {n} does not fit a payload of {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise UpdateError("safetensors header is not valid JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


_SPACE = re.compile(r"\s")


def _check_name(name: str) -> None:
    if not name or len(name) > 256 or _SPACE.search(name):
        raise UpdateError(f"invalid parameter name {name!r}")


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (numpy for float32 on the CPU: a third of torch's per-call cost on small tensors)."""
    if t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


_ARANGE: dict[int, torch.Tensor] = {}  # 0..n-1 by n: an unpruned index is checked with one comparison


def _check_index(name: str, part: str, idx: torch.Tensor, bound: int, prefix: str = "lora.") -> None:
    if idx.numel() == bound and idx.dtype == torch.int64 and bound <= 1 << 17:
        full = _ARANGE.get(bound)
        if full is None:
            full = _ARANGE[bound] = torch.arange(bound)
        if torch.equal(idx, full):  # every index, in order: valid
            return
    if idx.numel() == 0:
        raise UpdateError(f"{prefix}{name}.{part}: empty (a layer keeps at least one group)")
    if int(idx.min()) < 0 or int(idx.max()) >= bound:
        raise UpdateError(f"{prefix}{name}.{part}: indices outside [0, {bound})")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise UpdateError(f"{prefix}{name}.{part}: indices must be sorted and unique")


def _check_module(name: str, m: ModuleUpdate, limits: UpdateLimits) -> None:
    _check_name(name)
    out_dim, in_dim = m.shape
    if not (0 < out_dim <= limits.max_dim and 0 < in_dim <= limits.max_dim):
        raise UpdateError(f"lora.{name}.shape: {m.shape} outside (0, {limits.max_dim}]")
    if m.A.dim() != 2 or m.B.dim() != 2:
        raise UpdateError(f"lora.{name}: A and B must be matrices")
    r = m.A.shape[0]
    if not 1 <= r <= limits.max_rank:
        raise UpdateError(f"lora.{name}: rank {r} outside [1, {limits.max_rank}]")
    _check_index(name, "rows", m.rows, out_dim)
    _check_index(name, "cols", m.cols, in_dim)
    if tuple(m.A.shape) != (r, m.cols.numel()):
        raise UpdateError(f"lora.{name}.A: shape {tuple(m.A.shape)} != (rank {r}, {m.cols.numel()} cols)")
    if tuple(m.B.shape) != (m.rows.numel(), r):
        raise UpdateError(f"lora.{name}.B: shape {tuple(m.B.shape)} != ({m.rows.numel()} rows, rank {r})")
    if not (math.isfinite(m.scale) and m.scale > 0):
        raise UpdateError(f"lora.{name}.scale: {m.scale} is not a positive finite number")
    if not (_finite(m.A) and _finite(m.B)):
        raise UpdateError(f"lora.{name}: A or B contains NaN or Inf")
