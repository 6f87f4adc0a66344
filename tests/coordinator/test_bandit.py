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


def bandit(delta_p=(0.0, 0.05, 0.1, 0.15), ranks=(2, 4, 8, 16), rounds=10, target=0.3, seed=0, exploration=0.5):
    return FleetBandit(delta_p, ranks, discount=0.9, exploration=exploration, target_sparsity=target,
                       total_rounds=rounds, seed=seed)


def test_discounted_counts_and_index_follow_the_formula():
    b = DiscountedUCB([0.0, 0.1], discount=0.5, exploration=1.0, rng=random.Random(0))
    b.update(0, 1.0)
    b.update(1, 0.0)
    b.update(0, 0.5)
    # N(0) = 0.5^2 + 1 = 1.25, S(0) = 1*0.25 + 0.5 = 0.75; N(1) = 0.5
    assert b.counts == pytest.approx([1.25, 0.5])
    assert b.sums == pytest.approx([0.75, 0.0])
    total = 1.75
    assert b.index(0) == pytest.approx(0.75 / 1.25 + math.sqrt(math.log(total) / 1.25))
    assert b.index(1) == pytest.approx(0.0 + math.sqrt(math.log(total) / 0.5))
    with pytest.raises(ValueError, match="finite"):
        b.update(0, float("nan"))


def test_untried_arms_first_then_best_mean():
    b = DiscountedUCB(list(range(4)), discount=1.0, exploration=0.0, rng=random.Random(1))
    seen = set()
    for _ in range(4):
        a = b.select([0, 1, 2, 3])
        assert a not in seen
        seen.add(a)
        b.update(a, 1.0 if a == 2 else 0.1)
    assert b.select([0, 1, 2, 3]) == 2
    assert b.select([0, 1, 3]) in (0, 1, 3)  # only allowed arms


def test_target_is_always_reached_and_sparsity_never_exceeds_the_cap():
    fb = bandit(rounds=4, seed=3)
    for seed in range(20):
        s = 0.0
        for rnd in range(1, 5):
            c = fb.choose(f"n{seed}", rnd, s, cap=0.4)
            assert s <= c.target_sparsity <= 0.4 + 1e-12
            s = c.target_sparsity
            fb.update(f"n{seed}", c.arm, random.Random(seed * 10 + rnd).random())
        assert s >= 0.3 - 1e-9
    assert fb.goal(cap=0.2) == 0.2  # a tier capped below s* ends at its cap


def test_last_round_forces_the_needed_increment():
    c = bandit(delta_p=(0.0, 0.05), ranks=(4,), rounds=2).choose("slow", 2, 0.0, cap=0.5)
    assert c.forced and c.target_sparsity == pytest.approx(0.3)


def test_allowed_increments_restrict_the_choice_but_never_the_target():
    fb = bandit(rounds=10)
    for rnd in range(1, 9):
        c = fb.choose("n", rnd, 0.3, cap=0.5, allowed=[0.0, 0.05])
        assert c.arm[0] in (0.0, 0.05)
        fb.update("n", c.arm, 0.5)
    assert fb.choose("m", 1, 0.3, cap=0.5, allowed=[0.0]).target_sparsity == pytest.approx(0.3)
    # below the target with no round to spare, the increment needed comes whatever is allowed
    c = fb.choose("late", 10, 0.2, cap=0.5, allowed=[0.0])
    assert c.target_sparsity == pytest.approx(0.3) and c.forced


def test_out_of_memory_excludes_the_configuration_and_every_heavier_one():
    fb = bandit(delta_p=(0.0, 0.1), ranks=(4, 8, 16), rounds=50, target=0.0)
    fb.out_of_memory("n", sparsity=0.2, rank=8)
    for _ in range(40):
        c = fb.choose("n", 1, 0.1, cap=0.5)
        assert c.rank == 4, c  # sparsity 0.1 (Δp 0) or 0.2 (Δp 0.1) are <= 0.2: ranks >= 8 are excluded there
        fb.update("n", c.arm, 0.5)
    fb.out_of_memory("n", sparsity=0.5, rank=1)  # everything excluded: the lightest configuration
    assert fb.choose("n", 1, 0.1, cap=0.5).arm[1] == 4


