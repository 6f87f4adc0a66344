"""Fleet results: virtual clock, idle fraction, time to target, the summary table and plots."""

import json

import pytest

from coordinator.report import analyse, reach_target, rounds_table, time_to, worst_drop, write_report


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _node(rnd, node, t, acc, **kw):
    return {"kind": "node", "round": rnd, "node": node, "status": "ok", "round_time_s": t, "wall_s": t / 2, "steps": 8,
            "m_test_accuracy": acc, "upload_bytes": 1000, "sparsity": kw.pop("sparsity", 0.1), "rank": 8, **kw}


def test_virtual_clock_idle_and_curve(tmp_path):
    p = tmp_path / "m.jsonl"
    _write(p, [
        _node(1, "a", 10.0, 0.40, planned_s=9.0), _node(1, "b", 5.0, 0.50, planned_s=6.0),
        _node(2, "a", 8.0, 0.60, planned_s=8.0, energy_j=100.0, upload_s=1.0), _node(2, "b", 6.0, 0.70, energy_j=50.0),
        {"kind": "node", "round": 2, "node": "c", "status": "timeout"},
        _node(3, "a", 0.0, 0.80, eval_only=True), _node(3, "b", 0.0, 0.90, eval_only=True),
        {"kind": "export", "node": "a", "status": "ok", "metrics": {"accuracy": 0.8}, "sparsity": 0.3,
         "latency_ms": 10.0, "params": 100},
        {"kind": "export", "node": "b", "status": "ok", "metrics": {"accuracy": 0.9}, "sparsity": 0.35,
         "latency_ms": 12.0, "params": 90},
    ])
    r = analyse("fedspine", p, idle_w={"a": 2.0, "b": 1.0})
    assert r.rounds == 2
    assert r.virtual_time_s == pytest.approx(18.0)  # the slowest node of each round: 10 + 8
    assert r.curve == [(0.0, pytest.approx(0.45)), (10.0, pytest.approx(0.65)), (18.0, pytest.approx(0.85))]
    assert r.per_round_idle == [pytest.approx(0.25), pytest.approx(0.125)]  # b waits half of 10 s, then 2 of 8 s
    # compute: busy device-seconds (round time less upload); energy: unknown in round 1, so unknown from then on
    assert [c for c, _ in r.curve_cost] == [0.0, pytest.approx(15.0), pytest.approx(15.0 + 7.0 + 6.0)]
    assert [e for _, e in r.curve_cost] == [0.0, None, None]
    reach_target(r, 0.75)  # crossed half-way through round 2
    assert (r.time_to_target_s, r.compute_to_target_s, r.energy_to_target_j) == (
        pytest.approx(14.0), pytest.approx(15.0 + 13.0 / 2), None)
    assert worst_drop(r.curve) == 0.0 and worst_drop([(0, 0.5), (1, 0.8), (2, 0.6), (3, 0.75)]) == pytest.approx(0.2)
    assert worst_drop([(0, 0.3), (1, 0.55), (2, 0.58), (3, 0.6)]) == 0.0  # only rises after 90 %: no drop
    assert r.plan_error == pytest.approx((0.1 + 0.2 + 0.0) / 3)  # |10 - 9| / 10, |5 - 6| / 5, 0; b unplanned in 2
    table = rounds_table([r]).splitlines()
    assert table[6:8] == ["| 1 | 8 / 0.10 / 8 / 10 s (plan 9 s) | 8 / 0.10 / 8 / 5 s (plan 6 s) | 25.0% | 0.650 |",
                          "| 2 | 8 / 0.10 / 8 / 8 s (plan 8 s) | 8 / 0.10 / 8 / 6 s | 12.5% | 0.850 |"]
    assert r.final_accuracy == pytest.approx(0.85)
    assert r.final_sparsity == pytest.approx(0.325)
    assert r.upload_bytes == 6000


def test_time_to_target_interpolates():
    curve = [(0.0, 0.3), (10.0, 0.5), (20.0, 0.9)]
    assert time_to(curve, 0.5) == pytest.approx(10.0)
    assert time_to(curve, 0.7) == pytest.approx(15.0)
    assert time_to(curve, 0.95) is None


