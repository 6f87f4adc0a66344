"""Strategies: each method's schedule, the mechanisms they all share, boundary checks and checkpoint/resume."""

import dataclasses

import pytest
import torch

from coordinator import planning
from coordinator.aggregation import GlobalLora
from coordinator.config import MAX_TIERS, CoordinatorConfig
from coordinator.state import CheckpointStore
from coordinator.strategies import (
    STRATEGIES,
    Assignment,
    Failure,
    NodeInfo,
    NodeResult,
    accept_answer,
    make_strategy,
    node_weights,
)
from coordinator.strategies.base import StructureTable
from shared.config import ConfigError
from shared.messages import MAX_MAP_ITEMS, RoundConfig, RoundReport
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError, UpdateLimits

NODES = [NodeInfo("agx-1", "agx"), NodeInfo("nx-2", "nx"), NodeInfo("tx2-3", "tx2")]
TAU = 5


def cfg(method="fedspine", rounds=10, **pruning):
    return CoordinatorConfig.from_dict({"coordinator": {"method": method, "rounds": rounds, "local_steps": TAU},
                                        "pruning": {"target_sparsity": 0.3, **pruning}})


def result(a: Assignment, rnd: int, per_step: float | None = None, fixed: float = 2.0, rows=None,
           steps: int | None = None) -> NodeResult:
    """A node's answer to ``a``: a random update with importance scores; timed when ``per_step`` is given."""
    g = torch.Generator().manual_seed(rnd * 7 + len(a.node_id))
    rows = torch.arange(8) if rows is None else rows
    m = ModuleUpdate(A=torch.randn(a.rank, 4, generator=g) * 0.1, B=torch.randn(len(rows), a.rank, generator=g) * 0.1,
                     rows=rows, cols=torch.arange(4), shape=(8, 4), scale=16.0 / a.rank)
    imp = {"0.heads": GroupScores(idx=torch.arange(2), score=torch.rand(2, generator=g), size=2)} if a.importance else {}
    steps = a.local_steps if steps is None else steps
    timed = {} if per_step is None else {"steps": steps, "train_s": per_step * steps,
                                         "round_time_s": fixed + per_step * steps}
    return NodeResult(**{"node_id": a.node_id, "update": LoraUpdate({"m": m}, {"head": torch.ones(2) * rnd}, imp),
                         "samples": 40, "loss_start": 1.0, "loss_end": 0.8, "compute_s": 1.0, "round_time_s": 1.0,
                         "sparsity": a.target_sparsity, "rank": a.rank, "energy_j": None, "upload_bytes": 100,
                         "examples": 100, **timed})


def run(strat, rounds, start=1, per_step=None):
    seen = []
    for rnd in range(start, rounds + 1):
        assigns = strat.configure_round(rnd, NODES)
        seen.append({a.node_id: (round(a.target_sparsity, 6), a.rank) for a in assigns})
        strat.aggregate_round(rnd, [result(a, rnd, per_step and per_step[a.node_id]) for a in assigns], [])
    return seen


@pytest.mark.parametrize("method,check", [
    ("fedlora", lambda s: all(v == (0.0, 8) for r in s for v in r.values())),
    ("hetlora", lambda s: all(r == {"agx-1": (0.0, 16), "nx-2": (0.0, 8), "tx2-3": (0.0, 4)} for r in s)),
    # every cut waits for the fleet's importance, which exists from round 2
    ("prune_ft", lambda s: all(v == (0.0, 8) for v in s[0].values()) and all(v == (0.3, 8) for r in s[1:]
                                                                                for v in r.values())),
    ("ft_prune", lambda s: all(v[0] == 0.0 for r in s[:8] for v in r.values())
                           and all(v[0] == 0.3 for r in s[8:] for v in r.values())),
    ("uniform", lambda s: len({v for v in s[2].values()}) == 1 and s[6]["agx-1"][0] == pytest.approx(0.3)
                          and s[2]["agx-1"][0] < s[5]["agx-1"][0]),
])
def test_baseline_schedules(method, check):
    seen = run(make_strategy(cfg(method), total_rounds=10), 10)
    assert check(seen), seen