def test_a_resumed_bandit_chooses_what_an_uninterrupted_one_does():
    a, b = bandit(seed=7), bandit(seed=7)
    for rnd in range(1, 4):
        c = a.choose("n", rnd, 0.0, cap=0.5)
        a.update("n", c.arm, rnd / 4)
    b.load_state_dict(a.state_dict())
    assert [a.choose("n", 4, 0.1, cap=0.5) for _ in range(3)] == [b.choose("n", 4, 0.1, cap=0.5) for _ in range(3)]


def _update(rank: int, seed: int) -> LoraUpdate:
    """A random update whose size does not depend on its rank (as LoRA's alpha / r scaling intends)."""
    g = torch.Generator().manual_seed(seed)
    f = 0.1 * (rank / 16) ** 0.25
    m = ModuleUpdate(A=torch.randn(rank, 8, generator=g) * f, B=torch.randn(8, rank, generator=g) * f,
                     rows=torch.arange(8), cols=torch.arange(8), shape=(8, 8), scale=16.0 / rank)
    return LoraUpdate({"m": m}, importance={"0.heads": GroupScores(idx=torch.arange(2), score=torch.ones(2), size=2)})


def simulate_fleet(rounds: int = 30, seed: int = 0):
    """The spec's synthetic fleet: fixed speeds; step time falls with sparsity, upload time rises with rank, and
    pruning or a low rank costs some of each round's loss reduction."""
    cfg = CoordinatorConfig.from_dict({"coordinator": {"method": "fedspine", "rounds": rounds, "local_steps": 20},
                                       "pruning": {"target_sparsity": 0.3, "max_sparsity": {"default": 0.5}}})
    strat = make_strategy(cfg, total_rounds=rounds, seed=seed)
    speeds = {"fast": 1.0, "mid": 0.5, "slow": 0.2}
    nodes = [NodeInfo(n, "default") for n in speeds]
    rng = random.Random(seed)
    history = []
    for rnd in range(1, rounds + 1):
        results, times = [], {}
        for a in strat.configure_round(rnd, nodes):
            s, steps = a.target_sparsity, a.local_steps
            jitter = rng.uniform(0.97, 1.03)
            per_step = 0.5 / speeds[a.node_id] * (1 - 0.92 * s) * jitter
            upload = 0.4 / speeds[a.node_id] * a.rank * jitter
            gain = 0.1 * (1 + 0.02 * a.rank) * (1 - 0.5 * s) * rng.uniform(0.9, 1.1)  # capacity: rank, sparsity
            t = 1.0 + steps * per_step + upload
            times[a.node_id] = 1.0 + 20 * per_step + upload  # at τ steps: what alignment evens out
            results.append(NodeResult(node_id=a.node_id, update=_update(a.rank, rnd), samples=16 * steps,
                                      loss_start=1.0, loss_end=1.0 - gain, compute_s=t, round_time_s=t, sparsity=s,
                                      rank=a.rank, energy_j=None, upload_bytes=1000, steps=steps, examples=300,
                                      train_s=steps * per_step, upload_s=upload))
        strat.aggregate_round(rnd, results, [])
        history.append({a.node_id: (r.sparsity, r.rank, times[r.node_id], r.round_time_s)
                        for a, r in zip(nodes, results, strict=True)})
    return strat, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_fleet_slow_nodes_get_more_pruning_and_lower_ranks_and_times_align(seed):
    strat, history = simulate_fleet(rounds=30, seed=seed)
    final = history[-1]
    assert all(0.3 - 1e-9 <= final[n][0] <= 0.5 + 1e-9 for n in final)  # at or above s*, within s_max
    assert all(b[n][0] >= a[n][0] for a, b in zip(history, history[1:], strict=False) for n in final)  # monotone
    assert final["slow"][0] > final["fast"][0] + 0.1, final  # the slow device is pruned further
    late = history[-10:]
    mean_rank = {n: statistics.mean(h[n][1] for h in late) for n in final}
    assert mean_rank["slow"] + 4 < mean_rank["fast"], mean_rank  # and learns a low rank (its upload holds the round)

    def spread(h, k):  # coefficient of variation of the round's completion times
        ts = [h[n][k] for n in h]
        return statistics.pstdev(ts) / statistics.mean(ts)

    # At τ steps the completion times draw together (pruning and rank); with aligned steps the rounds end together.
    assert statistics.mean(spread(h, 2) for h in history[-5:]) < 0.85 * statistics.mean(spread(h, 2) for h in history[:3])
    assert statistics.mean(spread(h, 3) for h in history[-5:]) < 0.1
