"""Hierarchical aggregation equals flat aggregation: regions' partial sums, applied at the root, give the same global
state as one coordinator aggregating every node's update (random fleets of mixed ranks, shapes and structures; the
mask-aware average and HetLoRA's zero padding)."""

import random

import pytest
import torch
from safetensors.torch import save as st_save

from coordinator.aggregation import GlobalLora, Partial, ZeroPadLora, load_state_bytes, merge
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError, UpdateLimits

ALPHA = 16.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the tensor's scale (entries near zero are compared with the scale)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def _subset(rng: random.Random, n: int) -> torch.Tensor:
    k = rng.randint(max(1, n // 2), n)
    return torch.tensor(sorted(rng.sample(range(n), k)))


def _fleet(seed: int, pool: int = 0):
    """A global state (or none), and nodes of random rank and structure with the slice each started from; with
    ``pool``, the pruned nodes' structures are drawn from that many (nodes alike, as in a real fleet)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"m{j}": (rng.randint(3, 14), rng.randint(3, 12)) for j in range(rng.randint(1, 3))}
    g = GlobalLora(min_keepers=rng.randint(1, 3))
    if rng.random() < 0.8:  # most rounds start from a global state; some are the first round
        g.load_tensors({**{f"delta.{n}": torch.randn(s, generator=gen) for n, s in shapes.items()},
                        "dense.head": torch.randn(3, generator=gen), "importance.0.heads": torch.rand(6, generator=gen)})
    nodes = []
    shared = [{n: (_subset(rng, s[0]), _subset(rng, s[1])) for n, s in shapes.items()} for _ in range(pool)]
    for _ in range(rng.randint(2, 12) * (3 if pool else 1)):
        rank = rng.choice([1, 2, 4, 6])
        pruned = rng.random() < 0.6
        structure = {n: (_subset(rng, s[0]), _subset(rng, s[1])) if pruned else (torch.arange(s[0]), torch.arange(s[1]))
                     for n, s in shapes.items()}
        if pruned and shared:
            structure = rng.choice(shared)
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


def _reference_partial(g: GlobalLora, pairs, starts, steps) -> dict[str, tuple[torch.Tensor, ...]]:
    """The partial sums by their definition, one node at a time: Σ w/τ·(ΔW − S) scattered, Σ w, Σ w·τ, keepers."""
    out = {}
    for name in {n for u, _ in pairs for n in u.modules}:
        shape = next(u.modules[name].shape for u, _ in pairs if name in u.modules)
        num, den, pace, keep = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))
        for (u, w), s, t in zip(pairs, starts, steps, strict=True):
            m = u.modules.get(name)
            if m is None or w <= 0:
                continue
            ix = (m.rows.unsqueeze(1), m.cols.unsqueeze(0))
            change = m.delta().double()
            if s is not None and name in s.modules:
                change -= s.modules[name].dense_delta().double()[ix]
            num[ix] += w / t * change
            den[ix] += w
            pace[ix] += w * t
            keep[ix] += 1
        out[f"lora.{name}"] = (num, den, pace, keep)
    for name in {n for u, _ in pairs for n in u.dense}:
        held = [(u.dense[name].double(), w, s, t) for (u, w), s, t in zip(pairs, starts, steps, strict=True)
                if name in u.dense and w > 0]
        base = g.dense[name].double() if name in g.dense else torch.zeros_like(held[0][0])
        out[f"dense.{name}"] = (sum(w / t * (x - (s.dense[name].double() if s is not None and name in s.dense
                                                  else base)) for x, w, s, t in held),)
    return out


def test_partial_sums_batched_per_structure_equal_their_per_node_definition():
    """``partial`` adds the nodes of one kept structure with one matmul of their concatenated factors; over random
    fleets whose pruned nodes share a few structures (and starts), its sums equal the per-node definition."""
    worst = 0.0
    for seed in range(40):
        _, g, nodes = _fleet(1000 + seed, pool=3)
        pairs, starts, steps = [(u, w) for u, w, _, _ in nodes], [s for *_, s, _ in nodes], [t for *_, t in nodes]
        part = g.partial(pairs, starts, steps)
        got = {**{f"lora.{n}": v for n, v in part.modules.items()}, **{f"dense.{n}": v[:1] for n, v in part.dense.items()}}
        ref = _reference_partial(g, pairs, starts, steps)
        assert got.keys() == ref.keys(), seed
        for k, parts in ref.items():
            for a, b in zip(got[k], parts, strict=True):
                worst = max(worst, _rel(a.double(), b))
        assert worst <= 1e-5, (seed, worst)
    print(f"max relative difference over 40 fleets: {worst:.2e}")


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


# ---- HetLoRA: zero padding ----------------------------------------------------------------------------------------
def _zero_pad_fleet(seed: int):
    """A ZeroPadLora padded to the largest rank of a random tier table, with a global state and momentum history from
    an earlier round (or none: the first round), and unpruned nodes of random tiers at their tier's rank."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"m{j}": (rng.randint(3, 14), rng.randint(3, 12)) for j in range(rng.randint(1, 3))}
    table = {tier: rng.choice([1, 2, 4, 6, 8, 12, 16]) for tier in ("agx", "nx", "tx2", "default")}
    z = ZeroPadLora(rank=max(table.values()), momentum=rng.choice([0.0, 0.5]))

    def nodes(count: int):
        out = []
        for _ in range(count):
            rank = table[rng.choice(list(table))]
            mods = {n: ModuleUpdate(A=torch.randn(rank, c, generator=gen), B=torch.randn(r, rank, generator=gen),
                                    rows=torch.arange(r), cols=torch.arange(c), shape=(r, c), scale=ALPHA / rank)
                    for n, (r, c) in shapes.items()}
            w = rng.choice([0.0, 1.0, 3.0, 17.5, 40.0]) if rng.random() < 0.1 else rng.uniform(1, 50)
            out.append((LoraUpdate(mods, {"head": torch.randn(3, generator=gen)}), w))
        return out

    if rng.random() < 0.8:  # an earlier round: a state and the momentum's velocity
        z.aggregate(nodes(rng.randint(1, 6)))
    return rng, z, nodes(rng.randint(2, 12))


def _copy_zp(z: ZeroPadLora) -> ZeroPadLora:
    out = ZeroPadLora(rank=z.rank, momentum=z.momentum.beta)
    out.load_tensors({k: v.clone() for k, v in {**z.state_tensors(), **z.momentum_tensors()}.items()})
    return out


def test_zero_padding_regions_partials_applied_at_the_root_equal_flat_aggregation_on_120_random_fleets():
    """HetLoRA under regions: each region loads the root's zero-padded state from its bytes (``load_state_bytes``),
    sums its nodes' factors padded to the fleet's padding rank and sends them as bytes; the root merges, divides and
    moves by the server momentum once.  That is flat ``ZeroPadLora.aggregate`` of every node, on 120 fleets of mixed
    tier ranks."""
    worst = 0.0
    for seed in range(120):
        rng, z, pairs = _zero_pad_fleet(5000 + seed)
        root = _copy_zp(z)
        wire = st_save(root.state_tensors()) if not root.empty else None  # what the root sends each region
        z.aggregate(pairs)
        regions = [[] for _ in range(rng.randint(1, 5))]  # some may be empty
        for i in range(len(pairs)):
            regions[rng.randrange(len(regions))].append(i)
        partials = []
        for members in regions:
            region = load_state_bytes(wire, UpdateLimits(), z.rank) if wire is not None else ZeroPadLora(rank=z.rank)
            part = region.partial([pairs[i] for i in members])
            partials.append(Partial.from_bytes(part.to_bytes()))
        for part in partials:
            root.check_partial(part)  # as the root does on receipt
        root.apply(partials)
        flat, hier = z.state_tensors(), root.state_tensors()
        assert flat.keys() == hier.keys() and flat, seed
        for k in flat:
            assert hier[k].shape == flat[k].shape, (seed, k)
            worst = max(worst, _rel(hier[k], flat[k]))
        for name in z.B:
            worst = max(worst, _rel(root.delta(name), z.delta(name)))
        assert worst <= 1e-5, (seed, worst)
    print(f"max relative difference over 120 zero-padding fleets: {worst:.2e}")


def test_zero_padding_is_the_weighted_average_of_the_padded_factors_and_pads_to_the_fleet_rank():
    """The split changes nothing of HetLoRA's maths: without momentum, one round is Σ w·√s·pad(B) / Σ w (A likewise)
    and the dense average, padded to the padding rank even where no node of the highest rank took part."""
    _, z, pairs = _zero_pad_fleet(11)
    z = ZeroPadLora(rank=z.rank, momentum=0.0)
    low = [(u, w) for u, w in pairs if max(m.rank for m in u.modules.values()) < z.rank] or pairs[:1]
    z.aggregate(low)
    total = sum(w for _, w in low)
    for name, (rows, cols) in z.shapes.items():
        B, A = torch.zeros(rows, z.rank), torch.zeros(z.rank, cols)
        for u, w in low:
            m = u.modules[name]
            B[:, : m.rank] += w / total * m.scale ** 0.5 * m.B
            A[: m.rank] += w / total * m.scale ** 0.5 * m.A
        assert z.B[name].shape == B.shape and torch.allclose(z.B[name], B, atol=1e-5)
        assert torch.allclose(z.A[name], A, atol=1e-5)
    head = sum(w * u.dense["head"] for u, w in low) / total
    assert torch.allclose(z.dense["head"], head, atol=1e-5)


def test_malformed_or_mismatched_zero_padding_partials_and_states_are_refused():
    _, z, pairs = _zero_pad_fleet(21)
    part = z.partial(pairs)
    name = next(iter(part.factors))
    B, A = part.factors[name]
    assert Partial.from_bytes(part.to_bytes()).kind == "zero_pad"
    narrow = Partial(changes=False, kind="zero_pad", nodes=part.nodes, steps=part.steps, weights=part.weights,
                     factors={name: (B[:, :-1], A[:-1])})
    with pytest.raises(UpdateError, match="padded to rank"):
        z.check_partial(Partial.from_bytes(narrow.to_bytes()))  # another padding rank: would not add
    with pytest.raises(UpdateError, match="one padding rank"):
        Partial.from_bytes(Partial(changes=False, kind="zero_pad", factors={name: (B, A[:-1])}).to_bytes())
    with pytest.raises(UpdateError, match="finite"):
        Partial.from_bytes(Partial(changes=False, kind="zero_pad", factors={name: (B * float("nan"), A)}).to_bytes())
    with pytest.raises(UpdateError, match="changes must be 0"):
        Partial.from_bytes(Partial(changes=True, kind="zero_pad").to_bytes())
    with pytest.raises(UpdateError, match="kind"):
        Partial.from_bytes(Partial(changes=False, kind="sum").to_bytes())
    with pytest.raises(UpdateError, match="unexpected tensor"):  # a mask-aware partial's tensors in a zero_pad one
        Partial.from_bytes(Partial(changes=False, kind="zero_pad", modules={
            name: tuple(torch.zeros(3, 3) for _ in range(4))}).to_bytes())
    with pytest.raises(UpdateError, match="nodes"):
        Partial.from_bytes(Partial(changes=False, kind="zero_pad", nodes=part.nodes + 1, steps=part.steps,
                                   weights=part.weights).to_bytes())
    with pytest.raises(UpdateError, match="mix"):
        merge([part, Partial(changes=False)])
    with pytest.raises(UpdateError, match="mask-aware"):
        GlobalLora().check_partial(part)
    with pytest.raises(UpdateError, match="zero-padding"):
        z.check_partial(Partial(changes=True))
    # The region's view of the root's state: the kind the round asks for, padded to exactly its rank
    z.aggregate(pairs)
    zp_state, avg_state = st_save(z.state_tensors()), st_save({"delta.m0": torch.ones(3, 3)})
    assert isinstance(load_state_bytes(zp_state, UpdateLimits(), z.rank), ZeroPadLora)
    with pytest.raises(UpdateError, match="zero_pad state's tensor, but the round asks for the average"):
        load_state_bytes(zp_state, UpdateLimits())
    with pytest.raises(UpdateError, match="average state's tensor, but the round asks for the zero_pad"):
        load_state_bytes(avg_state, UpdateLimits(), z.rank)
    with pytest.raises(UpdateError, match="padded to the round's zero_pad_rank"):
        load_state_bytes(zp_state, UpdateLimits(), z.rank + 1)
    with pytest.raises(UpdateError, match="without its zpB"):
        load_state_bytes(st_save({k: v for k, v in z.state_tensors().items() if not k.startswith("zpB.")}),
                         UpdateLimits(), z.rank)
    # An update the padding cannot hold, or pruned, is refused before it is summed
    big = {n: ModuleUpdate(A=torch.zeros(z.rank + 1, c), B=torch.zeros(r, z.rank + 1), rows=torch.arange(r),
                           cols=torch.arange(c), shape=(r, c), scale=1.0) for n, (r, c) in z.shapes.items()}
    with pytest.raises(UpdateError, match="exceeds the padding rank"):
        z.check(LoraUpdate(big))
