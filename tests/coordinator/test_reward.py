"""The S-UCB reward: each term, its normalisation, the weighted mean, and FedSpine's time term (the round share)."""

import pytest
import torch

from coordinator.config import BanditSettings, CoordinatorConfig
from coordinator.reward import RewardInput, RoundStats, merge_stats, rewards
from coordinator.strategies import Assignment, NodeResult, make_strategy
from shared.updates import LoraUpdate, ModuleUpdate

WEIGHTS = BanditSettings().reward


def _x(node_id, *, loss_end=0.8, share=1.0, imp=1.0, energy=None):
    return RewardInput(node_id=node_id, loss_start=1.0, loss_end=loss_end, round_share=share, importance=imp,
                       energy_j=energy, samples=100)


def test_terms_are_normalised_across_the_round():
    out = rewards([_x("a", loss_end=0.5, imp=2.0, share=0.6), _x("b", loss_end=0.75, imp=1.0)], WEIGHTS)
    a, b = out["a"]["terms"], out["b"]["terms"]
    assert a["loss"] == pytest.approx(1.0) and b["loss"] == pytest.approx(0.5)  # relative to the round's best
    assert a["importance"] == pytest.approx(1.0) and b["importance"] == pytest.approx(0.5)
    assert a["time"] == pytest.approx(0.6) and b["time"] == pytest.approx(1.0)  # the share, as it is


def test_energy_term_only_when_every_node_reported_it():
    w = {"energy": 1.0}
    out = rewards([_x("a", energy=100.0), _x("b", energy=200.0)], w)
    assert out["a"]["terms"]["energy"] == pytest.approx(1.0) and out["b"]["terms"]["energy"] == pytest.approx(0.5)
    assert out["b"]["reward"] == pytest.approx(0.5)
    out = rewards([_x("a", energy=100.0), _x("b")], WEIGHTS)
    assert out["a"]["terms"]["energy"] == 0.0  # skipped, and its weight leaves the mean
    t = out["a"]["terms"]
    expected = sum(WEIGHTS[k] * t[k] for k in ("loss", "time", "importance")) / sum(
        WEIGHTS[k] for k in ("loss", "time", "importance"))
    assert out["a"]["reward"] == pytest.approx(expected)


def test_non_finite_and_negative_values_are_clipped():
    out = rewards([_x("a", loss_end=1.5), _x("b", loss_end=0.5, share=float("nan"))], WEIGHTS)
    assert out["a"]["terms"]["loss"] == 0.0  # the loss rose: no credit, not a negative reward
    assert out["b"]["terms"]["time"] == 0.0
    assert all(0.0 <= v["reward"] <= 1.0 for v in out.values())


def _result(node_id: str, sparsity: float, rank: int, per_step: float, upload_s: float = 0.0) -> NodeResult:
    m = ModuleUpdate(A=torch.ones(rank, 4) * 0.1, B=torch.ones(8, rank) * 0.1, rows=torch.arange(8),
                     cols=torch.arange(4), shape=(8, 4), scale=16.0 / rank)
    return NodeResult(node_id=node_id, update=LoraUpdate({"m": m}), samples=80, loss_start=1.0, loss_end=0.8,
                      compute_s=1.0, round_time_s=1.0 + 5 * per_step + upload_s, sparsity=sparsity, rank=rank,
                      energy_j=None, upload_bytes=100, steps=5, examples=100, train_s=5 * per_step, upload_s=upload_s)


def test_the_time_term_is_the_share_of_the_fastest_round_the_node_could_have_given():
    """Only the node that holds the round back scores below 1, by how far its configuration is from the fastest it
    could have chosen (its tier's cap, its smallest rank)."""
    cfg = CoordinatorConfig.from_dict({"coordinator": {"method": "fedspine", "local_steps": 5},
                                       "pruning": {"max_sparsity": {"default": 0.5}}, "bandit": {"ranks": [2, 8]}})
    strat = make_strategy(cfg, total_rounds=5)
    results = [_result("fast", 0.3, 8, 0.2), _result("slow", 0.3, 8, 2.0, upload_s=0.8)]
    for r in results:
        strat._pending[r.node_id] = (Assignment(r.node_id, r.sparsity, r.rank, 5), 0.0)
    strat.aggregate_round(1, results, [])
    shares = strat.round_shares(results)
    assert shares["fast"] == 1.0
    speed = strat.state("slow").speed  # (1.0 s, 2.0 / (1 - 0.92·0.3) s per step at cost 1, 0.1 s per rank)
    now = 1.0 + 0.8 + 5 * 2.0
    fastest = 1.0 + 0.1 * 2 + 5 * speed[1] * (1 - 0.92 * 0.5)
    assert shares["slow"] == pytest.approx(fastest / now)


def _fleet_inputs() -> list[RewardInput]:
    return [_x("a", loss_end=0.5, imp=2.0, energy=300.0), _x("b", loss_end=1.2, imp=0.5, energy=100.0),
            _x("c", loss_end=0.75, imp=3.0, energy=250.0), _x("d", loss_end=0.9, imp=1.0, energy=400.0),
            _x("e", loss_end=0.6, imp=0.1, energy=120.0)]


TIMES = {"a": 3.0, "b": 9.0, "c": 9.0, "d": 1.0, "e": 12.0}


