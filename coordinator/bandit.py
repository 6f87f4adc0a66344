"""S-UCB: per node, one discounted-UCB bandit over the pruning increment Δp and one over the LoRA rank (pure).

    N_t(a) = Σ_{u<t} λ^{t-1-u} 1[a_u = a]             discounted plays
    X_t(a) = Σ_{u<t} λ^{t-1-u} r_u 1[a_u = a] / N_t(a)  discounted mean reward
    U_t(a) = X_t(a) + s · sqrt(log(Σ_a N_t(a)) / N_t(a))   (untried arms first, in a per-node random order)

The arms are increments, so exploring one never locks a node at a high sparsity (pruning is monotone).  Both bandits
of a node are credited with the round's reward (4 + 4 arms to explore instead of the 16 of the joint grid: a run has
a few dozen rounds and every increment is irreversible).  Constraints applied when choosing: the node's sparsity never
exceeds its tier's cap s_max; when the rounds left can no longer close the gap to the fleet target s* with the
largest increment, only increments that keep it reachable are allowed, and on the last round the increment needed is
forced; configurations at least as heavy as one that ran out of memory (same or lower sparsity, same or higher rank)
are excluded for that node; and the strategy may restrict the increments further (``allowed``: FedSpine lets a node
prune beyond s* only while it holds the round back).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field

EPS = 1e-9


class CounterRng:
    """Deterministic draws from (key, draw number): nothing to persist but the counter, so a checkpoint of
    thousands of nodes stays small and a resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, key: str, draws: int = 0) -> None:
        self.key, self.draws = key, draws

    def choice(self, seq):
        digest = hashlib.sha256(f"{self.key}/{self.draws}".encode()).digest()
        self.draws += 1
        return seq[int.from_bytes(digest[:8], "little") % len(seq)]


@dataclass
class DiscountedUCB:
    """The discounted UCB over one set of arms."""

    arms: list
    discount: float
    exploration: float
    rng: CounterRng | random.Random
    counts: list[float] = field(default_factory=list)  # N_t(a)
    sums: list[float] = field(default_factory=list)  # Σ λ^… r_u for arm a
    plays: list[int] = field(default_factory=list)  # undiscounted, to know which arms were tried

    def __post_init__(self) -> None:
        k = len(self.arms)
        self.counts = self.counts or [0.0] * k
        self.sums = self.sums or [0.0] * k
        self.plays = self.plays or [0] * k

    def index(self, a: int) -> float:
        """U_t(a); +inf for an arm never tried."""
        if self.plays[a] == 0 or self.counts[a] <= 0:
            return math.inf
        total = sum(self.counts)
        bonus = self.exploration * math.sqrt(max(math.log(total), 0.0) / self.counts[a]) if total > 1 else 0.0
        return self.sums[a] / self.counts[a] + bonus

    def select(self, allowed: list[int]) -> int:
        """argmax U_t over ``allowed``: an untried arm first, ties at random."""
        if not allowed:
            raise ValueError("no arm allowed")
        untried = [a for a in allowed if self.plays[a] == 0]
        if untried:
            return self.rng.choice(untried)
        scores = {a: self.index(a) for a in allowed}
        best = max(scores.values())
        return self.rng.choice([a for a, v in scores.items() if v >= best - 1e-12])

    def update(self, a: int, reward: float) -> None:
        if not math.isfinite(reward):
            raise ValueError(f"reward {reward} is not finite")
        self.counts = [self.discount * c for c in self.counts]
        self.sums = [self.discount * s for s in self.sums]
        self.counts[a] += 1.0
        self.sums[a] += reward
        self.plays[a] += 1

    def state_dict(self) -> dict:
        return {"counts": self.counts, "sums": self.sums, "plays": self.plays, "draws": getattr(self.rng, "draws", 0)}

    def load_state_dict(self, d: dict) -> None:
        self.counts, self.sums, self.plays = list(d["counts"]), list(d["sums"]), list(d["plays"])
        if isinstance(self.rng, CounterRng):
            self.rng.draws = int(d.get("draws", 0))


@dataclass(frozen=True)
class Choice:
    """The configuration chosen for one node: the arm (Δp, rank), its new absolute sparsity and whether the target
    constraint overruled the bandit."""

    arm: tuple[float, int]
    target_sparsity: float
    rank: int
    forced: bool


