"""Round planning every method shares (pure): the step-cost model, each node's speed, aligned and paced steps.

A synchronous round lasts as long as its slowest node.  Step alignment gives a node that would finish early enough
local steps to finish with the slowest one at τ steps (up to ``MAX_STEPS_FACTOR``·τ), instead of waiting.  The plan
is a forecast, so rounds are also paced: every node is sent the round's planned finish and stops at the step
boundary nearest it (at least ``PACE_MIN_FRACTION``·τ steps, at most the cap), timing its own steps as it runs.
The coordinator then weighs each node's change per step (FedNova), so extra steps do not pull the model toward the
data of the nodes that ran them (coordinator/aggregation.py).

Speeds come from the step-cost model: a node's time per local step at sparsity s is proportional to
``1 - STEP_COST_SPARSITY·s`` (the fit of ``python -m benchmarks.pruning.run --step-cost`` on MiniLM; the LoRA
rank had no measurable effect on a step), and its upload to the LoRA rank (the factors are r rows and columns), at
the median of the node's last ``SPEED_WINDOW`` measured speeds, so that one slow reading on a shared machine does
not stretch the next round for the whole fleet.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

STEP_COST_SPARSITY = 0.92
MAX_STEPS_FACTOR = 5
PACE_MIN_FRACTION = 0.5
SPEED_WINDOW = 9

Timing = tuple[float, float]  # (seconds of a node's round outside its local steps, seconds per local step)
# A node's speed: (seconds of its round outside the steps and the upload, seconds per step at step cost 1, upload
# seconds per unit of LoRA rank)
Speed = tuple[float, float, float]


def step_cost(sparsity: float) -> float:
    """Time per local step at ``sparsity``, relative to a dense step: pruning removes heads and FFN channels, whose
    multiply-adds are most of a step."""
    return 1.0 - STEP_COST_SPARSITY * sparsity


def measured_speed(round_s: float, train_s: float, upload_s: float, steps: int, sparsity: float,
                   rank: int) -> Speed | None:
    """A node's speed from one round: its completion time, the local steps' and the upload's shares of it."""
    if train_s <= 0 or steps <= 0 or rank < 1:
        return None
    upload_s = min(max(upload_s, 0.0), max(round_s - train_s, 0.0))
    return max(round_s - train_s - upload_s, 0.0), train_s / steps / step_cost(sparsity), upload_s / rank


def median_speed(speeds: Sequence[Speed]) -> Speed | None:
    """The component-wise median of a node's recorded speeds; None if it has none."""
    if not speeds:
        return None
    return tuple(statistics.median(s[k] for s in speeds) for k in range(3))  # type: ignore[return-value]


def timing_at(speed: Speed, sparsity: float, rank: int) -> Timing:
    """(fixed seconds, seconds per step) of a node of ``speed`` at ``sparsity`` and LoRA ``rank``."""
    return speed[0] + speed[2] * rank, speed[1] * step_cost(sparsity)


def time_at(speed: Speed, sparsity: float, rank: int, steps: int) -> float:
    """A node's completion time for ``steps`` local steps at ``sparsity`` and ``rank``."""
    fixed, per_step = timing_at(speed, sparsity, rank)
    return fixed + steps * per_step


def round_finish(timing: Mapping[str, Timing], tau: int) -> float:
    """The round's planned completion time: its slowest node's at τ steps."""
    return max((fixed + tau * per_step for fixed, per_step in timing.values()), default=0.0)


def aligned_steps(timing: Mapping[str, Timing], tau: int, most: int, finish: float | None = None) -> dict[str, int]:
    """Local steps per node so that every node finishes by ``finish`` (by default the slowest one's completion at τ
    steps, ``round_finish``), between τ and ``most``."""
    if not timing or most <= tau:
        return {n: tau for n in timing}
    finish = round_finish(timing, tau) if finish is None else finish
    return {n: max(tau, min(most, int((finish - fixed) / per_step))) for n, (fixed, per_step) in timing.items()}


def pace_bounds(tau: int) -> tuple[int, int]:
    """(fewest, most) local steps of a paced node."""
    return max(1, math.ceil(PACE_MIN_FRACTION * tau - 1e-9)), MAX_STEPS_FACTOR * tau


def idle_fraction(times: Sequence[float]) -> float:
    """Mean share of the round each node waits for the slowest one."""
    slowest = max(times, default=0.0)
    if slowest <= 0:
        return 0.0
    return sum((slowest - t) / slowest for t in times) / len(times)


@dataclass(frozen=True)
class Plan:
    """One node's planned work for a round: ``steps`` local steps, completing at ``planned_s``; paced nodes stop at
    the step boundary nearest ``finish_s`` after between ``min_steps`` and ``max_steps`` steps."""

    steps: int
    planned_s: float | None = None
    finish_s: float | None = None
    min_steps: int = 0
    max_steps: int = 0


def plan_round(timing: Mapping[str, Timing], nodes: Sequence[str], tau: int,
               finish: float | None = None) -> dict[str, Plan]:
    """Aligned, paced plans for ``nodes``; a node without a timing (it never measured a step) runs τ unpaced.

    ``finish`` is the round's planned completion, by default ``round_finish(timing, tau)``.  A regional aggregator
    plans its own nodes to the fleet's finish, the latest of its regions' ``round_finish`` (coordinator/region.py),
    which is the flat ``round_finish`` over every node of the fleet."""
    lo, hi = pace_bounds(tau)
    finish = round_finish(timing, tau) if finish is None else finish
    steps = aligned_steps(timing, tau, hi, finish)
    plans = {}
    for n in nodes:
        if n not in timing:
            plans[n] = Plan(steps=tau)
            continue
        fixed, per_step = timing[n]
        k = steps[n]
        paced = hi > tau
        plans[n] = Plan(steps=k, planned_s=fixed + k * per_step, finish_s=finish if paced else None,
                        min_steps=lo if paced else 0, max_steps=hi if paced else 0)
    return plans
