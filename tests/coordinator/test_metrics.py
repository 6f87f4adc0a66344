"""Metrics: JSONL records (one per node and round, one per round, one per export) and the summary table."""

import json

import pytest

from coordinator.metrics import MetricsWriter, summarize
from shared.messages import ExportReport


def _write_run(path):
    w = MetricsWriter(path)
    for rnd, times in ((1, (2.0, 4.0)), (2, (3.0, 3.0))):
        for i, t in enumerate(times):
            w.node_round({"round": rnd, "node": f"n{i}", "method": "fedspine", "status": "ok", "loss_end": 1.0 / rnd + i,
                          "m_test_accuracy": 0.5 + 0.1 * rnd, "sparsity": 0.1 * rnd, "round_time_s": t,
                          "upload_bytes": 500_000, "reward": float("nan")})
        w.node_round({"round": rnd, "node": "n9", "method": "fedspine", "status": "timeout"})
        w.round_summary({"round": rnd, "method": "fedspine", "participants": 3, "accepted": 2,
                         "idle_fraction": 0.25 if rnd == 1 else 0.0})
    for _ in range(2):  # a restart that evaluated and exported again is reported once
        w.node_round({"round": 2, "final": True, "node": "n0", "method": "fedspine", "status": "ok",
                      "eval_only": True, "sparsity": 0.2, "m_test_accuracy": 0.9})
        w.export(ExportReport(run_id="r", node_id="n0", status="ok", path="/x", size_bytes=3_000_000, params=10,
                              sparsity=0.2, latency_ms=4.5, metrics={"accuracy": 0.88, "examples": 64,
                                                                     "test_accuracy": 0.9, "test_examples": 32}))
    w.close()
    w.close()  # idempotent


def test_jsonl_records_are_valid_json_with_kind_and_no_nan(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    _write_run(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in rows].count("node") == 8
    assert [r["kind"] for r in rows].count("round") == 2 and rows[-1]["kind"] == "export"
    assert all(isinstance(r["ts"], float) for r in rows)
    assert rows[0]["reward"] is None  # non-finite floats become null, so every line stays strict JSON
    assert rows[-1]["metrics"]["accuracy"] == pytest.approx(0.88) and rows[-1]["size_bytes"] == 3_000_000
    assert rows[-1]["run_id"] == "r"


def test_writer_appends_across_restarts(tmp_path):
    path = tmp_path / "m.jsonl"
    for rnd in (1, 2):
        w = MetricsWriter(path)
        w.round_summary({"round": rnd, "method": "fedlora"})
        w.close()
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [1, 2]


def test_summary_table_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_run(path)
    lines = summarize(path).splitlines()
    assert lines[0].split() == ["method", "round", "accepted", "idle", "loss_end", "test_acc", "sparsity", "up_MB"]
    r1, r2 = lines[1].split(), lines[2].split()
    # round 1: two accepted nodes, loss_end mean (1 + 2)/2, accuracy 0.6, 2 x 0.5 MB uploaded; the timeout is skipped
    assert r1 == ["fedspine", "1", "2", "25.0%", "1.5000", "0.600", "0.100", "1.000"]
    # the eval-only final sync of round 2 does not count into round 2's training figures
    assert r2 == ["fedspine", "2", "2", "0.0%", "1.0000", "0.700", "0.200", "1.000"]
    assert lines[3] == "final evaluation (round 2 final aggregate): 1 nodes, test accuracy 0.900, sparsity 0.200"
    assert lines[4].startswith("test accuracy: each node's first [train] test_batches batches of its test_path")
    # the export's test accuracy is the final evaluation's (same model, same examples); the whole file is named
    assert lines[5] == "export n0: ok 3.0 MB, 4.5 ms, sparsity 0.20, test accuracy 0.900, whole test file " \
                       "(64 examples) 0.880"
    assert len(lines) == 6


def test_summary_of_a_causal_lm_run_shows_perplexity(tmp_path):
    """A causal LM reports perplexity and no accuracy: the table shows the perplexity, not a column of nan."""
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for i, ppl in enumerate((40.0, 30.0)):
        w.node_round({"round": 1, "node": f"n{i}", "method": "fedspine", "status": "ok", "loss_end": 3.5,
                      "m_test_perplexity": ppl, "m_test_loss": 3.5, "sparsity": 0.1, "upload_bytes": 1_000_000})
    w.round_summary({"round": 1, "method": "fedspine", "accepted": 2, "idle_fraction": 0.0})
    w.node_round({"round": 2, "node": "n0", "method": "fedspine", "status": "ok", "eval_only": True,
                  "sparsity": 0.3, "m_test_perplexity": 33.5})
    w.export(ExportReport(run_id="r", node_id="n0", status="ok", path="/x", size_bytes=100_000, params=10,
                          sparsity=0.3, latency_ms=2.0, metrics={"loss": 3.4, "perplexity": 33.5}))
    w.close()
    lines = summarize(path).splitlines()
    assert lines[0].split()[5] == "test_ppl"
    assert lines[1].split() == ["fedspine", "1", "2", "0.0%", "3.5000", "35.00", "0.100", "2.000"]
    assert lines[2] == "final evaluation (final aggregate): 1 nodes, test perplexity 33.50, sparsity 0.300"
    assert lines[4] == "export n0: ok 0.1 MB, 2.0 ms, sparsity 0.30, test perplexity nan, whole test file " \
                       "(0 examples) 33.50"
