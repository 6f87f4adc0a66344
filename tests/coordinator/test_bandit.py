"""S-UCB: the discounted UCB itself, the sparsity constraints, OOM exclusions, and the spec's synthetic fleet."""

import math
import random
import statistics

import pytest
import torch

from coordinator.bandit import DiscountedUCB, FleetBandit
from coordinator.config import CoordinatorConfig
from coordinator.strategies import NodeInfo, NodeResult, make_strategy
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate


def test_discounted_counts_and_index_follow_the_formula():
    b = DiscountedUCB([(0.0, 1), (0.1, 1)], discount=0.5, exploration=1.0, rng=random.Random(0))
    b.update(0, 1.0)
    b.update(1, 0.0)
    b.update(0, 0.5)
    # N(0) = 0.5^2 + 1 = 1.25, S(0) = 1*0.25 + 0.5 = 0.75; N(1) = 0.5
    assert b.counts == pytest.approx([1.25, 0.5])
    assert b.sums == pytest.approx([0.75, 0.0])
    total = 1.75
    assert b.index(0) == pytest.approx(0.75 / 1.25 + math.sqrt(math.log(total) / 1.25))
    assert b.index(1) == pytest.approx(0.0 + math.sqrt(math.log(total) / 0.5))


def test_untried_arms_first_then_best_mean():
    b = DiscountedUCB([(0.0, r) for r in range(4)], discount=1.0, exploration=0.0, rng=random.Random(1))
    seen = set()
    for _ in range(4):
        a = b.select([0, 1, 2, 3])
        assert a not in seen
        seen.add(a)
        b.update(a, 1.0 if a == 2 else 0.1)
    assert b.select([0, 1, 2, 3]) == 2
    assert b.select([0, 1, 3]) in (0, 1, 3)  # only allowed arms


@pytest.mark.parametrize("factored", [True, False])
def test_target_is_always_reached_and_sparsity_never_exceeds_the_cap(factored):
    fb = FleetBandit((0.0, 0.05, 0.1, 0.15), (2, 4, 8, 16), discount=0.9, exploration=0.5, target_sparsity=0.3,
                     total_rounds=4, seed=3, factored=factored)
    for seed in range(20):
        s = 0.0
        for rnd in range(1, 5):
            c = fb.choose(f"n{seed}", rnd, s, cap=0.4)
            assert c.target_sparsity >= s and c.target_sparsity <= 0.4 + 1e-12
            s = c.target_sparsity
            fb.update(f"n{seed}", c.arm_index, random.Random(seed * 10 + rnd).random())
        assert s >= 0.3 - 1e-9


def test_last_round_forces_the_needed_increment():
    fb = FleetBandit((0.0, 0.05), (4,), discount=0.9, exploration=0.5, target_sparsity=0.3, total_rounds=2, seed=0)
    c = fb.choose("slow", 2, 0.0, cap=0.5)
    assert c.forced and c.target_sparsity == pytest.approx(0.3)


def test_at_most_is_the_largest_increment_under_a_ceiling_that_keeps_the_target_reachable_and_draws_nothing():
    fb = FleetBandit((0.0, 0.05, 0.1, 0.15), (2, 4, 8, 16), discount=0.9, exploration=0.5, target_sparsity=0.3,
                     total_rounds=10, seed=0)
    c = fb.at_most("agx", 1, 0.0, cap=0.5, rank=8, ceiling=0.12)
    assert (c.arm, c.target_sparsity, c.forced) == ((0.1, 8), pytest.approx(0.1), False)
    assert fb.at_most("agx", 1, 0.05, cap=0.5, rank=8, ceiling=0.0).arm == (0.0, 8)  # already above: no increment
    # Reported sparsities are those of the groups really removed: 0.2508 + 0.05 is the slow node's 0.3007.
    assert fb.grain == pytest.approx(0.025)
    assert fb.at_most("agx", 5, 0.2508, cap=0.5, rank=8, ceiling=0.3007).target_sparsity == pytest.approx(0.3008)
    # Round 9 of 10 at 0.05: one more round of at most 0.15 after this one, so 0.10 is needed now, ceiling or not.
    c = fb.at_most("agx", 9, 0.05, cap=0.5, rank=8, ceiling=0.05)
    assert c.arm == (0.1, 8) and c.target_sparsity == pytest.approx(0.15) and not c.forced
    c = fb.at_most("agx", 10, 0.0, cap=0.5, rank=8, ceiling=0.0)  # the gap cannot be closed: forced to the target
    assert c.forced and c.target_sparsity == pytest.approx(0.3)
    fb.out_of_memory("agx", sparsity=0.1, rank=8)
    assert fb.at_most("agx", 1, 0.0, cap=0.5, rank=16, ceiling=0.1).rank == 4  # the largest rank below that fits
    assert "agx" not in fb.bandits  # no draw, no state: a resumed run chooses exactly as an uninterrupted one


