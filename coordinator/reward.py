"""The S-UCB reward of each node for one round: a weighted mean of terms in [0, 1] (pure).

- loss:       relative loss reduction (L_start - L_end) / L_start, over the round's best;
- time:       the share of the fastest round the node could have given the fleet: D_best / D, where D is the round's
              length with the node's chosen configuration (its completion time at τ steps, or the slowest other
              node's if that is longer) and D_best the same with the node's fastest allowed configuration (its cap
              s_max, its smallest rank).  A node that does not hold the round back scores 1 whatever it chose; the
              round's bottleneck scores how close to the fastest round it came (computed by the strategy from the
              step-cost model, coordinator/planning.py);
- importance: ‖scale·B·A‖ summed over modules, over the round's largest;
- energy:     energy per local sample, the round's lowest over the node's (1 = most frugal); left out (weight 0)
              unless every node reported energy.
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
    round_share: float  # D_best / D, see the module docstring
    importance: float
    energy_j: float | None
    samples: int


def _clip01(x: float) -> float:
    return 0.0 if not math.isfinite(x) else min(max(x, 0.0), 1.0)


def rewards(inputs: Sequence[RewardInput], weights: Mapping[str, float]) -> dict[str, dict]:
    """Per node, the terms and the reward (``{"terms": {...}, "reward": r}``)."""
    if not inputs:
        return {}
    rel_loss = [(x.loss_start - x.loss_end) / x.loss_start if x.loss_start > 0 else 0.0 for x in inputs]
    best_loss = max(rel_loss)
    best_imp = max(x.importance for x in inputs)
    per_sample = [x.energy_j / max(x.samples, 1) if x.energy_j is not None else None for x in inputs]
    have_energy = all(e is not None and e > 0 for e in per_sample)
    lowest_e = min(per_sample) if have_energy else None  # type: ignore[type-var]
    w = {t: float(weights.get(t, 0.0)) for t in TERMS}
    if not have_energy:
        w["energy"] = 0.0
    total_w = sum(w.values()) or 1.0
    out = {}
    for i, x in enumerate(inputs):
        terms = {
            "loss": _clip01(rel_loss[i] / best_loss) if best_loss > 0 else 0.0,
            "time": _clip01(x.round_share),
            "importance": _clip01(x.importance / best_imp) if best_imp > 0 else 0.0,
            "energy": _clip01(lowest_e / per_sample[i]) if have_energy else 0.0,  # type: ignore[operator]
        }
        out[x.node_id] = {"terms": terms, "reward": sum(w[t] * terms[t] for t in TERMS) / total_w}
    return out
