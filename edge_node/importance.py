"""LoRA-guided importance of head groups and FFN channels: |G ⊙ W'| from LoRA gradients, per module, EMA-smoothed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from edge_node.exchange import select_positions
from edge_node.model import LayerGeometry, arch_of, layer_geometry, unwrap
from edge_node.pruning import kept_maps
from shared.updates import GroupScores


def module_scores(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, grad_a: torch.Tensor,
                  grad_b: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
    """Per-row (``dim=0``) or per-column (``dim=1``) sums of |G ⊙ W'| for one LoRA-adapted module.

    W' = W + s·B·A and G ≈ s·(∂L/∂B·A + B·∂L/∂A − ∂L/∂B·∂L/∂A), the change of s·B·A that one gradient step
    on the factors makes: an estimate of ∂L/∂W' that costs O(out·in·r) instead of a full-weight gradient.
    """
    A, B, grad_a, grad_b = A.float(), B.float(), grad_a.float(), grad_b.float()
    g = torch.addmm(B @ grad_a, grad_b, A - grad_a)  # ∂B·A + B·∂A − ∂B·∂A
    w_prime = torch.addmm(weight.float(), B, A, alpha=scale)
    g.mul_(w_prime).abs_()
    return g.sum(dim=1 - dim).mul_(scale)


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v) + 1e-12)


class ImportanceTracker:
    """Smoothed importance per layer: (head-group scores, channel scores) over the *current* structure.

    Call :meth:`update` after ``loss.backward()`` and before the optimizer step.  Each module's score vector
    is L2-normalised before summing into its groups; steps with any non-finite value are skipped; the
    moving average is Ī ← β·Ī + (1−β)·I (the first accepted step initialises Ī).
    """

    def __init__(self, model: nn.Module, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"importance beta {beta} outside [0, 1)")
        self.beta = beta
        self.spec = arch_of(model)
        self.geometry: list[LayerGeometry] = layer_geometry(model)
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.skipped = 0

    def reset(self) -> None:
        self.scores.clear()
        self.steps = 0

    def _layer(self, base: nn.Module, g: LayerGeometry, n_groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        spec = self.spec

        def score(rel: str, dim: int) -> torch.Tensor | None:
            mod = base.get_submodule(g.name(rel))
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            if a.grad is None or b.grad is None:
                return None
            return module_scores(mod.base_layer.weight, a, b, a.grad, b.grad, float(mod.scaling["default"]), dim)

        parts_h = []
        for rel, dim, width in ((spec.q, 0, g.q_per_group * g.head_dim), (spec.k, 0, g.head_dim),
                                (spec.v, 0, g.head_dim), (spec.o, 1, g.q_per_group * g.head_dim)):
            s = score(rel, dim)
            if s is not None:
                parts_h.append(_norm(s.view(n_groups, width).sum(1)))
        parts_c = [s for rel in spec.ffn_in if (s := score(rel, 0)) is not None]
        if (s := score(spec.ffn_out, 1)) is not None:
            parts_c.append(s)
        if not parts_h or not parts_c:
            return None
        return torch.stack(parts_h).sum(0), torch.stack([_norm(p) for p in parts_c]).sum(0)

    @torch.no_grad()
    def update(self, model: nn.Module) -> bool:
        """Accumulate one step's scores from the current LoRA gradients; False if the step was skipped."""
        base = unwrap(model)
        kept = kept_maps(base)
        step: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in self.geometry:
            res = self._layer(base, g, len(kept[g.index].heads))
            if res is not None:
                step[g.index] = res
        if not step:
            return False
        flat = torch.cat([t for pair in step.values() for t in pair])
        if not bool(torch.isfinite(flat).all()):
            self.skipped += 1
            return False
        for idx, (h, c) in step.items():
            prev = self.scores.get(idx)
            if prev is None or prev[0].shape != h.shape or prev[1].shape != c.shape:
                self.scores[idx] = (h.clone(), c.clone())
            else:
                prev[0].mul_(self.beta).add_(h, alpha=1 - self.beta)
                prev[1].mul_(self.beta).add_(c, alpha=1 - self.beta)
        self.steps += 1
        return True

    def complete(self) -> bool:
        """True when every layer has a score (at least one accepted step since the last structure change)."""
        return len(self.scores) == len(self.geometry)

    def slice(self, plan: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Follow a pruning step: keep the scores of the surviving groups (local positions)."""
        for idx, (h_pos, c_pos) in plan.items():
            if idx in self.scores:
                h, c = self.scores[idx]
                self.scores[idx] = (h[h_pos.to(h.device)], c[c_pos.to(c.device)])

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for idx, (h, c) in self.scores.items():
            out[f"importance.{idx}.heads"] = h.detach().float().cpu()
            out[f"importance.{idx}.channels"] = c.detach().float().cpu()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.scores.clear()
        for g in self.geometry:
            h, c = tensors.get(f"importance.{g.index}.heads"), tensors.get(f"importance.{g.index}.channels")
            if h is not None and c is not None:
                self.scores[g.index] = (h.to(device), c.to(device))


def fleet_report(scores: dict[int, tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> dict[str, GroupScores]:
    """This node's smoothed scores in unpruned numbering, each layer's heads and channels L2-normalised (so that
    nodes weigh alike when the coordinator averages them)."""
    kept = kept_maps(unwrap(model))
    out: dict[str, GroupScores] = {}
    for g in layer_geometry(model):
        if g.index not in scores:
            continue
        h, c = scores[g.index]
        k = kept[g.index]
        out[f"{g.index}.heads"] = GroupScores(torch.tensor(k.heads, dtype=torch.int64),
                                              _norm(h.detach().float().cpu()).clamp_min(0), g.n_kv_heads)
        out[f"{g.index}.channels"] = GroupScores(torch.tensor(k.channels, dtype=torch.int64),
                                                 _norm(c.detach().float().cpu()).clamp_min(0), g.intermediate)
    return out


def _mix(local: torch.Tensor, kept: tuple[int, ...], fleet: GroupScores | None, weight: float) -> torch.Tensor:
    own = _norm(local.float())
    if fleet is None:
        return own
    pos, present = select_positions(torch.tensor(kept, dtype=torch.int64), fleet.idx)
    if not bool(present.any()):
        return own
    theirs = torch.where(present, fleet.score[pos].float(), torch.zeros(())).to(own.device)
    theirs = torch.where(present.to(own.device), _norm(theirs), own)  # a group the fleet never scored: ours
    return (1 - weight) * own + weight * theirs


def blend(scores: dict[int, tuple[torch.Tensor, torch.Tensor]], model: nn.Module,
          fleet: Mapping[str, GroupScores], weight: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Scores to prune by: (1 − w)·own + w·fleet per layer and kind, both L2-normalised over the kept groups.

    ``fleet`` is the coordinator's average of every node's reported scores (unpruned numbering).  With
    ``weight`` 0 (or no fleet scores) this is the node's own importance, as the spec has it; with a skewed
    local shard the fleet's view keeps the groups that the other nodes' data needs.
    """
    if weight <= 0 or not fleet:
        return scores
    kept = kept_maps(unwrap(model))
    return {idx: (_mix(h, kept[idx].heads, fleet.get(f"{idx}.heads"), weight),
                  _mix(c, kept[idx].channels, fleet.get(f"{idx}.channels"), weight))
            for idx, (h, c) in scores.items()}
