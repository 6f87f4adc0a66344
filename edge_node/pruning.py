"""Physical structured pruning of attention head groups and FFN channels, with kept-index maps (unpruned numbering)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edge_node.model import LayerGeometry, arch_of, layer_geometry, unwrap

KEPT_ATTR = "fedspine_kept"


@dataclass(frozen=True)
class LayerKept:
    """What one layer still has, in the unpruned model's numbering (sorted)."""

    heads: tuple[int, ...]  # kept head groups: KV heads (== attention heads without GQA)
    channels: tuple[int, ...]  # kept FFN channels

    def query_heads(self, geo: LayerGeometry) -> list[int]:
        q = geo.q_per_group
        return [g * q + j for g in self.heads for j in range(q)]


@dataclass(frozen=True)
class LayerCost:
    """Prunable parameters of one layer: per head group, per channel, and all of them (weights + biases)."""

    head: int
    channel: int
    total: int


def kept_to_json(maps: dict[int, LayerKept]) -> dict[str, dict[str, list[int]]]:
    """Kept maps as the node's resume state stores them (``state.json``'s ``kept``)."""
    return {str(i): {"heads": list(k.heads), "channels": list(k.channels)} for i, k in maps.items()}


def kept_from_json(data: dict) -> dict[int, LayerKept]:
    """The inverse of ``kept_to_json``."""
    return {int(i): LayerKept(tuple(int(h) for h in v["heads"]), tuple(int(c) for c in v["channels"]))
            for i, v in data.items()}


def kept_maps(model: nn.Module) -> dict[int, LayerKept]:
    """Per layer kept head groups and FFN channels (unpruned numbering); everything for an unpruned model."""
    base = unwrap(model)
    stored = getattr(base, KEPT_ATTR, None)
    if stored is not None:
        return dict(stored)
    return {g.index: LayerKept(tuple(range(g.n_kv_heads)), tuple(range(g.intermediate))) for g in layer_geometry(base)}


