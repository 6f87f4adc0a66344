"""The S-UCB reward of each node for one round, from the terms of the spec, each normalised across the round.

- loss:       (L_start - L_end) / L_start, relative to the round's best (clipped to [0, 1]);
- progress:   Δs / s*, Δs counted only up to the fleet target s* (pruning beyond it earns nothing here);
- time:       alignment with the fleet, d_i = |T_i - T̄| / T̄ with T̄ the round's mean completion time (ours: the
              *gain* in alignment that the node's own change made, measured against this round's T̄:
              g_i = (|T_i,prev - T̄| - |T_i - T̄|) / T̄ with T_i,prev the node's previous round time, mapped
              to 0.5 + 0.5 g_i / max_j |g_j|. The reward credits what this round's choice changed and not what
              the other nodes did: a fast node that prunes further drifts away from the fleet, a slow one that
              prunes catches up. 1 - d_i when the node has no previous round);
- importance: ‖scale·B·A‖ summed over modules, relative to the round's largest;
- energy:     energy per local sample, the round's lowest over the node's (1 = most frugal); skipped
              (weight 0) when not every node reported energy.
The reward is the weighted mean of the terms, in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.config import REWARD_TERMS as TERMS


@dataclass(frozen=True)
class RewardInput:
    node_id: str
    loss_start: float
    loss_end: float
    delta_sparsity: float
    round_time_s: float
    importance: float
    energy_j: float | None
    samples: int
    prev_time_s: float | None = None  # this node's completion time in its previous round, if any


def _clip01(x: float) -> float:
    return 0.0 if not math.isfinite(x) else min(max(x, 0.0), 1.0)


def rewards(inputs: Sequence[RewardInput], weights: Mapping[str, float], target_sparsity: float) -> dict[str, dict]:
    """Return, per node, the normalised terms and the reward (``{"terms": {...}, "reward": r}``)."""
    if not inputs:
        return {}
    rel_loss = [(x.loss_start - x.loss_end) / x.loss_start if x.loss_start > 0 else 0.0 for x in inputs]
    best_loss = max(rel_loss)
    times = [x.round_time_s for x in inputs]
    mean_t = sum(times) / len(times)
    dev = [abs(t - mean_t) / mean_t if mean_t > 0 else 0.0 for t in times]
    gains = [abs(x.prev_time_s - mean_t) / mean_t - dev[i] if x.prev_time_s is not None and mean_t > 0 else 0.0
             for i, x in enumerate(inputs)]
    top_gain = max(abs(g) for g in gains)
    best_imp = max(x.importance for x in inputs)
    per_sample = [x.energy_j / max(x.samples, 1) if x.energy_j is not None else None for x in inputs]
    have_energy = all(e is not None and e > 0 for e in per_sample)
    lowest_e = min(per_sample) if have_energy else None  # type: ignore[type-var]
    denom = target_sparsity if target_sparsity > 0 else 1.0
    w = {t: float(weights.get(t, 0.0)) for t in TERMS}
    if not have_energy:
        w["energy"] = 0.0
    total_w = sum(w.values()) or 1.0
    out = {}
    for i, x in enumerate(inputs):
        terms = {
            "loss": _clip01(rel_loss[i] / best_loss) if best_loss > 0 else 0.0,
            "progress": _clip01(x.delta_sparsity / denom),
            "time": _clip01(0.5 + 0.5 * gains[i] / top_gain) if top_gain > 0 else _clip01(1.0 - dev[i]),
            "importance": _clip01(x.importance / best_imp) if best_imp > 0 else 0.0,
            "energy": _clip01(lowest_e / per_sample[i]) if have_energy else 0.0,  # type: ignore[operator]
        }
        out[x.node_id] = {"terms": terms, "reward": sum(w[t] * terms[t] for t in TERMS) / total_w}
    return out