def test_round_statistics_merge_across_any_grouping_of_sub_fleets_to_the_flat_rounds():
    """The regions' statistics, merged in any order and grouping, are the whole round's: the same maxima, minima and
    two slowest (ties by node id), so each node's reward against the merge is its flat reward exactly."""
    inputs = _fleet_inputs()
    flat = RoundStats.of(inputs, TIMES)
    assert (flat.best_loss, flat.best_importance, flat.lowest_energy) == (0.5, 3.0, 1.0)
    assert flat.slowest == (("e", 12.0), ("b", 9.0))

    def part(ids):
        return RoundStats.of([x for x in inputs if x.node_id in ids], {n: TIMES[n] for n in ids})

    a, b, c = part("ab"), part("cd"), part("e")
    assert a.merge(b).merge(c) == a.merge(b.merge(c)) == c.merge(a).merge(b) == merge_stats([b, c, a]) == flat
    assert merge_stats([]) is None
    for groups in (("ab", "cde"), ("a", "b", "c", "d", "e"), ("ace", "bd")):
        fleet = merge_stats([part(g) for g in groups])
        got = {}
        for g in groups:
            got.update(rewards([x for x in inputs if x.node_id in g], WEIGHTS, fleet))
        assert got == rewards(inputs, WEIGHTS), groups  # exactly, not approximately
    # A sub-fleet where one node reported no energy leaves the energy term out of every node's reward.
    no_energy = RoundStats.of([_x("f", energy=None)], {"f": 1.0})
    assert flat.merge(no_energy).lowest_energy is None and no_energy.merge(flat).lowest_energy is None
    # A round whose best loss reduction is negative: every loss term is 0, flat or merged.
    worse = [_x("g", loss_end=1.5), _x("h", loss_end=1.2)]
    assert RoundStats.of(worse).best_loss == 0.0
    assert rewards(worse[:1], WEIGHTS, RoundStats.of(worse))["g"] == rewards(worse, WEIGHTS)["g"]


def test_a_regions_shares_against_the_fleets_two_slowest_are_the_flat_shares():
    """FedSpine's time term needs the slowest other node's time: a region holding only some of the nodes gets the
    flat shares from the fleet's two slowest."""
    cfg = CoordinatorConfig.from_dict({"coordinator": {"method": "fedspine", "local_steps": 5},
                                       "pruning": {"max_sparsity": {"default": 0.5}}, "bandit": {"ranks": [2, 8]}})
    strat = make_strategy(cfg, total_rounds=5)
    results = [_result("fast", 0.3, 8, 0.2), _result("mid", 0.3, 8, 1.0), _result("slow", 0.3, 8, 2.0, upload_s=0.8)]
    for r in results:
        strat._pending[r.node_id] = (Assignment(r.node_id, r.sparsity, r.rank, 5), 0.0)
    strat.aggregate_round(1, results, [])
    flat = strat.round_shares(results)
    fleet = merge_stats([strat.round_stats(results[:1]), strat.round_stats(results[1:])])
    assert fleet.slowest == strat.round_stats(results).slowest
    assert strat.round_shares(results[2:], fleet.slowest) == {"slow": flat["slow"]} and flat["slow"] < 1.0
    assert strat.round_shares(results[:2], fleet.slowest) == {"fast": flat["fast"], "mid": flat["mid"]}
    # Not vacuous: alone, "mid" would seem to hold its round back; in the fleet "slow" does, so it scores 1.
    assert strat.round_shares(results[1:2])["mid"] < flat["mid"] == 1.0


def test_the_importance_term_is_the_frobenius_norm_of_each_modules_delta():
    """``LoraUpdate.norm`` from the factors' Gram matrices equals ‖scale·B·A‖_F summed over modules (pruned shapes,
    ranks 1-16, negative and tiny scales), and ``NodeResult.update_norm`` is that value."""
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        mods = {}
        for i in range(3):
            r = int(torch.randint(1, 17, (1,), generator=g))
            rows, cols = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
            scale = float(torch.randn(1, generator=g)) * (1e-3 if trial % 5 == 0 else 4.0)
            mods[f"m{i}"] = ModuleUpdate(A=torch.randn(r, cols, generator=g), B=torch.randn(rows, r, generator=g),
                                         rows=torch.arange(rows), cols=torch.arange(cols), shape=(80, 80), scale=scale)
        u = LoraUpdate(modules=mods, dense={}, importance={})
        expect = sum(torch.linalg.matrix_norm(abs(m.scale) * (m.B.double() @ m.A.double())).item()
                     for m in mods.values())
        assert u.norm() == pytest.approx(expect, rel=1e-9)
        res = NodeResult(node_id="n", update=u, samples=1, loss_start=1.0, loss_end=0.5, compute_s=1.0,
                         round_time_s=1.0, sparsity=0.0, rank=1, energy_j=None, upload_bytes=1)
        assert res.update_norm == pytest.approx(expect, rel=1e-9)
    zero = ModuleUpdate(A=torch.zeros(2, 5), B=torch.randn(4, 2), rows=torch.arange(4), cols=torch.arange(5),
                        shape=(4, 5), scale=1.0)
    assert zero.norm() == 0.0