def test_every_method_is_a_strategy_class_named_after_its_method():
    from coordinator.config import METHODS

    assert sorted(STRATEGIES) == sorted(METHODS)
    assert all(make_strategy(cfg(m), 3).name == m for m in METHODS)


def test_only_a_method_that_will_still_cut_has_its_nodes_track_importance():
    tracked = {}
    for method in STRATEGIES:
        strat = make_strategy(cfg(method), total_rounds=10)
        tracked[method] = []
        for rnd in range(1, 11):
            assigns = strat.configure_round(rnd, NODES)
            tracked[method].append(all(a.importance for a in assigns))
            strat.aggregate_round(rnd, [result(a, rnd) for a in assigns], [])
    assert not any(tracked["fedlora"]) and not any(tracked["hetlora"])
    assert all(tracked["fedspine"])
    assert tracked["prune_ft"] == [True] + [False] * 9  # round 1 scores the groups round 2 cuts
    assert tracked["ft_prune"] == [True] * 8 + [False] * 2  # the cut comes in round 9
    assert tracked["uniform"] == [True] * 6 + [False] * 4  # s* reached in round 7 (2/3 of 10)


def test_no_node_is_cut_before_the_fleet_has_importance_scores():
    for method in ("fedspine", "uniform", "prune_ft"):
        strat = make_strategy(cfg(method), total_rounds=3)
        first = strat.configure_round(1, NODES)
        assert all(a.target_sparsity == 0.0 for a in first) and not strat.has_fleet_importance()
        assert all(a.arm is None or a.arm[0] == 0.0 for a in first)  # the bandit is credited with what ran


def test_fedspine_every_node_reaches_target_within_its_cap_and_sparsity_is_monotone():
    strat = make_strategy(cfg("fedspine", rounds=6, max_sparsity={"tx2": 0.45, "default": 0.5}), total_rounds=6)
    seen = run(strat, 6)
    for n, cap in (("agx-1", 0.5), ("nx-2", 0.5), ("tx2-3", 0.45)):
        seq = [r[n][0] for r in seen]
        assert seq == sorted(seq) and seq[-1] >= 0.3 - 1e-9 and seq[-1] <= cap + 1e-9


def _answer(a: Assignment, r: NodeResult, **report) -> tuple[RoundConfig, RoundReport, bytes]:
    """The RoundConfig a node was sent for ``a``, its report of ``r`` (fields overridden by ``report``) and upload."""
    data = r.update.to_bytes()
    sent = RoundConfig(run_id="run", round=2, target_sparsity=a.target_sparsity, rank=a.rank,
                       local_steps=a.local_steps, deadline_ts=1.7e9, upload_transfer_id="run.r2.up",
                       download_transfer_id=None)
    rep = RoundReport(**{"run_id": "run", "round": 2, "node_id": a.node_id, "status": "ok",
                         "transfer_id": "run.r2.up", "upload_bytes": len(data), "samples": 40, "steps": a.local_steps,
                         "rank": a.rank, "virtual_s": 3.0, **report})
    return sent, rep, data


def test_boundary_checks_rank_and_monotone_structure():
    strat = make_strategy(cfg("fedlora"), total_rounds=3)
    a = strat.configure_round(1, NODES)[0]
    strat.aggregate_round(1, [result(a, 1, rows=torch.arange(6))], [])
    a2 = strat.configure_round(2, NODES)[0]

    def accept(r: NodeResult) -> NodeResult:
        return accept_answer(*_answer(a2, r), strat.global_, strat.state(a2.node_id).structure, UpdateLimits(),
                             wall_s=1.0)

    with pytest.raises(UpdateError, match="rank"):
        accept(result(Assignment(a2.node_id, 0.0, 4, 5), 2))
    with pytest.raises(UpdateError, match="monotone"):
        accept(result(a2, 2, rows=torch.arange(8)))
    accept(result(a2, 2, rows=torch.arange(5)))


