"""Strategies: schedules of every method, checks at the boundary, OOM handling and checkpoint/resume."""

import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.state import CheckpointStore
from coordinator.strategy import (
    Assignment,
    Failure,
    NodeInfo,
    NodeResult,
    Strategy,
    aligned_steps,
    idle_fraction,
    make_strategy,
    node_weights,
    step_cost_ratio,
)
from shared.config import ConfigError
from shared.updates import LoraUpdate, ModuleUpdate, UpdateError

NODES = [NodeInfo("agx-1", "agx"), NodeInfo("nx-2", "nx"), NodeInfo("tx2-3", "tx2")]


def cfg(method="fedspine", rounds=10, coordinator=None, **bandit):
    return CoordinatorConfig.from_dict({"coordinator": {"method": method, "rounds": rounds, "local_steps": 5,
                                                        **(coordinator or {})},
                                        "bandit": {"target_sparsity": 0.3, **bandit}})


FLAT = {"step_cost_sparsity": 0.0, "step_cost_rank": 0.0}  # no step-cost model: a node keeps its last speed


def result(a: Assignment, rnd: int, t: float = 1.0, rows=None) -> NodeResult:
    g = torch.Generator().manual_seed(rnd * 7 + len(a.node_id))
    rows = torch.arange(8) if rows is None else rows
    m = ModuleUpdate(A=torch.randn(a.rank, 4, generator=g) * 0.1, B=torch.randn(len(rows), a.rank, generator=g) * 0.1,
                     rows=rows, cols=torch.arange(4), shape=(8, 4), scale=16.0 / a.rank)
    return NodeResult(node_id=a.node_id, update=LoraUpdate({"m": m}, {"head": torch.ones(2) * rnd}), samples=40,
                      loss_start=1.0, loss_end=0.8, compute_s=t, round_time_s=t, sparsity=a.target_sparsity,
                      rank=a.rank, energy_j=None, upload_bytes=100)


def run(strat, rounds, start=1):
    seen = []
    for rnd in range(start, rounds + 1):
        assigns = strat.configure_round(rnd, NODES)
        seen.append({a.node_id: (round(a.target_sparsity, 6), a.rank) for a in assigns})
        strat.aggregate_round(rnd, [result(a, rnd, t=1.0 + i) for i, a in enumerate(assigns)], [])
    return seen


@pytest.mark.parametrize("method,check", [
    ("fedlora", lambda s: all(v == (0.0, 8) for r in s for v in r.values())),
    ("hetlora", lambda s: all(r == {"agx-1": (0.0, 16), "nx-2": (0.0, 8), "tx2-3": (0.0, 4)} for r in s)),
    ("prune_ft", lambda s: all(v == (0.3, 8) for r in s for v in r.values())),
    ("ft_prune", lambda s: all(v[0] == 0.0 for r in s[:8] for v in r.values())
                           and all(v[0] == 0.3 for r in s[8:] for v in r.values())),
    ("uniform", lambda s: len({v for v in s[2].values()}) == 1 and s[6]["agx-1"][0] == pytest.approx(0.3)
                          and s[2]["agx-1"][0] < s[5]["agx-1"][0]),
])
def test_baseline_schedules(method, check):
    seen = run(make_strategy(cfg(method), total_rounds=10), 10)
    assert check(seen), seen


def test_fedspine_every_node_reaches_target_and_sparsity_is_monotone():
    seen = run(make_strategy(cfg("fedspine", rounds=6), total_rounds=6), 6)
    for n in ("agx-1", "nx-2", "tx2-3"):
        seq = [r[n][0] for r in seen]
        assert seq == sorted(seq) and seq[-1] >= 0.3 - 1e-9


def test_boundary_checks_rank_and_monotone_structure():
    strat = make_strategy(cfg("fedlora"), total_rounds=3)
    a = strat.configure_round(1, NODES)[0]
    strat.aggregate_round(1, [result(a, 1, rows=torch.arange(6))], [])
    a2 = strat.configure_round(2, NODES)[0]
    with pytest.raises(UpdateError, match="rank"):
        strat.check_update(a2.node_id, result(Assignment(a2.node_id, 0.0, 4, 5), 2).update, a2)
    with pytest.raises(UpdateError, match="monotone"):
        strat.check_update(a2.node_id, result(a2, 2, rows=torch.arange(8)).update, a2)
    strat.check_update(a2.node_id, result(a2, 2, rows=torch.arange(5)).update, a2)


def test_oom_failure_excludes_heavier_configurations():
    strat = make_strategy(cfg("fedspine", rounds=40), total_rounds=40)
    a = {x.node_id: x for x in strat.configure_round(1, NODES)}["tx2-3"]
    strat.aggregate_round(1, [], [Failure("tx2-3", "oom")])
    for rnd in range(2, 15):
        b = {x.node_id: x for x in strat.configure_round(rnd, NODES)}["tx2-3"]
        assert not (b.target_sparsity <= a.target_sparsity + 1e-9 and b.rank >= a.rank), (a, b)
        strat.aggregate_round(rnd, [result(b, rnd)], [])