def test_out_of_memory_excludes_the_arm_and_every_heavier_one():
    fb = FleetBandit((0.0, 0.1), (4, 8, 16), discount=0.9, exploration=0.5, target_sparsity=0.0, total_rounds=50,
                     seed=0)
    fb.out_of_memory("n", sparsity=0.2, rank=8)
    for _ in range(40):
        c = fb.choose("n", 1, 0.1, cap=0.5)
        # sparsity 0.1 (dp 0) or 0.2 (dp 0.1) are <= 0.2: ranks >= 8 are excluded there
        assert c.rank == 4, c
        fb.update("n", c.arm_index, 0.5)
    fb.out_of_memory("n", sparsity=0.5, rank=1)  # everything excluded: fall back to the lightest arm
    c = fb.choose("n", 1, 0.1, cap=0.5)
    assert c.arm == (0.1, 4)


@pytest.mark.parametrize("factored", [True, False])
def test_beyond_the_target_the_ladder_tries_no_increment_first_and_climbs_only_while_it_pays(factored):
    fb = FleetBandit((0.0, 0.05, 0.1, 0.15), (4,), discount=1.0, exploration=0.5, target_sparsity=0.3,
                     total_rounds=50, seed=0, factored=factored)
    # Below the target an increment got a high reward: that evidence must not carry over beyond it.
    below = fb.choose("n", 1, 0.0, cap=0.6)
    assert not below.beyond_target
    fb.update("n", fb.arms.index((0.15, 4)), 1.0)
    c = fb.choose("n", 2, 0.3, cap=0.6)
    assert c.beyond_target and c.arm[0] == 0.0  # first Δp = 0
    fb.update("n", c.arm_index, 0.5, beyond_target=True)
    c = fb.choose("n", 3, 0.3, cap=0.6)
    assert c.arm[0] == 0.05  # then the smallest step, once
    fb.update("n", c.arm_index, 0.4, beyond_target=True)  # it did not pay
    for rnd in range(4, 10):
        c = fb.choose("n", rnd, 0.35, cap=0.6)
        assert c.arm[0] == 0.0  # no larger step is tried; greedy back to Δp = 0
        fb.update("n", c.arm_index, 0.5, beyond_target=True)


def test_the_ladder_climbs_while_pruning_pays_and_stops_at_the_cap():
    fb = FleetBandit((0.0, 0.05, 0.1), (4,), discount=1.0, exploration=0.5, target_sparsity=0.3,
                     total_rounds=50, seed=0)
    s, picked = 0.3, []
    for rnd in range(1, 8):
        c = fb.choose("slow", rnd, s, cap=0.5, behind=True)
        picked.append(c.arm[0])
        s = c.target_sparsity
        fb.update("slow", c.arm_index, 0.4 + c.arm[0], beyond_target=True)  # more pruning, more reward
    assert picked[:3] == [0.0, 0.05, 0.1]
    assert s == pytest.approx(0.5)
    assert fb.choose("slow", 9, 0.5, cap=0.5, behind=True).target_sparsity == pytest.approx(0.5)