def test_the_one_acceptance_rule_refuses_each_kind_of_wrong_answer():
    """``accept_answer``, which the root and every region apply: each refusal, and what an accepted answer gives."""
    a = Assignment("nx-2", 0.0, 4, TAU)
    g = GlobalLora()
    g.aggregate([(result(a, 1).update, 1.0)])  # a global state of module m, shape (8, 4)
    prev = {"m": (torch.arange(6), torch.arange(4))}  # the node's last accepted structure: rows 6 and 7 were cut
    ok = result(a, 2, rows=torch.arange(5))

    def accept(r: NodeResult = ok, *, data: bytes | None = None, limits: UpdateLimits | None = None,
               sent: dict | None = None, **report) -> NodeResult:
        """``r`` answered (its report's fields overridden by ``report``, the config's by ``sent``)."""
        cfg_, rep, upload = _answer(a, r, **report)
        cfg_ = dataclasses.replace(cfg_, **(sent or {}))
        return accept_answer(cfg_, rep, upload if data is None else data, g, prev, limits or UpdateLimits(),
                             wall_s=7.5)

    got = accept()
    assert (got.node_id, got.steps, got.round_time_s, got.samples) == ("nx-2", TAU, 3.0, 40)
    assert got.upload_bytes == len(ok.update.to_bytes()) and torch.equal(got.update.modules["m"].rows, torch.arange(5))
    assert accept(steps=0, virtual_s=0.0).round_time_s == 7.5  # steps 0: as assigned; no virtual time: wall time
    assert accept(upload_bytes=0).upload_bytes == len(ok.update.to_bytes())  # 0: not reported
    refusals = {
        "reported upload_bytes": lambda: accept(upload_bytes=123),
        "ran 3 local steps, not the assigned 5": lambda: accept(steps=3),
        "ran 11 local steps, not the assigned 1-10": lambda: accept(steps=11, sent={"finish_s": 9.0, "min_steps": 1,
                                                                                   "max_steps": 10}),
        "does not fit a payload of 64 bytes": lambda: accept(data=b"x" * 64, upload_bytes=64),  # not an update
        "exceeds the limit": lambda: accept(limits=UpdateLimits(max_bytes=100)),
        "update ranks \\[4\\] differ from the assigned rank 8": lambda: accept(sent={"rank": 8}),
        "lora.m: shape \\(8, 5\\) != global \\(8, 4\\)": lambda: accept(_wider(ok)),
        "kept indices grew back": lambda: accept(result(a, 2, rows=torch.arange(7))),
    }
    for why, call in refusals.items():
        with pytest.raises(UpdateError, match=why):
            call()
    assert accept(sent={"finish_s": 9.0, "min_steps": 1, "max_steps": 10}, steps=9).steps == 9  # paced: in bounds


def _wider(r: NodeResult) -> NodeResult:
    """``r`` with its module on a wider unpruned shape than the global state's."""
    m = r.update.modules["m"]
    wide = ModuleUpdate(A=torch.zeros(m.rank, 5), B=m.B, rows=m.rows, cols=torch.arange(5), shape=(8, 5), scale=m.scale)
    return dataclasses.replace(r, update=LoraUpdate({"m": wide}, r.update.dense, r.update.importance))


def test_nodes_of_one_structure_share_one_interned_copy_of_it():
    """``StructureTable``, through which the root's strategy and each region record their nodes' structures."""
    table = StructureTable()
    a = Assignment("nx-2", 0.0, 4, TAU)
    first, same, other = (result(a, rnd, rows=rows).update
                          for rnd, rows in ((1, torch.arange(6)), (2, torch.arange(6)), (3, torch.arange(5))))
    got = table.intern(first)
    assert table.intern(same) is got and table.intern(other) is not got  # equal kept indices: one object
    assert torch.equal(got["m"][0], torch.arange(6)) and got["m"][0] is not first.modules["m"].rows  # a copy
    strat = make_strategy(cfg("fedlora"), total_rounds=3)
    assigns = strat.configure_round(1, NODES)
    strat.aggregate_round(1, [result(x, 1, rows=torch.arange(6)) for x in assigns], [])
    assert len({id(strat.state(n.node_id).structure) for n in NODES}) == 1


