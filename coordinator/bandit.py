"""S-UCB: one discounted-UCB bandit per node over (pruning increment, LoRA rank) arms (pure, no I/O).

    N_t(a) = Σ_{u<t} λ^{t-1-u} 1[a_u = a]             discounted plays
    X_t(a) = Σ_{u<t} λ^{t-1-u} r_u 1[a_u = a] / N_t(a)  discounted mean reward
    U_t(a) = X_t(a) + s · sqrt(log(Σ_a N_t(a)) / N_t(a))   (untried arms first, in a per-node random order)

Arms are increments (Δp, r), so exploring an arm never locks a node at a high sparsity (pruning is monotone).
Constraints applied when choosing: the node's sparsity never exceeds its tier cap s_max; when the rounds left
can no longer close the gap to the fleet target s* with the largest increment, only arms that keep the
target reachable are allowed, and on the last round the increment needed is forced; arms at least as heavy
as one that ran out of memory (same or lower sparsity, same or higher rank) are excluded for that node.

Beyond the target (ours): every increment is permanent and earns no pruning progress, so the evidence
gathered below the target (where progress pays every increment) says nothing about it. Δp is then chosen by
a separate discounted bandit that sees only rounds played at or above the target, climbing a ladder: first
Δp = 0, then each larger increment is tried once only while the largest one tried so far has the best mean
(pruning further has paid, e.g. a slow node catching up with the fleet); otherwise greedy on the means. A
fast node that tries one small step and drifts away from the fleet stops there; a slow node climbs to its cap.
A node that did not hold the fleet back in its last round (``behind`` False) gets Δp = 0 beyond the target:
pruning makes a node faster, so for a node ahead of the fleet every further increment can only widen its gap
(worse time term), cost accuracy (worse loss term) and earn no progress: those arms are dominated.  Where
steps are aligned, even a slow node holds nobody back unless another node was held at the step cap (the
others fill its round with steps) and the round idled beyond ``[coordinator] idle_tolerance``, so it stays
at the target too (``Strategy._capped``).

Below the target, with aligned steps (ours): a node that would run at the step cap and still wait more than the
tolerance gets the largest allowed increment that keeps it at or below the round's slowest node
(``FleetBandit.at_most``, ``Strategy._hold_capped``): it cannot use the speed, so pruning it ahead of the slow
node only adds waiting and costs its accuracy early.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

Arm = tuple[float, int]  # (Δp, rank)
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
    """The discounted UCB of one node."""

    arms: list[Arm]
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

    def index(self, a: int, explore: bool = True) -> float:
        """U_t(a); +inf for an arm never tried.  ``explore=False`` gives the discounted mean alone."""
        if self.plays[a] == 0 or self.counts[a] <= 0:
            return math.inf
        total = sum(self.counts)
        bonus = self.exploration * math.sqrt(max(math.log(total), 0.0) / self.counts[a]) if total > 1 else 0.0
        return self.sums[a] / self.counts[a] + (bonus if explore else 0.0)

    def select(self, allowed: list[int], explore: bool = True) -> int:
        """argmax U_t over ``allowed`` (untried first, ties at random); greedy on the mean when not exploring."""
        if not allowed:
            raise ValueError("no arm allowed")
        untried = [a for a in allowed if self.plays[a] == 0]
        if untried and explore:
            return self.rng.choice(untried)
        scores = {a: self.index(a, explore) for a in allowed if self.plays[a] > 0} or {a: 0.0 for a in allowed}
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
        return {"counts": self.counts, "sums": self.sums, "plays": self.plays,
                "draws": getattr(self.rng, "draws", 0)}

    def load_state_dict(self, d: dict) -> None:
        self.counts, self.sums, self.plays = list(d["counts"]), list(d["sums"]), list(d["plays"])
        if isinstance(self.rng, CounterRng):
            self.rng.draws = int(d.get("draws", 0))


@dataclass(frozen=True)
class Choice:
    """The configuration chosen for one node: its new absolute sparsity, rank and the arm behind it."""

    arm_index: int
    arm: Arm
    target_sparsity: float
    rank: int
    forced: bool  # the target constraint overruled the bandit
    beyond_target: bool = False  # chosen at or above the target, by the ladder (see the module docstring)


class FleetBandit:
    """Per-node S-UCB with the sparsity constraints and out-of-memory exclusions.

    ``factored=True`` (default, ours) keeps two discounted UCBs per node, one over Δp and one over the rank,
    both updated with the round's reward: 4 + 4 arms are explored in 4 rounds instead of 16, which matters
    when a run has only a few dozen rounds and every exploratory increment is irreversible.
    ``factored=False`` is the joint bandit over the (Δp, r) grid.
    """

    def __init__(self, delta_p: tuple[float, ...], ranks: tuple[int, ...], *, discount: float, exploration: float,
                 target_sparsity: float, total_rounds: int, seed: int = 0, factored: bool = True) -> None:
        self.delta_p = [float(d) for d in delta_p]
        self.ranks = [int(r) for r in ranks]
        self.arms: list[Arm] = [(dp, r) for dp in self.delta_p for r in self.ranks]
        self.discount, self.exploration = discount, exploration
        self.target, self.total_rounds, self.seed, self.factored = target_sparsity, total_rounds, seed, factored
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
            post = DiscountedUCB([(d, 0) for d in self.delta_p], self.discount, self.exploration,
                                 CounterRng(key + "/post"))
            if self.factored:
                self.bandits[node_id] = {
                    "dp": DiscountedUCB([(d, 0) for d in self.delta_p], self.discount, self.exploration,
                                        CounterRng(key + "/dp")),
                    "rank": DiscountedUCB([(0.0, r) for r in self.ranks], self.discount, self.exploration,
                                          CounterRng(key + "/rank")),
                    "post": post,
                }
            else:
                self.bandits[node_id] = {"joint": DiscountedUCB(list(self.arms), self.discount, self.exploration,
                                                                CounterRng(key + "/joint")), "post": post}
        return self.bandits[node_id]

    def _ladder(self, post: DiscountedUCB, dps: list[float]) -> float:
        """Δp beyond the target: Δp = 0 first, the next larger increment only while pruning more has paid."""
        rungs = sorted(i for i, a in enumerate(post.arms) if a[0] in dps)
        tried = [i for i in rungs if post.plays[i] > 0]
        if not tried:
            return post.arms[rungs[0]][0]
        mean = {i: post.index(i, explore=False) for i in tried}
        top = max(tried, key=lambda i: post.arms[i][0])
        higher = [i for i in rungs if post.arms[i][0] > post.arms[top][0] and post.plays[i] == 0]
        if higher and mean[top] >= max(mean.values()) - 1e-12:
            return post.arms[higher[0]][0]
        return post.arms[post.select(tried, explore=False)][0]

    def _too_heavy(self, node_id: str, sparsity: float, rank: int) -> bool:
        return any(sparsity <= s + EPS and rank >= r for s, r in self.oom.get(node_id, ()))

    def _fits(self, node_id: str, sparsity: float, cap: float, dp: float, rank: int) -> bool:
        """Increment ``dp`` from ``sparsity`` (capped) at ``rank`` is clear of the node's out-of-memory exclusions."""
        return not self._too_heavy(node_id, min(sparsity + dp, cap), rank)

    def _increments(self, node_id: str, rnd: int, sparsity: float, cap: float) -> tuple[list[float], bool, float]:
        """(the increments allowed this round, smallest first, one per distinct new sparsity; whether the gap to the
        target can no longer be closed; the node's goal min(s*, cap))."""
        rounds_left = max(self.total_rounds - rnd + 1, 1)
        goal = min(self.target, cap)
        # The smallest increment this round that still lets the remaining rounds reach the target.
        need_now = goal - sparsity - self.max_dp * (rounds_left - 1)
        usable = [d for d in self.delta_p if any(self._fits(node_id, sparsity, cap, d, r) for r in self.ranks)]
        dps = [d for d in usable if d >= need_now - EPS]
        forced = not dps and need_now > self.max_dp + EPS
        if not dps:  # the gap cannot be closed (or memory rules the rest out): the largest increment that fits
            dps = [max(usable, default=self.max_dp)]
        distinct: list[float] = []  # near the cap larger increments land on the same sparsity: keep the smallest
        for d in sorted(dps):
            if all(abs(min(sparsity + d, cap) - min(sparsity + k, cap)) > EPS for k in distinct):
                distinct.append(d)
        return distinct, forced, goal

    def _choice(self, dp: float, rank: int, rnd: int, sparsity: float, cap: float, goal: float, forced: bool,
                beyond: bool) -> Choice:
        target = min(sparsity + dp, cap)
        if forced or (rnd >= self.total_rounds and target < goal - EPS):
            target, forced = max(target, goal), True
        arm = (dp, rank)
        return Choice(arm_index=self.arms.index(arm), arm=arm, target_sparsity=float(min(target, cap)), rank=rank,
                      forced=forced, beyond_target=beyond)

    def choose(self, node_id: str, rnd: int, sparsity: float, cap: float, behind: bool | None = None) -> Choice:
        """Pick the configuration of ``node_id`` for round ``rnd`` (1-based) given its current sparsity.

        ``behind``: the node held the fleet back in its last round (None: unknown): its time at τ steps was above
        the fleet's mean and, where steps were aligned, another node waited at the step cap (beyond tolerance).
        """
        b = self._bandits(node_id)
        dps, forced, goal = self._increments(node_id, rnd, sparsity, cap)
        # Below the target every increment is needed anyway, so Δp is explored freely; at or above it an increment
        # is permanent, so Δp comes from the ladder (or is 0 for a node ahead of the fleet), see the module docstring.
        beyond = sparsity >= goal - EPS
        if beyond and len(dps) > 1:
            dps = [dps[0]] if behind is False else [self._ladder(b["post"], dps)]
        if self.factored:
            dp = b["dp"].arms[b["dp"].select([i for i, a in enumerate(b["dp"].arms) if a[0] in dps])][0]
            ok = [i for i, a in enumerate(b["rank"].arms) if self._fits(node_id, sparsity, cap, dp, a[1])]
            rank = b["rank"].arms[b["rank"].select(ok or [0])][1]
        else:
            ok = [i for i, a in enumerate(self.arms)
                  if a[0] in dps and self._fits(node_id, sparsity, cap, *a)]
            ok = ok or [min(range(len(self.arms)), key=lambda i: (-self.arms[i][0], self.arms[i][1]))]
            dp, rank = self.arms[b["joint"].select(ok)]
        return self._choice(dp, rank, rnd, sparsity, cap, goal, forced, beyond)

    def at_most(self, node_id: str, rnd: int, sparsity: float, cap: float, rank: int, ceiling: float) -> Choice:
        """The largest increment allowed this round that keeps the node's sparsity at or below ``ceiling`` (within
        ``grain``: reported sparsities are a little off their targets), or the
        smallest allowed if none does (the target kept reachable, memory permitting), at ``rank`` or the largest
        rank below it that fits: for a node whose further pruning would buy it nothing this round
        (``Strategy.configure_round``: a node waiting at the step cap).  Draws nothing, changes no state."""
        dps, forced, goal = self._increments(node_id, rnd, sparsity, cap)
        under = [d for d in dps if min(sparsity + d, cap) <= ceiling + self.grain]
        dp = max(under) if under else dps[0]
        fitting = [r for r in self.ranks if self._fits(node_id, sparsity, cap, dp, r)]
        if rank not in fitting and fitting:
            rank = max((r for r in fitting if r <= rank), default=min(fitting))
        return self._choice(dp, rank, rnd, sparsity, cap, goal, forced, sparsity >= goal - EPS)

    def update(self, node_id: str, arm_index: int, reward: float, beyond_target: bool = False) -> None:
        """Credit ``reward`` to the arm played; ``beyond_target``: it was chosen at or above the target."""
        dp, rank = self.arms[arm_index]
        b = self._bandits(node_id)
        if beyond_target:
            b["post"].update(self.delta_p.index(dp), reward)
        if self.factored:
            b["dp"].update(self.delta_p.index(dp), reward)
            b["rank"].update(self.ranks.index(rank), reward)
        else:
            b["joint"].update(arm_index, reward)

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
                if k in st:  # checkpoints from before the ladder have no "post" bandit
                    u.load_state_dict(st[k])
        self.oom = {n: [(float(s), int(r)) for s, r in v] for n, v in d.get("oom", {}).items()}
