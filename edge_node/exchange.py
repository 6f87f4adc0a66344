"""Model <-> LoraUpdate in the unpruned model's coordinates: build this node's upload, apply a received update."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from edge_node.model import layer_geometry, lora_factors, lora_layers, refactor, set_lora, task_head_params
from edge_node.pruning import module_maps
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError


def build_update(model: nn.Module, importance: Mapping[str, GroupScores] | None = None) -> LoraUpdate:
    """This node's LoRA factors with its kept rows/cols (unpruned numbering) plus the task head, all fp32 CPU,
    and its group importance when given (``importance.fleet_report``)."""
    maps = module_maps(model)
    modules: dict[str, ModuleUpdate] = {}
    for name, layer in lora_layers(model).items():
        lin_a, lin_b, scale = lora_factors(layer)
        rows, cols, shape = maps[name]
        modules[name] = ModuleUpdate(
            A=lin_a.weight.detach().float().cpu().clone(), B=lin_b.weight.detach().float().cpu().clone(),
            rows=rows.clone(), cols=cols.clone(), shape=shape, scale=scale,
        )
    dense = {name: p.detach().float().cpu().clone() for name, p in task_head_params(model).items()}
    return LoraUpdate(modules=modules, dense=dense, importance=dict(importance or {}))


def select_positions(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in ``theirs`` of each of ``ours`` and a mask of those present (both sorted, unique)."""
    pos = torch.searchsorted(theirs, ours).clamp(max=theirs.numel() - 1)
    return pos, theirs[pos] == ours


def slice_module(mod: ModuleUpdate, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_sub, A_sub) of ``mod`` restricted to our kept rows/cols; coordinates it lacks are zero."""
    r_pos, r_ok = select_positions(rows, mod.rows)
    c_pos, c_ok = select_positions(cols, mod.cols)
    B = mod.B.float()[r_pos] * r_ok.unsqueeze(1)
    A = mod.A.float()[:, c_pos] * c_ok.unsqueeze(0)
    return B, A


def apply_update(model: nn.Module, update: LoraUpdate, *, rank: int, alpha: float,
                 generator: torch.Generator | None = None, leading: bool = False) -> None:
    """Set this node's LoRA from a (global) update: slice to our structure, best rank-``rank`` approximation.

    With ``leading``, an update of a higher rank is first cut to its first ``rank`` components
    (``LoraUpdate.leading``): the coordinator's slices are ordered (by singular value for FedSpine, so this is the
    best approximation; in HetLoRA's zero-padded order for that baseline) and it counts the node's start that way.
    The update may cover more coordinates than we kept (it is sliced) or fewer (missing ones count as zero).
    Components with zero singular value restart like peft (kaiming-uniform A row, zero B column).  Modules the
    update does not mention keep their own factors (re-ranked).  Raises UpdateError on any mismatch before
    changing anything.
    """
    layers = lora_layers(model)
    maps = module_maps(model)
    heads = task_head_params(model)
    unknown = sorted(set(update.modules) - set(layers))
    if unknown:
        raise UpdateError(f"update names modules this model does not have: {unknown[:3]}")
    for name, mod in update.modules.items():
        if tuple(mod.shape) != maps[name][2]:
            raise UpdateError(f"lora.{name}.shape: {tuple(mod.shape)} != this model's unpruned {maps[name][2]}")
    for name, t in update.dense.items():
        if name not in heads:
            raise UpdateError(f"dense.{name}: not a trainable parameter of this model")
        if tuple(t.shape) != tuple(heads[name].shape):
            raise UpdateError(f"dense.{name}: shape {tuple(t.shape)} != {tuple(heads[name].shape)}")
    geometry = {str(g.index): g for g in layer_geometry(model)}
    for key, g in update.importance.items():
        layer, _, kind = key.partition(".")
        geo = geometry.get(layer)
        if geo is None or g.size != (geo.n_kv_heads if kind == "heads" else geo.intermediate):
            raise UpdateError(f"importance.{key}: no such layer, or size {g.size} differs from this model's")
    new_scale = alpha / rank
    for name, layer in layers.items():
        mod = update.modules.get(name)
        if mod is None:
            lin_a, lin_b, scale = lora_factors(layer)
            B, A = refactor(lin_b.weight, lin_a.weight, scale, rank, new_scale, generator)
        else:
            rows, cols, _ = maps[name]
            B_sub, A_sub = slice_module(mod.leading(rank) if leading else mod, rows, cols)
            B, A = refactor(B_sub, A_sub, mod.scale, rank, new_scale, generator)
        set_lora(layer, A, B, alpha)
    with torch.no_grad():
        for name, t in update.dense.items():
            heads[name].copy_(t.to(heads[name].device, heads[name].dtype))
