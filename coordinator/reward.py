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

What a node's terms need of the rest of the round is ``RoundStats``: the best relative loss reduction, the largest
importance, the lowest energy per sample (if every node reported energy) and the two slowest modelled completion
times.  Extremes merge across sub-fleets in any grouping (``RoundStats.merge``), so regional aggregators each send
their nodes' and the root sends back the fleet's: the same numbers as a flat round's (coordinator/region.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

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


def _rel_loss(loss_start: float, loss_end: float) -> float:
    return (loss_start - loss_end) / loss_start if loss_start > 0 else 0.0


def _per_sample(energy_j: float | None, samples: int) -> float | None:
    return energy_j / max(samples, 1) if energy_j is not None else None


Slowest = tuple[tuple[str, float], ...]  # up to two (node, seconds), slowest first


def slowest_two(times: Mapping[str, float] | Sequence[tuple[str, float]]) -> Slowest:
    """The two slowest of (node, seconds), slowest first (ties by node id): all the others' maximum needs, for
    every node (the slowest overall, or for the slowest node itself the runner-up)."""
    items = times.items() if isinstance(times, Mapping) else times
    return tuple(sorted(items, key=lambda kv: (-kv[1], kv[0]))[:2])


def slowest_other(slowest: Slowest, node_id: str) -> float | None:
    """The slowest time among the nodes other than ``node_id`` (None: no other node)."""
    return next((t for n, t in slowest if n != node_id), None)


@dataclass(frozen=True)
class RoundStats:
    """What the reward of any node needs of a round's other results (see the module docstring).  ``best_loss`` is
    floored at 0 (a best at or below 0 scores every node's loss term 0 either way); ``lowest_energy`` is None unless
    every node reported energy; ``slowest``: the round's two slowest modelled completion times (FedSpine's time
    term, ``FedSpine.round_shares``)."""

    best_loss: float
    best_importance: float
    lowest_energy: float | None
    slowest: Slowest

    @classmethod
    def of(cls, inputs: Sequence[RewardInput], times: Mapping[str, float] | None = None) -> RoundStats:
        """The statistics of a (sub-)fleet's results (``times``: each node's modelled completion time)."""
        per_sample = [_per_sample(x.energy_j, x.samples) for x in inputs]
        have_energy = all(e is not None and e > 0 for e in per_sample)
        return cls(best_loss=max([0.0, *(_rel_loss(x.loss_start, x.loss_end) for x in inputs)]),
                   best_importance=max((x.importance for x in inputs), default=0.0),
                   lowest_energy=min(per_sample) if have_energy and per_sample else None,  # type: ignore[type-var]
                   slowest=slowest_two(times or {}))

    def fields(self) -> dict:
        """As RegionReport and RegionPlanQuery carry them, and the root's checkpoint (``slowest`` a node -> seconds map)."""
        return {"best_loss": self.best_loss, "best_importance": self.best_importance,
                "lowest_energy": self.lowest_energy, "slowest": dict(self.slowest)}

    @classmethod
    def from_fields(cls, f: Any) -> RoundStats:
        """From ``fields()``'s keys: a message carrying them as attributes, or a mapping (a checkpoint)."""
        get = f.__getitem__ if isinstance(f, Mapping) else lambda k: getattr(f, k)
        return cls(best_loss=float(get("best_loss")), best_importance=float(get("best_importance")),
                   lowest_energy=get("lowest_energy"), slowest=slowest_two(get("slowest")))

    def merge(self, other: RoundStats) -> RoundStats:
        """The statistics of both sub-fleets together (associative and commutative: maxima, minima, the two
        slowest)."""
        energy = None if self.lowest_energy is None or other.lowest_energy is None \
            else min(self.lowest_energy, other.lowest_energy)
        return RoundStats(best_loss=max(self.best_loss, other.best_loss),
                          best_importance=max(self.best_importance, other.best_importance), lowest_energy=energy,
                          slowest=slowest_two([*self.slowest, *other.slowest]))


def merge_stats(parts: Sequence[RoundStats]) -> RoundStats | None:
    """The fleet's statistics from its sub-fleets' (None: no sub-fleet had results)."""
    return reduce(RoundStats.merge, parts) if parts else None


def rewards(inputs: Sequence[RewardInput], weights: Mapping[str, float],
            fleet: RoundStats | None = None) -> dict[str, dict]:
    """Per node, the terms and the reward (``{"terms": {...}, "reward": r}``); ``fleet``: the whole round's
    statistics where ``inputs`` are one region's nodes (default: those of ``inputs``)."""
    if not inputs:
        return {}
    fleet = fleet or RoundStats.of(inputs)
    rel_loss = [_rel_loss(x.loss_start, x.loss_end) for x in inputs]
    best_loss, best_imp = fleet.best_loss, fleet.best_importance
    per_sample = [_per_sample(x.energy_j, x.samples) for x in inputs]
    lowest_e = fleet.lowest_energy
    have_energy = lowest_e is not None
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