def _span(indices: list[int] | tuple[int, ...], width: int) -> torch.Tensor:
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    return (idx.unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def module_maps(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """For every prunable module: (kept rows, kept cols, unpruned (out, in) shape), in unpruned coordinates."""
    spec = arch_of(model)
    kept = kept_maps(model)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
    for g in layer_geometry(model):
        k = kept[g.index]
        full = torch.arange(g.hidden)
        q_rows = _span(k.query_heads(g), g.head_dim)
        kv_rows = _span(k.heads, g.head_dim)
        ch = torch.as_tensor(k.channels, dtype=torch.int64)
        n_q, n_kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
        out[g.name(spec.q)] = (q_rows, full, (n_q, g.hidden))
        out[g.name(spec.k)] = (kv_rows, full, (n_kv, g.hidden))
        out[g.name(spec.v)] = (kv_rows.clone(), full, (n_kv, g.hidden))
        out[g.name(spec.o)] = (full, q_rows.clone(), (g.hidden, n_q))
        for rel in spec.ffn_in:
            out[g.name(rel)] = (ch, full, (g.intermediate, g.hidden))
        out[g.name(spec.ffn_out)] = (full, ch.clone(), (g.hidden, g.intermediate))
    return out


def _linear(mod: nn.Module) -> nn.Linear:
    return mod.base_layer if hasattr(mod, "base_layer") else mod


def layer_costs(model: nn.Module) -> dict[int, LayerCost]:
    """Prunable parameter counts per layer, from the unpruned geometry and the modules' bias flags."""
    spec = arch_of(model)
    base = unwrap(model)
    costs: dict[int, LayerCost] = {}
    for g in layer_geometry(model):
        def has_bias(rel: str, g: LayerGeometry = g) -> int:
            return int(_linear(base.get_submodule(g.name(rel))).bias is not None)

        hd, qpg, h = g.head_dim, g.q_per_group, g.hidden
        head = qpg * hd * (h + has_bias(spec.q)) + hd * (2 * h + has_bias(spec.k) + has_bias(spec.v)) + qpg * hd * h
        channel = sum(h + has_bias(rel) for rel in spec.ffn_in) + h
        fixed = h * (has_bias(spec.o) + has_bias(spec.ffn_out))  # output biases over the hidden size
        costs[g.index] = LayerCost(head, channel, head * g.n_kv_heads + channel * g.intermediate + fixed)
    return costs


def sparsity(model: nn.Module) -> float:
    """Removed prunable parameters / all prunable parameters (attention and FFN projections)."""
    costs, kept = layer_costs(model), kept_maps(model)
    removed = total = 0
    for g in layer_geometry(model):
        c, k = costs[g.index], kept[g.index]
        removed += (g.n_kv_heads - len(k.heads)) * c.head + (g.intermediate - len(k.channels)) * c.channel
        total += c.total
    return removed / total if total else 0.0


# ---- choosing what to remove -------------------------------------------------------------------------------


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _channels_to_keep(target: float, c: LayerCost, g: LayerGeometry, kept_heads: int, have: int,
                      multiple: int) -> int:
    removed_heads = (g.n_kv_heads - kept_heads) * c.head
    need = max(0.0, target * c.total - removed_heads)
    remove = min(g.intermediate - 1, math.ceil(need / c.channel - 1e-9))
    keep = min(have, g.intermediate - remove)
    if multiple > 1 and keep >= multiple:
        keep = keep // multiple * multiple
    return max(1, keep)


def plan_counts(model: nn.Module, target: float, round_multiple: int = 1) -> dict[int, tuple[int, int]]:
    """Per layer (head groups, channels) to keep so that every layer reaches ``target`` (monotone, >= 1 each)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} outside [0, 1)")
    costs, kept = layer_costs(model), kept_maps(model)
    counts: dict[int, tuple[int, int]] = {}
    for g in layer_geometry(model):
        k = kept[g.index]
        heads = min(len(k.heads), max(1, g.n_kv_heads - _round_half_up(target * g.n_kv_heads)))
        channels = _channels_to_keep(target, costs[g.index], g, heads, len(k.channels), round_multiple)
        counts[g.index] = (heads, channels)
    return counts


def _keep_top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Local positions (sorted) of the ``n`` highest scores; ties broken towards lower index."""
    order = torch.sort(-scores.detach().float().cpu(), stable=True).indices
    return torch.sort(order[:n]).values


def _keep_random(size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(size, generator=generator)[:n]).values


def plan_prune(model: nn.Module, target: float, scores: dict[int, tuple[torch.Tensor, torch.Tensor]] | None, *,
               round_multiple: int = 1, scope: str = "layer", generator: torch.Generator | None = None,
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Local positions (into the current structure) of the head groups and channels to keep, per layer.

    ``scores`` maps a layer to (head-group scores, channel scores) over its current groups; ``None`` picks
    random groups at the same counts (the ablation).  ``scope="global"`` ranks groups across layers instead
    (each layer still keeps >= 1 head group and >= 1 channel).
    """
    kept = kept_maps(model)
    if scope == "global" and scores is not None:
        return _plan_global(model, target, scores, round_multiple)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope {scope!r} must be layer or global")
    gen = generator or torch.Generator().manual_seed(0)
    plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for idx, (n_heads, n_ch) in plan_counts(model, target, round_multiple).items():
        k = kept[idx]
        if scores is None:
            plan[idx] = (_keep_random(len(k.heads), n_heads, gen), _keep_random(len(k.channels), n_ch, gen))
        else:
            plan[idx] = (_keep_top(scores[idx][0], n_heads), _keep_top(scores[idx][1], n_ch))
    return plan


def _plan_global(model: nn.Module, target: float, scores: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 round_multiple: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    geos, costs, kept = layer_geometry(model), layer_costs(model), kept_maps(model)
    total = sum(c.total for c in costs.values())
    removed = sum((g.n_kv_heads - len(kept[g.index].heads)) * costs[g.index].head
                  + (g.intermediate - len(kept[g.index].channels)) * costs[g.index].channel for g in geos)
    n_heads_all = sum(g.n_kv_heads for g in geos)
    drop_heads = _round_half_up(target * n_heads_all) - sum(g.n_kv_heads - len(kept[g.index].heads) for g in geos)
    keep_h = {g.index: torch.ones(len(kept[g.index].heads), dtype=torch.bool) for g in geos}
    keep_c = {g.index: torch.ones(len(kept[g.index].channels), dtype=torch.bool) for g in geos}

    def drop(kind: str, budget_fn) -> None:
        nonlocal removed
        masks = keep_h if kind == "h" else keep_c
        cand = [(float(s), idx, pos) for idx in masks for pos, s in enumerate(scores[idx][0 if kind == "h" else 1])]
        for _, idx, pos in sorted(cand):
            if not budget_fn():
                break
            if int(masks[idx].sum()) <= 1:
                continue
            masks[idx][pos] = False
            removed += costs[idx].head if kind == "h" else costs[idx].channel

    counter = {"h": max(0, drop_heads)}

    def heads_left() -> bool:
        counter["h"] -= 1
        return counter["h"] >= 0

    drop("h", heads_left)
    drop("c", lambda: removed < target * total)
    plan = {}
    for g in geos:
        ch = torch.nonzero(keep_c[g.index]).flatten()
        if round_multiple > 1 and ch.numel() >= round_multiple:
            n = ch.numel() // round_multiple * round_multiple
            ch = _keep_top(scores[g.index][1], n)
        plan[g.index] = (torch.nonzero(keep_h[g.index]).flatten(), ch)
    return plan


# ---- slicing ------------------------------------------------------------------------------------------------


def _slice_linear(mod: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Keep ``rows`` (outputs) / ``cols`` (inputs) of a Linear or peft LoRA Linear, factors included."""
    lin = _linear(mod)
    dev = lin.weight.device
    w = lin.weight.data
    if rows is not None:
        r = rows.to(dev)
        w = w.index_select(0, r)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, r).contiguous(), requires_grad=lin.bias.requires_grad)
        lin.out_features = w.shape[0]
    if cols is not None:
        w = w.index_select(1, cols.to(dev))
        lin.in_features = w.shape[1]
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if lin is mod:
        return
    for name in list(getattr(mod, "lora_A", {}).keys()):
        a, b = mod.lora_A[name], mod.lora_B[name]
        if cols is not None:
            a.weight = nn.Parameter(a.weight.data.index_select(1, cols.to(a.weight.device)).contiguous())
            a.in_features = a.weight.shape[1]
        if rows is not None:
            b.weight = nn.Parameter(b.weight.data.index_select(0, rows.to(b.weight.device)).contiguous())
            b.out_features = b.weight.shape[0]
    mod.in_features, mod.out_features = lin.in_features, lin.out_features


def apply_plan(model: nn.Module, plan: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, LayerKept]:
    """Physically slice every layer to the kept local positions in ``plan``; returns and stores the new maps."""
    spec = arch_of(model)
    base = unwrap(model)
    kept = kept_maps(model)
    new: dict[int, LayerKept] = dict(kept)
    for g in layer_geometry(model):
        if g.index not in plan:
            continue
        head_pos, ch_pos = (p.to(torch.int64).cpu() for p in plan[g.index])
        k = kept[g.index]
        if head_pos.numel() < 1 or ch_pos.numel() < 1:
            raise ValueError(f"layer {g.index}: must keep >= 1 head group and >= 1 channel")
        nk = LayerKept(tuple(k.heads[i] for i in head_pos.tolist()), tuple(k.channels[i] for i in ch_pos.tolist()))
        if len(nk.heads) < len(k.heads):
            q_local = _span(head_pos.tolist(), g.q_per_group * g.head_dim)
            kv_local = _span(head_pos.tolist(), g.head_dim)
            _slice_linear(base.get_submodule(g.name(spec.q)), q_local, None)
            _slice_linear(base.get_submodule(g.name(spec.k)), kv_local, None)
            _slice_linear(base.get_submodule(g.name(spec.v)), kv_local, None)
            _slice_linear(base.get_submodule(g.name(spec.o)), None, q_local)
            _set_head_attrs(base.get_submodule(g.name(spec.attn)), g, len(nk.heads))
        if len(nk.channels) < len(k.channels):
            for rel in spec.ffn_in:
                _slice_linear(base.get_submodule(g.name(rel)), ch_pos, None)
            _slice_linear(base.get_submodule(g.name(spec.ffn_out)), None, ch_pos)
            if spec.mlp is not None:
                base.get_submodule(g.name(spec.mlp)).intermediate_size = len(nk.channels)
        new[g.index] = nk
    setattr(base, KEPT_ATTR, new)
    return new


def _set_head_attrs(attn: nn.Module, g: LayerGeometry, kv_groups: int) -> None:
    n_q = kv_groups * g.q_per_group
    if hasattr(attn, "all_head_size"):  # BERT / RoBERTa
        attn.num_attention_heads = n_q
        attn.all_head_size = n_q * g.head_dim
    if hasattr(attn, "n_heads"):  # DistilBERT
        attn.n_heads = n_q
    if hasattr(attn, "num_key_value_groups"):  # Llama family: the group ratio is unchanged
        attn.num_heads = n_q
        attn.num_key_value_heads = kv_groups


def restore_structure(model: nn.Module, maps: dict[int, LayerKept]) -> None:
    """Prune a model (unpruned or less pruned) to the given kept maps, e.g. when resuming."""
    current = kept_maps(model)
    plan = {}
    for idx, k in maps.items():
        cur = current[idx]
        if not (set(k.heads) <= set(cur.heads) and set(k.channels) <= set(cur.channels)):
            raise ValueError(f"layer {idx}: kept map is not a subset of the current structure (pruning is monotone)")
        h_pos = torch.as_tensor([cur.heads.index(h) for h in k.heads], dtype=torch.int64)
        c_lookup = {c: i for i, c in enumerate(cur.channels)}
        plan[idx] = (h_pos, torch.as_tensor([c_lookup[c] for c in k.channels], dtype=torch.int64))
    apply_plan(model, plan)