def test_oom_failure_excludes_heavier_configurations():
    strat = make_strategy(cfg("fedspine", rounds=40), total_rounds=40)
    run(strat, 1)
    a = {x.node_id: x for x in strat.configure_round(2, NODES)}["tx2-3"]
    strat.aggregate_round(2, [], [Failure("tx2-3", "oom")])
    for rnd in range(3, 15):
        b = {x.node_id: x for x in strat.configure_round(rnd, NODES)}["tx2-3"]
        assert not (b.target_sparsity <= a.target_sparsity + 1e-9 and b.rank >= a.rank), (a, b)
        strat.aggregate_round(rnd, [result(b, rnd)], [])


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, method):
    per_step = {"agx-1": 0.2, "nx-2": 0.4, "tx2-3": 1.0}
    full = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    seen_full = run(full, 8, per_step=per_step)
    first = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    seen_a = run(first, 4, per_step=per_step)
    store = CheckpointStore(tmp_path)
    store.save({"round": 4, "run_id": "x", "strategy": first.state_dict()})
    resumed = make_strategy(cfg(method, rounds=8), total_rounds=8, seed=4)
    resumed.load_state_dict(store.load()["strategy"])
    seen_b = run(resumed, 8, start=5, per_step=per_step)
    assert seen_a + seen_b == seen_full
    sa, sb = full.state_dict(), resumed.state_dict()
    assert sa["policy"] == sb["policy"] and sa["nodes"] == sb["nodes"]
    assert sa["tensors"].keys() == sb["tensors"].keys()
    assert all(torch.equal(sa["tensors"][k], sb["tensors"][k]) for k in sa["tensors"])


def test_a_checkpoint_of_another_method_is_refused():
    state = make_strategy(cfg("fedlora"), 3).state_dict()
    with pytest.raises(ValueError, match="fedlora"):
        make_strategy(cfg("uniform"), 3).load_state_dict(state)