@pytest.mark.slow
def test_report_table_and_plots(tmp_path):
    fast, slow = tmp_path / "fast.jsonl", tmp_path / "slow.jsonl"
    _write(fast, [_node(1, "a", 5.0, 0.3), _node(2, "a", 5.0, 0.6), _node(3, "a", 0.0, 0.8, eval_only=True)])
    _write(slow, [_node(1, "a", 10.0, 0.3), _node(2, "a", 10.0, 0.6), _node(3, "a", 0.0, 0.7, eval_only=True)])
    table = write_report({"fedspine": fast, "fedlora": slow}, tmp_path / "out", target_sparsity=0.3)
    assert "| fedspine |" in table and "| fedlora |" in table
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["target_accuracy"] == pytest.approx(0.7)  # the best accuracy both methods reached
    assert summary["methods"]["fedspine"]["time_to_target_s"] == pytest.approx(7.5)  # 5 s + half of the next 5 s
    assert summary["methods"]["fedlora"]["time_to_target_s"] == pytest.approx(20.0)
    assert "2.67x" in table  # fedlora needs 20 / 7.5 times the virtual time of fedspine
    assert "| 0.0% | 0.0% | n/a |" in table  # idle (mean, worst round) and no planned times: not aligned
    for png in ("accuracy_vs_time.png", "idle_fraction.png", "configs_fedspine.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert "## fedlora" in (tmp_path / "out" / "rounds.md").read_text()


def test_simulate_progress_line_matches_the_report(tmp_path):
    """`fedspine simulate` shows, per finished round, the report's curve point and clock (not a missing key)."""
    from coordinator.simulate import round_progress

    rows = [_node(1, "b", 5.0, 0.50, sparsity=0.0), _node(1, "a", 10.0, 0.40, sparsity=0.05),
            {"kind": "round", "round": 1, "accepted": 2, "max_round_time_s": 10.0}]
    assert round_progress(rows[:2]) is None  # nodes reported, the round not yet closed
    rows += [_node(2, "a", 8.0, 0.60, sparsity=0.15), _node(2, "b", 7.0, 0.70, sparsity=0.10, steps=20),
             {"kind": "node", "round": 2, "node": "c", "status": "timeout", "m_test_accuracy": 0.0},
             {"kind": "round", "round": 2, "accepted": 2}, {"kind": "round", "round": "bad"}]
    rnd, line = round_progress(rows)
    _write(tmp_path / "m.jsonl", rows)
    r = analyse("fedspine", tmp_path / "m.jsonl")
    assert rnd == 2 and r.start_accuracy[2] == pytest.approx(0.65) and r.virtual_time_s == pytest.approx(18.0)
    # the timed-out node counts neither in the accuracy nor in the line; nodes in name order
    assert line == "accuracy at its start 0.650, virtual clock 18 s, a p=0.15 r=8 k=8, b p=0.10 r=8 k=20"


def test_the_evaluation_ratio_is_censored_and_undefined_when_the_base_model_met_the_target():
    from benchmarks.fleet.evaluate import ratio
    from coordinator.report import MethodResult

    def res(t, total=100.0):
        return MethodResult("m", time_to_target_s=t, virtual_time_s=total)

    assert ratio(res(60.0), res(30.0)) == (2.0, "")
    assert ratio(res(None, 90.0), res(30.0)) == (3.0, "≥")  # the baseline never got there: a lower bound
    assert ratio(res(60.0), res(None, 120.0)) == (0.5, "≤")
    assert ratio(res(None), res(None))[0] is None
    assert ratio(res(0.0), res(0.0)) == (None, "target met before training")  # every method on the floor


def test_the_size_bar_reports_the_whole_model_and_the_pruned_weights_and_judges_on_the_whole_model():
    """Against a dense baseline the bar's "≥ 30 % smaller" is judged on every parameter of the exported model,
    embeddings included; the share of the attention and FFN weights pruned (the sparsity) is reported beside it."""
    from benchmarks.fleet.evaluate import summary
    from coordinator.report import MethodResult

    def res(m, params, latency, sparsity):
        return MethodResult(m, final_accuracy=0.6, time_to_target_s=10.0, virtual_time_s=50.0, params=params,
                            latency_ms=latency, final_sparsity=sparsity, curve=[(10.0, 0.6)])

    judged = {"c1": {"results": {"fedspine": res("fedspine", 85, 1.0, 0.32),
                                 "fedlora": res("fedlora", 100, 1.5, 0.0)}}}
    lines, _ = summary([{"name": "c1"}], judged, {"target_share": 0.95})
    bar = next(x for x in lines if x.startswith("- vs fedlora"))
    assert "smaller by 15% (the whole model, embeddings included; its attention and FFN weights by 32%)" in bar
    assert ": not met" in bar  # 15 % of the whole model is short of 30 %, whatever the pruned share
