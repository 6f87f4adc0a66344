"""The S-UCB reward: each term of the spec, its normalisation across the round, and the weighted mean."""

import pytest

from coordinator.config import BanditSettings
from coordinator.reward import RewardInput, rewards


def RewardSettings(**w):  # noqa: N802 - the default weights, with overrides
    return {**BanditSettings().reward, **w}


def _x(node_id, *, loss_end=0.8, ds=0.0, t=10.0, imp=1.0, energy=None, prev=None):
    return RewardInput(node_id=node_id, loss_start=1.0, loss_end=loss_end, delta_sparsity=ds, round_time_s=t,
                       importance=imp, energy_j=energy, samples=100, prev_time_s=prev)


def test_terms_are_normalised_across_the_round():
    out = rewards([_x("a", loss_end=0.5, ds=0.3, imp=2.0), _x("b", loss_end=0.75, ds=0.15, imp=1.0)],
                  RewardSettings(), target_sparsity=0.3)
    a, b = out["a"]["terms"], out["b"]["terms"]
    assert a["loss"] == pytest.approx(1.0) and b["loss"] == pytest.approx(0.5)  # relative to the round's best
    assert a["progress"] == pytest.approx(1.0) and b["progress"] == pytest.approx(0.5)  # Δs / s*
    assert a["importance"] == pytest.approx(1.0) and b["importance"] == pytest.approx(0.5)
    assert a["time"] == pytest.approx(1.0) and b["time"] == pytest.approx(1.0)  # equal times, no history


def test_energy_term_only_when_every_node_reported_it():
    w = RewardSettings(loss=0, progress=0, time=0, importance=0, energy=1)
    out = rewards([_x("a", energy=100.0), _x("b", energy=200.0)], w, 0.3)
    assert out["a"]["terms"]["energy"] == pytest.approx(1.0) and out["b"]["terms"]["energy"] == pytest.approx(0.5)
    assert out["b"]["reward"] == pytest.approx(0.5)
    out = rewards([_x("a", energy=100.0), _x("b")], RewardSettings(), 0.3)
    assert out["a"]["terms"]["energy"] == 0.0  # skipped, and its weight leaves the mean
    w = RewardSettings()
    t = out["a"]["terms"]
    expected = (w["loss"] * t["loss"] + w["progress"] * t["progress"] + w["time"] * t["time"]
                + w["importance"] * t["importance"]) / (w["loss"] + w["progress"] + w["time"] + w["importance"])
    assert out["a"]["reward"] == pytest.approx(expected)


def test_time_term_credits_the_nodes_own_change_not_the_fleets():
    # Round mean 20 s. The slow node went 40 -> 30 (closer to the mean); the fast node 10 -> 8 (further away);
    # the mid node did not change. The other nodes' moves shift the mean, but each node's credit comes from
    # its own move measured against this round's mean.
    out = rewards([_x("slow", t=30.0, prev=40.0), _x("fast", t=8.0, prev=10.0), _x("mid", t=22.0, prev=22.0)],
                  RewardSettings(), 0.3)
    time = {n: out[n]["terms"]["time"] for n in out}
    assert time["slow"] == pytest.approx(1.0)  # the largest gain: 10/20
    assert time["fast"] == pytest.approx(0.5 - 0.5 * (2 / 20) / (10 / 20))
    assert time["mid"] == pytest.approx(0.5)
    assert time["slow"] > time["mid"] > time["fast"]


def test_time_term_without_history_is_alignment():
    out = rewards([_x("a", t=10.0), _x("b", t=30.0)], RewardSettings(), 0.3)
    assert out["a"]["terms"]["time"] == pytest.approx(0.5) and out["b"]["terms"]["time"] == pytest.approx(0.5)


def test_non_finite_and_negative_values_are_clipped():
    out = rewards([_x("a", loss_end=1.5), _x("b", loss_end=0.5)], RewardSettings(), 0.3)
    assert out["a"]["terms"]["loss"] == 0.0  # the loss rose: no credit, not a negative reward
    assert all(0.0 <= v["reward"] <= 1.0 for v in out.values())