def test_checkpoint_is_atomic_and_replaces_old_tensor_files(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load() is None
    for rnd in (1, 2):
        store.save({"round": rnd, "strategy": {"tensors": {"t": torch.full((2,), float(rnd))}}})
    st = store.load()
    assert st["round"] == 2 and torch.equal(st["strategy"]["tensors"]["t"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "global-000002.safetensors"]


def test_the_deployed_rank_is_the_largest_rank_the_method_trains_with():
    ranks = {}
    for method in ("fedspine", "hetlora", "fedlora", "prune_ft"):
        c = CoordinatorConfig.from_dict({"coordinator": {"method": method, "rounds": 2},
                                         "bandit": {"ranks": [2, 4, 32]},
                                         "lora": {"rank": 8, "tier_ranks": {"agx": 12, "tx2": 4, "default": 6}}})
        ranks[method] = make_strategy(c, total_rounds=2).deploy_rank()
    assert ranks == {"fedspine": 32, "hetlora": 12, "fedlora": 8, "prune_ft": 8}
    # HetLoRA without a default tier: a tier the table does not name trains at [lora] rank, which then counts
    c = CoordinatorConfig.from_dict({"coordinator": {"method": "hetlora", "rounds": 2},
                                     "lora": {"rank": 24, "tier_ranks": {"agx": 12, "tx2": 4}}})
    het = make_strategy(c, total_rounds=2)
    assert het.deploy_rank() == 24 and het.global_.rank == 24  # and zero padding pads to it


@pytest.mark.parametrize("method", ["fedspine", "hetlora", "fedlora"])
def test_nodes_are_sent_the_deployed_rank_and_start_from_their_own_rank(method):
    strat = make_strategy(cfg(method), total_rounds=10)
    run(strat, 2)
    for a in strat.configure_round(3, NODES):
        sent, start = strat.download_slice(a.node_id, a.rank), strat.global_slice(a.node_id, a.rank)
        assert sent.rank == max(a.rank, strat.deploy_rank()) and start.rank == a.rank
        assert torch.equal(start.modules["m"].A, sent.modules["m"].A[: a.rank])


def test_aligned_steps_fill_the_wait_for_the_slowest_node_within_bounds():
    timing = {"fast": (1.0, 1.0), "mid": (2.0, 2.5), "slow": (5.0, 5.0)}  # (fixed s, s per step)
    got = planning.aligned_steps(timing, tau=20, most=100)
    assert got == {"fast": 100, "mid": 41, "slow": 20}  # slow at τ finishes at 105 s; mid: 2 + 41·2.5 = 104.5
    assert planning.aligned_steps(timing, tau=20, most=60)["fast"] == 60  # capped
    assert planning.aligned_steps(timing, tau=20, most=20) == {"fast": 20, "mid": 20, "slow": 20}  # off
    assert planning.aligned_steps({"a": (9.0, 1.0), "b": (0.0, 1.0)}, tau=5, most=50) == {"a": 5, "b": 14}


def test_idle_fraction_and_pace_bounds():
    assert planning.idle_fraction([10.0, 5.0]) == pytest.approx(0.25)
    assert planning.idle_fraction([3.0, 3.0, 3.0]) == 0.0
    assert planning.pace_bounds(20) == (10, 100) and planning.pace_bounds(1) == (1, 5)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_every_method_gives_fast_nodes_more_steps_and_paces_the_round(method):
    strat = make_strategy(cfg(method), total_rounds=10)
    per_step = {"agx-1": 0.2, "nx-2": 0.4, "tx2-3": 1.0}
    first = strat.configure_round(1, NODES)
    assert all(a.local_steps == TAU and a.finish_s is None for a in first)  # no timing yet: τ for everyone
    summary = strat.aggregate_round(1, [result(a, 1, per_step[a.node_id]) for a in first], [])
    assert summary.idle_fraction > 0.3
    second = strat.configure_round(2, NODES)
    # each planned at its sparsity and rank this round by the step-cost model; the slowest at τ sets the finish
    timing = {a.node_id: planning.timing_at(strat.state(a.node_id).speed, a.target_sparsity, a.rank) for a in second}
    finish = planning.round_finish(timing, TAU)
    assert {a.node_id: a.local_steps for a in second} == planning.aligned_steps(timing, TAU, 5 * TAU)
    assert second[0].local_steps > second[2].local_steps
    assert all(a.finish_s == pytest.approx(finish) and a.min_steps == 3 and a.max_steps == 25 for a in second)
    results = [result(a, 2, per_step[a.node_id], steps=round((finish - 2.0) / per_step[a.node_id]))
               for a in second]
    assert strat.aggregate_round(2, results, []).idle_fraction < 0.05  # the fast nodes filled the wait


def test_a_nodes_speed_separates_its_upload_which_grows_with_the_rank():
    strat = make_strategy(cfg("fedlora"), total_rounds=3)
    r = NodeResult(**{**result(Assignment("tx2-3", 0.0, 8, TAU), 1, 1.0).__dict__, "round_time_s": 2.0 + 5 + 4.0,
                      "upload_s": 4.0})
    strat.aggregate_round(1, [r], [])
    assert strat.state("tx2-3").speed == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(0.5))
    assert planning.timing_at(strat.state("tx2-3").speed, 0.0, 2) == (pytest.approx(3.0), pytest.approx(1.0))


def test_first_round_steps_come_from_the_timing_nodes_measured_when_they_joined():
    joined = [NodeInfo("agx-1", "agx", step_s=0.2, overhead_s=1.0), NodeInfo("nx-2", "nx", step_s=0.4, overhead_s=2.0),
              NodeInfo("tx2-3", "tx2", step_s=1.0, overhead_s=5.0)]
    strat = make_strategy(cfg("fedlora"), total_rounds=10)
    first = {a.node_id: a.local_steps for a in strat.configure_round(1, joined)}
    assert first == {"agx-1": 25, "nx-2": 20, "tx2-3": 5}  # the TX2 at τ finishes at 10 s; agx: 45 -> 5τ
    unknown = [joined[0], NodeInfo("nx-2", "nx"), joined[2]]  # a node that measured nothing runs τ, unpaced
    nx = {a.node_id: a for a in strat.configure_round(1, unknown)}["nx-2"]
    assert nx.local_steps == TAU and nx.finish_s is None


def test_speed_is_the_median_of_a_window_of_readings_at_step_cost_one():
    strat = make_strategy(cfg("fedlora"), total_rounds=30)
    a = Assignment("agx-1", 0.0, 8, TAU)
    for rnd, per_step in enumerate([1.0, 3.0, 1.2] + [2.0] * 12, start=1):
        strat.aggregate_round(rnd, [result(a, rnd, per_step)], [])
        if rnd == 3:  # one slow reading (3.0) does not move the median
            assert strat.state("agx-1").speed == (pytest.approx(2.0), pytest.approx(1.2), 0.0)
    assert len(strat.state("agx-1").speeds) == planning.SPEED_WINDOW
    assert strat.state("agx-1").speed[1] == pytest.approx(2.0)  # a lasting change takes over
    # a reading at sparsity s is kept at step cost 1: divided by 1 - 0.92 s
    pruned = make_strategy(cfg("fedlora"), total_rounds=3)
    pruned.aggregate_round(1, [result(Assignment("agx-1", 0.5, 8, TAU), 1, 1.0)], [])
    assert pruned.state("agx-1").speed[1] == pytest.approx(1.0 / planning.step_cost(0.5))
    assert pruned.state("agx-1").speed[2] == 0.0  # no upload reported


def test_aggregation_weights_are_training_examples_else_samples_per_step():
    a = Assignment("n", 0.0, 8, 5)
    r1 = NodeResult(**{**result(a, 1).__dict__, "examples": 300, "steps": 20, "samples": 320})
    r2 = NodeResult(**{**result(a, 1).__dict__, "examples": 100, "steps": 5, "samples": 80})
    assert node_weights([r1, r2], tau=5) == [300.0, 100.0]
    r2 = NodeResult(**{**r2.__dict__, "examples": 0})  # one node did not report: per-step batches for all
    assert node_weights([r1, r2], tau=5) == [16.0, 16.0]


def test_configuration_is_checked_naming_the_key():
    for section, values, match in [
        ("coordinator", {"method": "fedfoo"}, "method 'fedfoo'"),
        ("coordinator", {"base_model": "A3604C"}, "base_model 'A3604C' must be a sha256"),
        ("coordinator", {"align_steps": ["fedspine"]}, "unknown key"),
        ("pruning", {"max_sparsity": {"tx2": 0.2}}, r"\[pruning\] max_sparsity\[tx2\]"),
        ("pruning", {"target_sparsity": 1.0}, r"\[pruning\] target_sparsity 1.0 outside"),
        ("bandit", {"reward": {"speed": 1.0}}, r"\[bandit\] reward has unknown term"),
        ("bandit", {"ranks": [4, 0]}, r"\[bandit\] ranks"),
        ("lora", {"rank": 0}, r"\[lora\] rank 0"),
        ("lora", {"tier_ranks": {"tx2": 0}}, r"\[lora\] tier_ranks\[tx2\]"),
        ("lora", {"tier_ranks": {f"t{i}": 4 for i in range(65)}}, "65 tiers; at most 64"),
    ]:
        with pytest.raises(ConfigError, match=match):
            CoordinatorConfig.from_dict({section: values})
    assert make_strategy(cfg("fedspine"), 10).global_.min_keepers == 2
    assert MAX_TIERS == MAX_MAP_ITEMS  # the largest tier table a RegionRound carries