def test_a_node_ahead_of_the_fleet_gets_no_increment_beyond_the_target():
    fb = FleetBandit((0.0, 0.05, 0.1), (4,), discount=1.0, exploration=0.5, target_sparsity=0.3,
                     total_rounds=50, seed=0)
    for rnd in range(1, 10):
        c = fb.choose("fast", rnd, 0.3, cap=0.5, behind=False)
        assert c.arm[0] == 0.0 and c.target_sparsity == pytest.approx(0.3)
        fb.update("fast", c.arm_index, 1.0 if rnd % 2 else 0.0, beyond_target=True)
    assert fb.choose("fast", 1, 0.1, cap=0.5, behind=False).beyond_target is False  # below the target: free


def _update(rank: int, seed: int) -> LoraUpdate:
    g = torch.Generator().manual_seed(seed)
    m = ModuleUpdate(A=torch.randn(rank, 8, generator=g) * 0.1, B=torch.randn(8, rank, generator=g) * 0.1,
                     rows=torch.arange(8), cols=torch.arange(8), shape=(8, 8), scale=16.0 / rank)
    return LoraUpdate({"m": m}, importance={"0.heads": GroupScores(idx=torch.arange(2), score=torch.ones(2), size=2)})


def simulate_fleet(rounds: int = 30, seed: int = 0):
    """The spec's synthetic fleet: fixed speeds; time falls with sparsity and rises with rank."""
    cfg = CoordinatorConfig.from_dict({"coordinator": {"rounds": rounds, "local_steps": 20},
                                       "bandit": {"target_sparsity": 0.3, "max_sparsity": {"default": 0.5}}})
    strat = make_strategy(cfg, total_rounds=rounds, seed=seed)
    speeds = {"fast": 1.0, "mid": 0.5, "slow": 0.2}
    nodes = [NodeInfo(n, "default") for n in speeds]
    rng = random.Random(seed)
    history = []
    for rnd in range(1, rounds + 1):
        results, times = [], {}
        for a in strat.configure_round(rnd, nodes):
            s = a.target_sparsity  # the node prunes, then trains: the round runs at the new sparsity
            t = 10.0 / speeds[a.node_id] * (1 - 0.9 * s) * (1 + 0.02 * a.rank) * rng.uniform(0.97, 1.03)
            gain = 0.1 * (1 + 0.01 * a.rank) * (1 - 0.5 * s) * rng.uniform(0.9, 1.1)
            times[a.node_id] = t
            results.append(NodeResult(node_id=a.node_id, update=_update(a.rank, rnd), samples=320, loss_start=1.0,
                                      loss_end=1.0 - gain, compute_s=t, round_time_s=t, sparsity=s, rank=a.rank,
                                      energy_j=None, upload_bytes=1000))
        strat.aggregate_round(rnd, results, [])
        history.append({a.node_id: (r.sparsity, r.rank, times[r.node_id])
                        for a, r in zip(nodes, results, strict=True)})
    return strat, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_fleet_slow_nodes_get_more_pruning_and_lower_ranks_and_times_align(seed):
    strat, history = simulate_fleet(rounds=30, seed=seed)
    final = history[-1]
    assert all(final[n][0] >= 0.3 - 1e-9 for n in final)  # everyone reached the target
    assert all(b[n][0] >= a[n][0] for a, b in zip(history, history[1:], strict=False) for n in final)  # monotone
    assert final["slow"][0] > final["fast"][0] + 0.1, final  # slow devices are pruned further
    late = history[-10:]
    mean_rank = {n: statistics.mean(h[n][1] for h in late) for n in final}
    assert mean_rank["slow"] + 4 < mean_rank["fast"], mean_rank  # slow devices learn low ranks

    def spread(h):  # coefficient of variation of the round's completion times
        ts = [h[n][2] for n in h]
        return statistics.pstdev(ts) / statistics.mean(ts)

    early = statistics.mean(spread(h) for h in history[:3])
    late_spread = statistics.mean(spread(h) for h in history[-5:])
    assert late_spread < 0.85 * early, (early, late_spread)