def test_idle_fraction():
    assert idle_fraction([10.0, 5.0]) == pytest.approx(0.25)
    assert idle_fraction([3.0, 3.0, 3.0]) == 0.0


@pytest.mark.parametrize("method", ["fedspine", "hetlora"])
def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, method):
    full = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    seen_full = run(full, 8)
    first = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    seen_a = run(first, 4)
    store = CheckpointStore(tmp_path)
    store.save({"round": 4, "run_id": "x", "strategy": first.state_dict()})
    resumed = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    resumed.load_state_dict(store.load()["strategy"])
    seen_b = run(resumed, 8, start=5)
    assert seen_a + seen_b == seen_full
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa["bandit"] == sb["bandit"] and sa["nodes"] == sb["nodes"]
    assert sa["tensors"].keys() == sb["tensors"].keys()
    assert all(torch.equal(sa["tensors"][k], sb["tensors"][k]) for k in sa["tensors"])


def test_checkpoint_is_atomic_and_replaces_old_tensor_files(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load() is None
    for rnd in (1, 2):
        store.save({"round": rnd, "strategy": {"tensors": {"t": torch.full((2,), float(rnd))}}})
    st = store.load()
    assert st["round"] == 2 and torch.equal(st["strategy"]["tensors"]["t"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "global-000002.safetensors"]


def test_final_sync_rank_is_the_largest_rank_the_method_trains_with():
    ranks = {}
    for method in ("fedspine", "hetlora", "fedlora", "prune_ft"):
        cfg = CoordinatorConfig.from_dict({"coordinator": {"method": method, "rounds": 2},
                                           "bandit": {"ranks": [2, 4, 32], "static_rank": 8,
                                                      "tier_ranks": {"agx": 12, "tx2": 4, "default": 6}}})
        ranks[method] = make_strategy(cfg, total_rounds=2).final_rank()
    assert ranks == {"fedspine": 32, "hetlora": 12, "fedlora": 8, "prune_ft": 8}


def test_nodes_are_sent_the_deployed_rank_and_start_from_their_own_rank():
    """``eval_at_deploy_rank``: the download is the slice at the final (deployed) rank; the node's start, which the
    aggregation subtracts, is its first ``rank`` components.  Off: both are the slice at the training rank."""
    for method, on in (("fedspine", True), ("hetlora", True), ("fedspine", False), ("fedlora", True)):
        strat = make_strategy(cfg(method, coordinator={"eval_at_deploy_rank": on}), total_rounds=10)
        run(strat, 2)
        final = strat.final_rank()
        for a in strat.configure_round(3, NODES):
            sent, start = strat.download_slice(a.node_id, a.rank), strat.global_slice(a.node_id, a.rank)
            assert sent.rank == (max(a.rank, final) if on else a.rank), (method, on, a)
            assert start.rank == a.rank
            assert torch.equal(start.modules["m"].A, sent.modules["m"].A[: a.rank])
    assert cfg().coordinator.eval_at_deploy_rank is True


def test_aligned_steps_fill_the_wait_for_the_slowest_node_within_bounds():
    timing = {"fast": (1.0, 1.0), "mid": (2.0, 2.5), "slow": (5.0, 5.0)}  # (fixed s, s per step)
    got = aligned_steps(timing, tau=20, most=100)
    assert got == {"fast": 100, "mid": 41, "slow": 20}  # slow at τ finishes at 105 s; mid: 2 + 41·2.5 = 104.5
    assert aligned_steps(timing, tau=20, most=60)["fast"] == 60  # capped
    assert aligned_steps(timing, tau=20, most=20) == {"fast": 20, "mid": 20, "slow": 20}  # off
    assert aligned_steps({"a": (9.0, 1.0), "b": (0.0, 1.0)}, tau=5, most=50) == {"a": 5, "b": 14}  # fixed cost counts


def _timed(a: Assignment, rnd: int, per_step: float, fixed: float = 2.0) -> NodeResult:
    r = result(a, rnd)
    return NodeResult(**{**r.__dict__, "steps": a.local_steps, "train_s": per_step * a.local_steps,
                         "round_time_s": fixed + per_step * a.local_steps, "examples": 100})


@pytest.mark.parametrize("method", ["fedspine", "fedlora"])
def test_fast_nodes_run_more_steps_only_where_steps_are_aligned(method):
    strat = make_strategy(cfg(method, coordinator=FLAT), total_rounds=10)
    per_step = {"agx-1": 0.2, "nx-2": 0.4, "tx2-3": 1.0}
    first = strat.configure_round(1, NODES)
    assert all(a.local_steps == 5 for a in first)  # no timing yet: τ for everyone
    summary = strat.aggregate_round(1, [_timed(a, 1, per_step[a.node_id]) for a in first], [])
    assert summary.idle_fraction > 0.3
    assigned = strat.configure_round(2, NODES)
    second = {a.node_id: a.local_steps for a in assigned}
    if method == "fedlora":
        assert second == {"agx-1": 5, "nx-2": 5, "tx2-3": 5}
        assert all(a.finish_s is None and a.allows(5) and not a.allows(6) for a in assigned)  # exactly τ, unpaced
        return
    assert second == {"agx-1": 25, "nx-2": 12, "tx2-3": 5}  # 25 = min(5τ, (2 + 5·1.0 - 2) / 0.2)
    # Paced: every node stops near the round's planned finish, the TX2's at τ steps, within [⌈τ/2⌉, 5τ]: the
    # slowest node too may stop short of τ if it runs slower than planned (pace_min_fraction 0.5).
    assert [a.finish_s for a in assigned] == [pytest.approx(2.0 + 5 * 1.0)] * 3
    assert all(a.allows(3) and a.allows(25) and not a.allows(2) and not a.allows(26) for a in assigned)
    at_tau = make_strategy(cfg(method, coordinator={**FLAT, "pace_min_fraction": 1.0}), total_rounds=10)
    at_tau.aggregate_round(1, [_timed(a, 1, per_step[a.node_id]) for a in at_tau.configure_round(1, NODES)], [])
    assert all(a.min_steps == 5 and not a.allows(4) for a in at_tau.configure_round(2, NODES))
    unpaced = make_strategy(cfg(method, coordinator={**FLAT, "pace_steps": False}), total_rounds=10)
    unpaced.aggregate_round(1, [_timed(a, 1, per_step[a.node_id]) for a in unpaced.configure_round(1, NODES)], [])
    assert all(a.finish_s is None and a.planned_s is not None for a in unpaced.configure_round(2, NODES))
    results = [_timed(a, 2, per_step[a.node_id]) for a in strat.configure_round(2, NODES)]
    summary = strat.aggregate_round(2, results, [])
    assert summary.idle_fraction < 0.05
    # The bandit sees each node's time at τ steps, not its aligned completion time.
    assert strat.nodes["agx-1"].last_time_s == pytest.approx(2.0 + 5 * 0.2)
    # The AGX ran at the cap (25), but the round idled under 10 %: nobody held the fleet back.
    assert strat.nodes["agx-1"].behind is False and strat.nodes["tx2-3"].behind is False
    restored = make_strategy(cfg(method, coordinator=FLAT), total_rounds=10)
    restored.load_state_dict(strat.state_dict())  # the timing survives a restart
    assert {a.node_id: a.local_steps for a in restored.configure_round(3, NODES)} == \
        {a.node_id: a.local_steps for a in strat.configure_round(3, NODES)}


def test_a_paced_node_that_ran_to_the_step_cap_counts_as_waiting_there():
    strat = make_strategy(cfg("fedspine", coordinator=FLAT), total_rounds=10)
    per_step = {"agx-1": 0.5, "nx-2": 0.4, "tx2-3": 1.0}
    strat.aggregate_round(1, [_timed(a, 1, per_step[a.node_id]) for a in strat.configure_round(1, NODES)], [])
    second = strat.configure_round(2, NODES)
    assert [a.local_steps for a in second] == [10, 12, 5]  # the AGX is planned below the cap (25)
    # This round the TX2 ran at half its speed; the AGX, faster than planned, reached the cap and waited.
    ran = {"agx-1": (25, 0.1), "nx-2": (12, 0.4), "tx2-3": (5, 2.0)}
    results = [NodeResult(**{**r.__dict__, "steps": ran[r.node_id][0], "train_s": ran[r.node_id][0] * ran[r.node_id][1],
                             "round_time_s": 2.0 + ran[r.node_id][0] * ran[r.node_id][1]})
               for r in (_timed(a, 2, per_step[a.node_id]) for a in second)]
    assert strat.aggregate_round(2, results, []).idle_fraction > 0.10
    assert strat.nodes["tx2-3"].behind is True  # held back a node that waited at the cap


@pytest.mark.parametrize(("agx_step", "tolerance", "tx2_behind"), [
    (0.5, 0.10, False),  # the AGX fills the round below the cap: nobody waits for the TX2
    (0.1, 0.10, True),  # the AGX is held at the cap (25 steps) and waits: the round idles 13 %
    (0.1, 0.20, False),  # the same round, within a 20 % tolerance
    (0.1, 0.0, True),
])
def test_with_aligned_steps_a_slow_node_holds_the_fleet_back_only_while_another_waits_at_the_step_cap(
        agx_step, tolerance, tx2_behind):
    strat = make_strategy(cfg("fedspine", coordinator={**FLAT, "idle_tolerance": tolerance}), total_rounds=10)
    per_step = {"agx-1": agx_step, "nx-2": 0.4, "tx2-3": 1.0}
    first = strat.configure_round(1, NODES)
    strat.aggregate_round(1, [_timed(a, 1, per_step[a.node_id]) for a in first], [])
    # Round 1 was not aligned (no timing yet): the slowest node at τ steps held the others back.
    assert strat.nodes["tx2-3"].behind is True and strat.nodes["agx-1"].behind is False
    second = strat.configure_round(2, NODES)
    assert {a.node_id: a.local_steps for a in second} == {"agx-1": 10 if agx_step == 0.5 else 25, "nx-2": 12,
                                                          "tx2-3": 5}
    summary = strat.aggregate_round(2, [_timed(a, 2, per_step[a.node_id]) for a in second], [])
    assert (summary.idle_fraction > 0.1) == (agx_step == 0.1)
    assert strat.nodes["tx2-3"].last_time_s > strat.nodes["agx-1"].last_time_s  # slowest at τ steps either way
    assert strat.nodes["tx2-3"].behind is tx2_behind
    assert strat.nodes["agx-1"].behind is False and strat.nodes["nx-2"].behind is False


def _at(node_id: str, rnd: int, sparsity: float, per_step: float, steps: int = 5) -> NodeResult:
    """A result of ``node_id`` at ``sparsity`` that ran ``steps`` local steps of ``per_step`` seconds (2 s fixed)."""
    r = result(Assignment(node_id=node_id, target_sparsity=sparsity, rank=8, local_steps=steps), rnd)
    return NodeResult(**{**r.__dict__, "steps": steps, "train_s": per_step * steps,
                         "round_time_s": 2.0 + per_step * steps, "examples": 100})


def test_modelled_time_is_the_step_cost_model_over_the_median_speed():
    model = {"step_cost_sparsity": 0.5, "step_cost_rank": 0.0}
    strat = make_strategy(cfg("fedlora", coordinator=model), total_rounds=10)
    assert strat.modelled_time_s("agx-1", (0.0, 8)) is None  # no timing yet
    # Unit speeds (per step at step cost 1): 1.0, 3.0 (a slow reading), 1.2 at sparsity 0.2 (cost 0.9, 1.08 s).
    for rnd, (sparsity, per_step) in enumerate([(0.0, 1.0), (0.0, 3.0), (0.2, 1.08)], start=1):
        strat.aggregate_round(rnd, [_at("agx-1", rnd, sparsity, per_step)], [])
    assert strat.modelled_time_s("agx-1", (0.2, 8)) == pytest.approx(2.0 + 5 * 1.2 * 0.9)
    assert strat.modelled_time_s("agx-1", (0.4, 8)) == pytest.approx(2.0 + 5 * 1.2 * 0.8)
    assert strat.nodes["agx-1"].last_time_s == pytest.approx(2.0 + 5 * 1.2 * 0.9)  # what the reward used
    restored = make_strategy(cfg("fedlora", coordinator=model), total_rounds=10)
    restored.load_state_dict(strat.state_dict())  # the speeds survive a restart
    assert restored.modelled_time_s("agx-1", (0.4, 8)) == pytest.approx(strat.modelled_time_s("agx-1", (0.4, 8)))


@pytest.mark.parametrize("from_model", [True, False])
def test_the_time_term_credits_a_node_with_what_its_choice_changed_not_with_one_noisy_reading(from_model):
    model = {"step_cost_sparsity": 0.5, "step_cost_rank": 0.0, "time_from_model": from_model}
    strat = make_strategy(cfg("fedlora", coordinator=model), total_rounds=10)
    strat.aggregate_round(1, [_at("agx-1", 1, 0.0, 0.2), _at("tx2-3", 1, 0.0, 1.0)], [])
    # Round 2: the AGX keeps its configuration but one reading runs slow (0.4 s a step, noise); the TX2 prunes to
    # 0.2, which makes it faster (cost 0.9) and closer to the fleet.
    summary = strat.aggregate_round(2, [_at("agx-1", 2, 0.0, 0.4), _at("tx2-3", 2, 0.2, 0.9)], [])
    time = {n: v["terms"]["time"] for n, v in summary.node_terms.items()}
    if from_model:
        # Modelled at the median speed (AGX 0.3, TX2 0.95 s a step): the AGX's choice changed nothing, so its
        # alignment did not change (0.5); the TX2's cut moved it toward the fleet's mean (1.0).
        assert time["agx-1"] == pytest.approx(0.5) and time["tx2-3"] == pytest.approx(1.0)
        assert strat.nodes["tx2-3"].behind is True and strat.nodes["agx-1"].behind is False
    else:
        # Measured (AGX 3 → 4 s, TX2 7 → 6.5 s, mean 5.25 s): the AGX's slow reading brought it closer to the
        # fleet than the TX2's cut did, and earns it more credit than the cut.
        assert time["agx-1"] == pytest.approx(1.0) and time["tx2-3"] == pytest.approx(0.75)
    assert cfg().coordinator.time_from_model is True


@pytest.mark.parametrize("from_model", [True, False])
def test_one_slow_reading_does_not_set_the_next_rounds_finish(from_model):
    strat = make_strategy(cfg("fedspine", coordinator={**FLAT, "plan_from_model": from_model}), total_rounds=10)
    fleet = [NODES[0], NODES[2]]
    # The TX2 reads 1.0 s a step twice, then one slow reading of 2.0 s (a busy shared machine); the AGX 0.2 s.
    for rnd, tx2_step in enumerate([1.0, 1.0, 2.0], start=1):
        strat.configure_round(rnd, fleet)
        strat.aggregate_round(rnd, [_at("agx-1", rnd, 0.0, 0.2), _at("tx2-3", rnd, 0.0, tx2_step)], [])
    plan = {a.node_id: a for a in strat.configure_round(4, fleet)}
    if from_model:
        # At the median speed (1.0 s) the TX2 finishes τ steps at 2 + 5 · 1.0 = 7 s and the AGX fills that round
        # with (7 - 2) / 0.2 = 25 steps, the cap: nobody is planned to wait.
        assert plan["tx2-3"].finish_s == pytest.approx(7.0) and plan["agx-1"].local_steps == 25
    else:
        # From the last reading the round is planned to last 12 s, and the AGX, capped at 25 steps (7 s), waits.
        assert plan["tx2-3"].finish_s == pytest.approx(12.0) and plan["agx-1"].local_steps == 25
    assert plan["tx2-3"].planned_s == pytest.approx(plan["tx2-3"].finish_s)
    assert cfg().coordinator.plan_from_model is True


def test_the_speed_model_keeps_a_window_of_readings_so_a_lasting_change_takes_over():
    strat = make_strategy(cfg("fedlora", coordinator={**FLAT, "speed_window": 5}), total_rounds=20)
    for rnd in range(1, 9):  # 8 rounds at 1.0 s a step
        strat.aggregate_round(rnd, [_at("tx2-3", rnd, 0.0, 1.0)], [])
    for rnd in range(9, 12):  # then the device throttles: 3.0 s a step from round 9
        strat.aggregate_round(rnd, [_at("tx2-3", rnd, 0.0, 3.0)], [])
        assert len(strat.nodes["tx2-3"].speeds) == 5  # bounded, whatever the number of rounds
    assert strat.median_speed("tx2-3") == pytest.approx((2.0, 3.0))  # 3 of the last 5 readings are slow
    restored = make_strategy(cfg("fedlora", coordinator={**FLAT, "speed_window": 3}), total_rounds=20)
    restored.load_state_dict(strat.state_dict())  # a smaller window applies to a restored state too
    assert len(restored.nodes["tx2-3"].speeds) == 3
    with pytest.raises(ConfigError, match="speed_window"):
        cfg(coordinator={"speed_window": 0})


def _capped_fleet(tolerance: float) -> tuple[list[set], list[dict], list[float]]:
    """Ten rounds of an AGX / NX / TX2 fleet on the step-cost model; the AGX's bandit prunes as fast as it may, the
    others' by 0.05 a round.  Returns per round the held nodes, the assigned sparsities and the idle fraction."""
    model = {"step_cost_sparsity": 0.92, "step_cost_rank": 0.0, "idle_tolerance": tolerance}
    strat = make_strategy(cfg("fedspine", coordinator=model, delta_p=[0.0, 0.05, 0.1, 0.15]), total_rounds=10)
    bandit = strat.bandit

    def choose(node_id, rnd, sparsity, cap, behind=None):
        dps, forced, goal = bandit._increments(node_id, rnd, sparsity, cap)
        beyond = sparsity >= goal - 1e-9
        dp = dps[0] if beyond else max(dps) if node_id == "agx-1" else max(d for d in dps if d <= 0.05)
        return bandit._choice(dp, 8, rnd, sparsity, cap, goal, forced, beyond)

    bandit.choose = choose
    fixed, step = {"agx-1": 1.0, "nx-2": 2.0, "tx2-3": 3.0}, {"agx-1": 0.2, "nx-2": 0.4, "tx2-3": 1.0}
    off = {"agx-1": 0.0008, "nx-2": 0.0, "tx2-3": 0.0002}
    joined = [NodeInfo(n, n[:-2], step_s=step[n], overhead_s=fixed[n], step_sparsity=0.0, step_rank=8) for n in step]
    held, sparsity, idle = [], [], []
    for rnd in range(1, 11):
        assigns = strat.configure_round(rnd, joined)
        held.append({a.node_id for a in assigns if a.held})
        sparsity.append({a.node_id: a.target_sparsity for a in assigns})
        trained = {a.node_id: (a.target_sparsity if rnd > 1 else 0.0) for a in assigns}  # the first cut comes after
        # A node reports the sparsity of the groups it really removed, a little off its target (not cumulatively).
        results = [NodeResult(**{**_timed(a, rnd, step[a.node_id] * (1 - 0.92 * trained[a.node_id]),
                                          fixed[a.node_id]).__dict__, "train_sparsity": trained[a.node_id],
                                 "sparsity": round(a.target_sparsity, 2) + off[a.node_id]})
                   for a in assigns]
        idle.append(strat.aggregate_round(rnd, results, []).idle_fraction)
    return held, sparsity, idle


def test_a_node_waiting_at_the_step_cap_prunes_no_further_than_the_slowest_node():
    """With aligned steps a node at the step cap cannot use the speed pruning gives it: it only waits longer.  So
    while it would wait more than the tolerance, its increment is lowered to keep it at or below the round's
    slowest node; a bandit that prunes the fast node as fast as it may is overruled for that node alone."""
    held, sparsity, idle = _capped_fleet(0.10)
    free_held, free_sparsity, free_idle = _capped_fleet(0.95)  # nobody waits that long: the bandit's choices stand
    tx2 = [pytest.approx(0.05 * r, abs=0.005) for r in range(1, 7)] + [pytest.approx(0.3, abs=0.005)] * 4
    for s in (sparsity, free_sparsity):
        assert [v["tx2-3"] for v in s] == tx2
        assert all(v == pytest.approx(0.3, abs=0.005) for v in s[-1].values())  # everyone at the target in the end
    assert free_held == [set()] * 10
    assert [s["agx-1"] for s in free_sparsity] == [pytest.approx(0.15, abs=0.005)] + [pytest.approx(0.3, abs=0.005)] * 9
    # At the cap the AGX (5 × the TX2's speed, 5τ steps, less fixed time) waits 27-30 % of a round even at the
    # TX2's sparsity: every round until both reach the target it is held to the TX2's new sparsity.  The NX fills
    # its rounds below the cap and is never held.
    assert held == [{"agx-1"}] * 6 + [set()] * 4
    assert [s["agx-1"] for s in sparsity] == tx2
    # Held, it waits less: in rounds 2-5 the free AGX runs ahead at 0.30 and the fleet idles more (13 % against
    # 9 % in round 2).  From round 6 on both AGXs are at 0.30 and the fleets are the same.
    assert all(h < f - 0.01 for h, f in zip(idle[1:5], free_idle[1:5], strict=True))
    assert idle[5:] == pytest.approx(free_idle[5:])


def _tuned_fleet(tune: bool) -> tuple[Strategy, list[torch.Tensor], list[dict]]:
    """Three aligned rounds; the nodes trained at sparsities below the target, then partly, then all at it (one
    a little under, as reported sparsities are).  Returns the strategy, the global delta after each round and
    each round's steps."""
    strat = make_strategy(cfg("fedspine", coordinator={**FLAT, "tune_at_tau": tune}), total_rounds=10)
    per_step = {"agx-1": 0.2, "nx-2": 0.4, "tx2-3": 1.0}
    trained = [{"agx-1": 0.0, "nx-2": 0.0, "tx2-3": 0.0}, {"agx-1": 0.3, "nx-2": 0.3, "tx2-3": 0.15},
               {"agx-1": 0.3, "nx-2": 0.3, "tx2-3": 0.29}]
    deltas, steps = [], []
    for rnd, at in enumerate(trained, start=1):
        assigns = strat.configure_round(rnd, NODES)
        steps.append({a.node_id: a.local_steps for a in assigns})
        strat.aggregate_round(rnd, [NodeResult(**{**_timed(a, rnd, per_step[a.node_id]).__dict__,
                                                  "train_sparsity": at[a.node_id], "sparsity": at[a.node_id]})
                                    for a in assigns], [])
        deltas.append(strat.global_.delta["m"].clone())
    return strat, deltas, steps


def test_once_every_node_trained_at_the_target_a_round_moves_the_global_state_tau_steps():
    """``tune_at_tau``: FedNova's τ_eff is the nodes' mean step count while pruning goes on, and τ (the baselines'
    step) once every node of the round trained at the target sparsity."""
    tuned, d_on, steps = _tuned_fleet(True)
    assert [tuned._tuning([]), cfg().coordinator.tune_at_tau] == [False, True]
    _, d_off, steps_off = _tuned_fleet(False)
    assert steps == steps_off and len(set(steps[2].values())) > 1  # aligned: the nodes ran different steps
    assert torch.equal(d_on[0], d_off[0]) and torch.equal(d_on[1], d_off[1])  # someone was still below the target
    mean_steps = sum(steps[2].values()) / 3  # equal weights, every node kept every coordinate
    assert torch.allclose(d_on[2] - d_on[1], (d_off[2] - d_off[1]) * 5 / mean_steps, atol=1e-6)
    # Methods without aligned steps run τ each: nothing changes for them, even with every node at the target.
    prune_ft = make_strategy(cfg("prune_ft", coordinator={"tune_at_tau": True}), total_rounds=10)
    at_target = [_timed(a, 1, 0.2) for a in prune_ft.configure_round(1, NODES)]
    assert all(r.sparsity == pytest.approx(0.3) for r in at_target) and prune_ft._tuning(at_target) is False


def test_first_round_steps_come_from_the_timing_nodes_measured_when_they_joined():
    strat = make_strategy(cfg("fedspine", coordinator=FLAT), total_rounds=10)
    joined = [NodeInfo("agx-1", "agx", step_s=0.2, overhead_s=1.0), NodeInfo("nx-2", "nx", step_s=0.4, overhead_s=2.0),
              NodeInfo("tx2-3", "tx2", step_s=1.0, overhead_s=5.0)]
    first = {a.node_id: a.local_steps for a in strat.configure_round(1, joined)}
    assert first == {"agx-1": 25, "nx-2": 20, "tx2-3": 5}  # the TX2 at τ finishes at 10 s; agx: (10 - 1) / 0.2 = 45 -> 5τ
    unknown = [joined[0], NodeInfo("nx-2", "nx"), joined[2]]  # a node that measured nothing runs τ
    assert {a.node_id: a.local_steps for a in strat.configure_round(1, unknown)}["nx-2"] == 5
    assigns = strat.configure_round(1, joined)
    strat.aggregate_round(1, [_timed(a, 1, {"agx-1": 0.5, "nx-2": 0.4, "tx2-3": 1.0}[a.node_id]) for a in assigns], [])
    # from round 2 on the node's last round counts, not its startup timing (agx: (2 + 5 - 2) / 0.5 = 10 steps)
    assert {a.node_id: a.local_steps for a in strat.configure_round(2, joined)}["agx-1"] == 10
    assert all(a.local_steps == 5 for a in make_strategy(cfg("fedlora"), 10).configure_round(1, joined))


def test_step_cost_ratio_scales_the_step_time_by_sparsity_and_rank():
    assert step_cost_ratio((0.0, 8), (0.5, 8), 0.9, 0.0) == pytest.approx(0.55)
    assert step_cost_ratio((0.3, 8), (0.5, 8), 0.9, 0.0) == pytest.approx(0.55 / 0.73)
    assert step_cost_ratio((0.3, 8), (0.3, 16), 0.0, 0.02) == pytest.approx(1.32 / 1.16)
    assert step_cost_ratio((0.2, 0), (0.2, 16), 0.9, 0.02) == pytest.approx(1.0)  # rank 0: unknown, as now
    assert step_cost_ratio((0.4, 4), (0.4, 4), 0.9, 0.02) == pytest.approx(1.0)


def test_the_step_cost_fit_recovers_the_model_it_is_given():
    from benchmarks.pruning.run import fit_step_cost

    times = {(s, r): 0.5 * (1 - 0.9 * s) * (1 + 0.02 * r) for s in (0.0, 0.3, 0.5) for r in (2, 4, 8, 16)}
    assert fit_step_cost(times) == pytest.approx((0.5, 0.9, 0.02), rel=1e-6)
    flat = {(s, r): 0.4 * (1 - 0.5 * s) for s in (0.0, 0.5) for r in (4, 8)}  # rank changes nothing
    t0, a, b = fit_step_cost(flat)
    assert (t0, a) == pytest.approx((0.4, 0.5)) and b == pytest.approx(0.0, abs=1e-9)


def test_alignment_plans_each_node_at_its_new_configuration():
    """A node that prunes or changes rank is planned at the speed the step-cost model gives it, not at the speed
    of its last round's configuration."""
    def strategy(model):
        c = {**model, "align_steps": ["uniform"], "max_steps_factor": 10}
        return make_strategy(cfg("uniform", coordinator=c), total_rounds=3)

    strat, flat = strategy({"step_cost_sparsity": 0.9, "step_cost_rank": 0.02}), strategy(FLAT)
    joined = [NodeInfo("agx-1", "agx", step_s=0.2, overhead_s=1.0, step_sparsity=0.0, step_rank=8),
              NodeInfo("tx2-3", "tx2", step_s=1.0, overhead_s=3.0, step_sparsity=0.0, step_rank=8)]
    first = strat.configure_round(1, joined)
    assert [a.target_sparsity for a in first] == [pytest.approx(0.15)] * 2  # uniform: 0.3 · 1/2 in round 1
    # Round 1 is the nodes' first cut, which comes after their steps: they train dense, at the calibrated speed.
    assert {a.node_id: a.local_steps for a in first} == {"agx-1": 35, "tx2-3": 5}  # (3 + 5 - 1) / 0.2
    fixed, per_step = {"agx-1": 1.0, "tx2-3": 3.0}, {"agx-1": 0.2, "tx2-3": 1.0}
    done = [NodeResult(**{**_timed(a, 1, per_step[a.node_id], fixed[a.node_id]).__dict__, "train_sparsity": 0.0})
            for a in first]
    for s in (strat, flat):
        s.configure_round(1, joined)
        s.aggregate_round(1, done, [])
    # Its reading is kept at step cost 1: divided by the cost of the configuration its steps ran at (dense, r=8).
    assert strat.nodes["tx2-3"].speeds == [(pytest.approx(3.0), pytest.approx(1.0 / strat._step_cost((0.0, 8))))]
    assert strat._step_cost((0.0, 8)) != pytest.approx(strat._step_cost((0.15, 8)))  # not the assigned 0.15
    second = strat.configure_round(2, joined)
    assert [a.target_sparsity for a in second] == [pytest.approx(0.3)] * 2
    # Both now train at 0.3, at 0.73 of their dense step time: the TX2 finishes at 3 + 5 · 0.73 = 6.65 s and the
    # AGX fills it with (6.65 - 1) / (0.2 · 0.73) = 38.7 steps.  Planned at its dense speed it would get 35 and
    # wait; its last round's speed would hold only if nothing changed.
    assert {a.node_id: a.local_steps for a in second} == {"agx-1": 38, "tx2-3": 5}
    assert [a.planned_s for a in second] == [pytest.approx(1 + 38 * 0.146), pytest.approx(6.65)]  # in the metrics
    assert all(a.planned_s is None for a in make_strategy(cfg("uniform"), 3).configure_round(1, joined))  # not aligned
    assert {a.node_id: a.local_steps for a in flat.configure_round(2, joined)} == {"agx-1": 35, "tx2-3": 5}
    # Restarted from a checkpoint, the coordinator still knows which configuration the timing belongs to.
    restored = strategy({"step_cost_sparsity": 0.9, "step_cost_rank": 0.02})
    restored.load_state_dict(strat.state_dict())
    assert restored.nodes["tx2-3"].speeds == strat.nodes["tx2-3"].speeds
    assert {a.node_id: a.local_steps for a in restored.configure_round(2, joined)} == {"agx-1": 38, "tx2-3": 5}


def test_aggregation_weights_are_training_examples_else_samples_per_step():
    a = Assignment("n", 0.0, 8, 5)
    r1 = NodeResult(**{**result(a, 1).__dict__, "examples": 300, "steps": 20, "samples": 320})
    r2 = NodeResult(**{**result(a, 1).__dict__, "examples": 100, "steps": 5, "samples": 80})
    assert node_weights([r1, r2], tau=5) == [300.0, 100.0]
    r2 = NodeResult(**{**r2.__dict__, "examples": 0})  # one node did not report: per-step batches for all
    assert node_weights([r1, r2], tau=5) == [16.0, 16.0]


def test_step_alignment_settings_are_checked():
    with pytest.raises(ConfigError, match="align_steps"):
        CoordinatorConfig.from_dict({"coordinator": {"align_steps": ["fedspine", "fedfoo"]}})
    with pytest.raises(ConfigError, match="max_steps_factor"):
        CoordinatorConfig.from_dict({"coordinator": {"max_steps_factor": 0.5}})
    with pytest.raises(ConfigError, match="idle_tolerance"):
        CoordinatorConfig.from_dict({"coordinator": {"idle_tolerance": 1.0}})
    for share in (0.0, 1.5):
        with pytest.raises(ConfigError, match="pace_min_fraction"):
            CoordinatorConfig.from_dict({"coordinator": {"pace_min_fraction": share}})
    steps = {f: CoordinatorConfig.from_dict({"coordinator": {"local_steps": 20, "pace_min_fraction": f}})
             .coordinator.pace_min_steps for f in (0.5, 0.51, 1.0, 0.01)}
    assert steps == {0.5: 10, 0.51: 11, 1.0: 20, 0.01: 1}
    with pytest.raises(ConfigError, match="min_keepers"):
        CoordinatorConfig.from_dict({"coordinator": {"min_keepers": 0}})
    with pytest.raises(ConfigError, match="base_model 'A3604C' must be a sha256"):
        CoordinatorConfig.from_dict({"coordinator": {"base_model": "A3604C"}})
    with pytest.raises(ConfigError, match="step_cost_sparsity"):
        CoordinatorConfig.from_dict({"coordinator": {"step_cost_sparsity": 1.0}})
    with pytest.raises(ConfigError, match="step_cost_rank"):
        CoordinatorConfig.from_dict({"coordinator": {"step_cost_rank": -0.1}})
    assert make_strategy(cfg("fedspine"), 10).global_.min_keepers == 2  # the default (1: the spec's rule)
