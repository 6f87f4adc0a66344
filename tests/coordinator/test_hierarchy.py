"""Hierarchical aggregation equals flat aggregation: regions' partial sums, applied at the root, give the same global
state as one coordinator aggregating every node's update (random fleets of mixed ranks, shapes and structures)."""

import random

import pytest
import torch

from coordinator.aggregation import GlobalLora, Partial, merge
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError

ALPHA = 16.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the tensor's scale (entries near zero are compared with the scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _subset(rng: random.Random, n: int) -> torch.Tensor:
    k = rng.randint(max(1, n // 2), n)
    return torch.tensor(sorted(rng.sample(range(n), k)))


def _fleet(seed: int):
    """A global state (or none), and nodes of random rank and structure with the slice each started from."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"m{j}": (rng.randint(3, 14), rng.randint(3, 12)) for j in range(rng.randint(1, 3))}
    g = GlobalLora(min_keepers=rng.randint(1, 3))
    if rng.random() < 0.8:  # most rounds start from a global state; some are the first round
        g.load_tensors({**{f"delta.{n}": torch.randn(s, generator=gen) for n, s in shapes.items()},
                        "dense.head": torch.randn(3, generator=gen), "importance.0.heads": torch.rand(6, generator=gen)})
    nodes = []
    for _ in range(rng.randint(2, 12)):
        rank = rng.choice([1, 2, 4, 6])
        pruned = rng.random() < 0.6
        structure = {n: (_subset(rng, s[0]), _subset(rng, s[1])) if pruned else (torch.arange(s[0]), torch.arange(s[1]))
                     for n, s in shapes.items()}
        mods = {n: ModuleUpdate(A=torch.randn(rank, len(c), generator=gen), B=torch.randn(len(r), rank, generator=gen),
                                rows=r, cols=c, shape=shapes[n], scale=ALPHA / rank) for n, (r, c) in structure.items()}
        idx = _subset(rng, 6)
        imp = {"0.heads": GroupScores(idx=idx, score=torch.rand(len(idx), generator=gen), size=6)}
        update = LoraUpdate(mods, {"head": torch.randn(3, generator=gen)}, imp)
        start = g.slice_for(structure, rank, ALPHA)
        nodes.append((update, rng.choice([0.0, 1.0, 3.0, 17.5, 40.0]) if rng.random() < 0.1 else rng.uniform(1, 50),
                      start, rng.randint(1, 20)))
    return rng, g, nodes


def _copy(g: GlobalLora) -> GlobalLora:
    out = GlobalLora(min_keepers=g.min_keepers)
    out.load_tensors({k: v.clone() for k, v in g.state_tensors().items()})
    return out


def _states(g: GlobalLora) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in g.state_tensors().items()}


def test_regions_partials_applied_at_the_root_equal_flat_aggregation_on_120_random_fleets():
    worst = 0.0
    for seed in range(120):
        rng, g, nodes = _fleet(seed)
        root = _copy(g)
        with_starts = rng.random() < 0.9
        pairs = [(u, w) for u, w, _, _ in nodes]
        starts = [s for _, _, s, _ in nodes] if with_starts else None
        steps = [t for _, _, _, t in nodes] if with_starts else None
        g.aggregate(pairs, starts=starts, steps=steps)
        # Split the nodes over 1-5 regions (some may be empty); each region computes its partial from the same
        # global state, sends it as bytes, and the root applies them all.
        regions = [[] for _ in range(rng.randint(1, 5))]
        for i in range(len(nodes)):
            regions[rng.randrange(len(regions))].append(i)
        region_state = _copy(root)
        partials = []
        for members in regions:
            part = region_state.partial([pairs[i] for i in members],
                                        [starts[i] for i in members] if starts else None,
                                        [steps[i] for i in members] if steps else None)
            partials.append(Partial.from_bytes(part.to_bytes()))
        root.apply(partials)
        flat, hier = _states(g), _states(root)
        assert flat.keys() == hier.keys(), seed
        for k in flat:
            worst = max(worst, _rel(hier[k], flat[k]))
        assert worst <= 1e-5, (seed, worst)
    print(f"max relative difference over 120 fleets: {worst:.2e}")


def test_a_region_of_regions_merges_partials_and_one_partial_is_flat_aggregation():
    _, g, nodes = _fleet(7)
    root = _copy(g)
    pairs, starts, steps = [(u, w) for u, w, _, _ in nodes], [s for *_, s, _ in nodes], [t for *_, t in nodes]
    g.aggregate(pairs, starts=starts, steps=steps)
    parts = [root.partial(pairs[i:i + 1], starts[i:i + 1], steps[i:i + 1]) for i in range(len(pairs))]
    merged = merge([merge(parts[:3]), merge(parts[3:])])
    assert merged.nodes == sum(1 for _, w in pairs if w > 0)
    root.apply([merged])
    for k, v in _states(g).items():
        assert _rel(_states(root)[k], v) <= 1e-5


def test_malformed_or_disagreeing_partials_are_refused():
    _, g, nodes = _fleet(3)
    part = g.partial([(u, w) for u, w, _, _ in nodes], [s for *_, s, _ in nodes], [t for *_, t in nodes])
    data = part.to_bytes()
    with pytest.raises(UpdateError):
        Partial.from_bytes(data[:-7])
    with pytest.raises(UpdateError):
        Partial.from_bytes(b"not a partial at all")
    name = next(iter(part.modules))
    num, den, pace, keepers = part.modules[name]
    bad = Partial(changes=True, nodes=part.nodes, steps=part.steps, weights=part.weights,
                  modules={**part.modules, name: (num, -den, pace, keepers)})
    with pytest.raises(UpdateError, match=">= 0"):
        Partial.from_bytes(bad.to_bytes())
    nan = Partial(changes=True, nodes=part.nodes, steps=part.steps, weights=part.weights,
                  modules={**part.modules, name: (num * float("nan"), den, pace, keepers)})
    with pytest.raises(UpdateError, match="finite"):
        Partial.from_bytes(nan.to_bytes())
    miscounted = Partial(changes=True, nodes=part.nodes + 1, steps=part.steps, weights=part.weights)
    with pytest.raises(UpdateError, match="nodes"):
        Partial.from_bytes(miscounted.to_bytes())
    with pytest.raises(UpdateError, match="mix"):
        merge([part, Partial(changes=False)])
    wrong = Partial(changes=True, nodes=1, steps=[1.0], weights=[1.0],
                    modules={name: tuple(torch.zeros(num.shape[0] + 1, num.shape[1]) for _ in range(4))})
    if not g.empty:
        with pytest.raises(UpdateError, match="shape"):
            g.apply([wrong])