class FleetBandit:
    """The S-UCB bandits of every node, with the sparsity constraints and out-of-memory exclusions."""

    def __init__(self, delta_p: tuple[float, ...], ranks: tuple[int, ...], *, discount: float, exploration: float,
                 target_sparsity: float, total_rounds: int, seed: int = 0) -> None:
        self.delta_p = sorted(float(d) for d in delta_p)
        self.ranks = sorted(int(r) for r in ranks)
        self.discount, self.exploration = discount, exploration
        self.target, self.total_rounds, self.seed = target_sparsity, total_rounds, seed
        self.max_dp = max(self.delta_p)
        # Half the smallest gap between increments: sparsities closer than this are the same step (a node's reported
        # sparsity is that of the groups it really removed, a little off the target).
        grid = sorted(set(self.delta_p) | {0.0})
        self.grain = min(b - a for a, b in zip(grid, grid[1:], strict=False)) / 2 if len(grid) > 1 else EPS
        self.bandits: dict[str, dict[str, DiscountedUCB]] = {}
        self.oom: dict[str, list[tuple[float, int]]] = {}  # node -> (sparsity, rank) that ran out of memory

    def _bandits(self, node_id: str) -> dict[str, DiscountedUCB]:
        if node_id not in self.bandits:
            key = f"{self.seed}/{node_id}"
            self.bandits[node_id] = {
                "dp": DiscountedUCB(list(self.delta_p), self.discount, self.exploration, CounterRng(key + "/dp")),
                "rank": DiscountedUCB(list(self.ranks), self.discount, self.exploration, CounterRng(key + "/rank")),
            }
        return self.bandits[node_id]

    def _fits(self, node_id: str, sparsity: float, rank: int) -> bool:
        return not any(sparsity <= s + EPS and rank >= r for s, r in self.oom.get(node_id, ()))

    def goal(self, cap: float) -> float:
        """The sparsity a node of cap ``cap`` must reach by the last round: min(s*, s_max)."""
        return min(self.target, cap)

    def choose(self, node_id: str, rnd: int, sparsity: float, cap: float,
               allowed: Collection[float] | None = None) -> Choice:
        """The configuration of ``node_id`` for round ``rnd`` (1-based) at its current ``sparsity``; ``allowed``:
        the increments the strategy permits (None: all)."""
        b = self._bandits(node_id)
        rounds_left = max(self.total_rounds - rnd + 1, 1)
        goal = self.goal(cap)
        # The smallest increment this round that still lets the remaining rounds reach the target.
        need = goal - sparsity - self.max_dp * (rounds_left - 1)
        new = {d: min(sparsity + d, cap) for d in self.delta_p}
        usable = [d for d in self.delta_p if any(self._fits(node_id, new[d], r) for r in self.ranks)]
        enough = [d for d in usable if d >= need - EPS]
        dps = [d for d in enough if allowed is None or d in allowed]
        forced = not dps and need > EPS  # the target overrules the bandit (and ``allowed``)
        if not dps:  # the smallest increment that keeps the target reachable; if none can, the largest that fits
            dps = [min(enough)] if enough else [max(usable, default=self.max_dp) if need > EPS else 0.0]
        # Near the cap larger increments land on the same sparsity: keep the smallest of each.
        dps = [d for d in dps if all(abs(new[d] - new[k]) > EPS for k in dps if k < d)]
        dp = b["dp"].arms[b["dp"].select([self.delta_p.index(d) for d in dps])]
        fitting = [i for i, r in enumerate(self.ranks) if self._fits(node_id, new[dp], r)]
        rank = b["rank"].arms[b["rank"].select(fitting or [0])]
        target = new[dp]
        if rnd >= self.total_rounds and target < goal - EPS:
            target, forced = goal, True
        return Choice(arm=(dp, rank), target_sparsity=float(min(target, cap)), rank=rank, forced=forced)

    def update(self, node_id: str, arm: tuple[float, int], reward: float) -> None:
        """Credit ``reward`` to both halves of the arm played."""
        b = self._bandits(node_id)
        b["dp"].update(self.delta_p.index(float(arm[0])), reward)
        b["rank"].update(self.ranks.index(int(arm[1])), reward)

    def out_of_memory(self, node_id: str, sparsity: float, rank: int) -> None:
        """Exclude this configuration and every heavier one (same or lower sparsity, same or higher rank)."""
        self.oom.setdefault(node_id, []).append((float(sparsity), int(rank)))

    def state_dict(self) -> dict:
        return {"bandits": {n: {k: u.state_dict() for k, u in b.items()} for n, b in self.bandits.items()},
                "oom": {n: [list(x) for x in v] for n, v in self.oom.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.bandits = {}
        for n, st in d.get("bandits", {}).items():
            for k, u in self._bandits(n).items():
                u.load_state_dict(st[k])
        self.oom = {n: [(float(s), int(r)) for s, r in v] for n, v in d.get("oom", {}).items()}
