"""Strategies: schedules of every method, checks at the boundary, OOM handling and checkpoint/resume."""

import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.state import CheckpointStore
from coordinator.strategy import Assignment, Failure, NodeInfo, NodeResult, idle_fraction, make_strategy
from shared.updates import LoraUpdate, ModuleUpdate, UpdateError

NODES = [NodeInfo("agx-1", "agx"), NodeInfo("nx-2", "nx"), NodeInfo("tx2-3", "tx2")]


def cfg(method="fedspine", rounds=10, **bandit):
    return CoordinatorConfig.from_dict({"coordinator": {"method": method, "rounds": rounds, "local_steps": 5},
                                        "bandit": {"target_sparsity": 0.3, **bandit}})


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
