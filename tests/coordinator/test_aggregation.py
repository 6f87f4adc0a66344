"""Mixed-rank, mixed-structure aggregation against FedAvg, zero-padding and the SVD optimum."""

import pytest
import torch

from coordinator.aggregation import GlobalLora, ZeroPadLora, factorize
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate, UpdateError


def upd(rank, rows=None, cols=None, shape=(6, 5), seed=0, dense=None, alpha=16.0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(shape[0]) if rows is None else torch.tensor(rows)
    cols = torch.arange(shape[1]) if cols is None else torch.tensor(cols)
    m = ModuleUpdate(A=torch.randn(rank, len(cols), generator=g), B=torch.randn(len(rows), rank, generator=g),
                     rows=rows, cols=cols, shape=shape, scale=alpha / rank)
    return LoraUpdate({"q": m}, dense or {})


def fedavg(updates: list[tuple[LoraUpdate, float]], name: str) -> torch.Tensor:
    """The reference: plain FedAvg of the dense updates of one module (all nodes share the structure)."""
    total = sum(w for _, w in updates)
    return sum(w * u.modules[name].dense_delta() for u, w in updates) / total


def test_equals_fedavg_when_structure_and_rank_are_shared():
    ups = [(upd(4, seed=i, dense={"head": torch.full((2,), float(i))}), w) for i, w in enumerate([10.0, 30.0, 60.0])]
    g = GlobalLora()
    g.aggregate(ups)
    assert torch.allclose(g.delta["q"], fedavg(ups, "q"), atol=1e-5)
    assert torch.allclose(g.dense["head"], torch.full((2,), (0 * 10 + 1 * 30 + 2 * 60) / 100))


def test_coordinate_kept_by_one_node_is_not_shrunk_and_uncovered_keeps_previous():
    a = upd(2, rows=[0, 1, 2, 3, 4, 5], seed=1)
    b = upd(2, rows=[0, 1, 2], seed=2)  # pruned rows 3..5
    g = GlobalLora(min_keepers=1)  # the spec's rule
    g.aggregate([(a, 1.0), (b, 3.0)])
    da, db = a.modules["q"].dense_delta(), b.modules["q"].dense_delta()
    assert torch.allclose(g.delta["q"][3:], da[3:], atol=1e-5)  # only a kept rows 3..5: its value, unshrunk
    assert torch.allclose(g.delta["q"][:3], (da[:3] + 3 * db[:3]) / 4, atol=1e-5)
    prev = g.delta["q"].clone()
    g.aggregate([(b, 1.0)])  # nobody kept rows 3..5 this round: they keep the previous value
    assert torch.allclose(g.delta["q"][3:], prev[3:])
    assert torch.allclose(g.delta["q"][:3], db[:3], atol=1e-5)


def test_zero_padding_differs_from_the_average_of_updates_as_documented():
    lo, hi = upd(2, seed=3), upd(8, seed=4)
    g, z = GlobalLora(), ZeroPadLora()
    g.aggregate([(lo, 1.0), (hi, 1.0)])
    z.aggregate([(lo, 1.0), (hi, 1.0)])
    true = (lo.modules["q"].dense_delta() + hi.modules["q"].dense_delta()) / 2
    assert torch.allclose(g.delta["q"], true, atol=1e-5)
    # zero padding: ((B1+B2)/2)((A1+A2)/2) = (B1A1 + B2A2)/4 + cross terms
    s_lo, s_hi = lo.modules["q"].scale ** 0.5, hi.modules["q"].scale ** 0.5
    B1 = torch.nn.functional.pad(s_lo * lo.modules["q"].B, (0, 6))
    A1 = torch.nn.functional.pad(s_lo * lo.modules["q"].A, (0, 0, 0, 6))
    B2, A2 = s_hi * hi.modules["q"].B, s_hi * hi.modules["q"].A
    expected = (B1 @ A1 + B2 @ A2) / 4 + (B1 @ A2 + B2 @ A1) / 4
    assert torch.allclose(z.delta("q"), expected, atol=1e-4)
    assert (z.delta("q") - true).norm() > 0.1 * true.norm()
    with pytest.raises(UpdateError):
        z.aggregate([(upd(2, rows=[0, 1]), 1.0)])  # zero-padding cannot combine pruned structures


def test_slice_at_full_rank_is_exact_and_lower_rank_is_eckart_young():
    g = GlobalLora()
    g.aggregate([(upd(4, seed=5), 1.0), (upd(4, seed=6), 1.0)])
    full = g.delta["q"]
    rows, cols = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 2, 4])
    sl = g.slice_for({"q": (rows, cols)}, rank=3, alpha=16.0).modules["q"]
    target = full[rows.unsqueeze(1), cols.unsqueeze(0)]
    assert torch.allclose(sl.delta(), target, atol=1e-4)  # rank 3 >= min(4, 3): exact
    low = g.slice_for(None, rank=2, alpha=16.0).modules["q"]
    S = torch.linalg.svdvals(full.double())
    err = (low.delta().double() - full.double()).norm()
    assert err == pytest.approx(S[2:].square().sum().sqrt().item(), rel=1e-4)
    assert low.scale == pytest.approx(8.0) and low.rank == 2


def test_factorize_pads_missing_components_with_zeros():
    m = factorize(torch.ones(3, 2), torch.arange(3), torch.arange(2), (3, 2), rank=4, alpha=8.0)
    assert m.A.shape == (4, 2) and m.B.shape == (3, 4)
    assert torch.count_nonzero(m.A[1:]) == 0  # rank-1 matrix: components 2..4 are zero
    assert torch.allclose(m.delta(), torch.ones(3, 2), atol=1e-5)


def test_mismatched_shapes_are_rejected_once_the_global_exists():
    g = GlobalLora()
    g.aggregate([(upd(2), 1.0)])
    with pytest.raises(UpdateError):
        g.check(upd(2, shape=(7, 5)))
    with pytest.raises(UpdateError):
        g.check(LoraUpdate({"other": upd(2).modules["q"]}))


def test_randomized_svd_path_matches_the_exact_optimum_on_large_slices():
    g = torch.Generator().manual_seed(0)
    # rank 20 fits the oversampled subspace (8 + 16): exact; rank 30 plus noise does not: near-optimal
    noisy = torch.randn(400, 30, generator=g) @ torch.randn(30, 300, generator=g) + 0.01 * torch.randn(400, 300, generator=g)
    for delta in (torch.randn(400, 20, generator=g) @ torch.randn(20, 300, generator=g), noisy):
        m = factorize(delta, torch.arange(400), torch.arange(300), (400, 300), rank=8, alpha=16.0)
        S = torch.linalg.svdvals(delta.double())
        optimum = S[8:].square().sum().sqrt().item()
        err = (m.delta().double() - delta.double()).norm().item()
        assert optimum * (1 - 1e-6) <= err <= optimum * 1.001 + 1e-6  # factors are stored in float32


def _from_delta(delta, rank, rows=None, cols=None, alpha=16.0):
    rows = torch.arange(delta.shape[0]) if rows is None else torch.tensor(rows)
    cols = torch.arange(delta.shape[1]) if cols is None else torch.tensor(cols)
    return LoraUpdate({"q": factorize(delta[rows.unsqueeze(1), cols.unsqueeze(0)], rows, cols,
                                      tuple(delta.shape), rank, alpha)})


def test_a_node_that_changed_nothing_leaves_the_global_unchanged_whatever_its_rank():
    g = GlobalLora()
    g.aggregate([(upd(4, seed=7), 1.0), (upd(4, seed=8), 1.0)])  # rank up to 5 (the shape's limit)
    before = g.delta["q"].clone()
    start = g.slice_for(None, rank=2, alpha=16.0)  # a rank-2 node receives the best rank-2 view of it
    assert (start.modules["q"].dense_delta() - before).norm() > 0.1 * before.norm()
    g.aggregate([(start, 1.0)], starts=[start])  # ... and sends it back untouched
    assert torch.allclose(g.delta["q"], before, atol=1e-5)
    g2 = GlobalLora()
    g2.load_tensors({"delta.q": before})
    g2.aggregate([(start, 1.0)])  # averaging states instead: the global collapses to rank 2
    assert torch.linalg.matrix_rank(g2.delta["q"]) == 2


def test_changes_are_averaged_on_top_of_the_global_with_coverage_weights():
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(6, 5, generator=gen) @ torch.randn(5, 5, generator=gen)  # full rank 5
    g = GlobalLora(min_keepers=1)  # the spec's rule
    g.load_tensors({"delta.q": G.clone()})
    s_lo = g.slice_for(None, rank=2, alpha=16.0)  # node a: rank 2, all rows
    s_hi = g.slice_for({"q": (torch.arange(3), torch.arange(5))}, rank=4, alpha=16.0)  # node b: rows 0..2, rank 4
    d_a, d_b = 0.1 * torch.randn(6, 5, generator=gen), 0.1 * torch.randn(6, 5, generator=gen)
    # what each node trained: its start plus a change of its own rank (exact factors of start + change)
    fin_a = _from_delta(s_lo.modules["q"].dense_delta() + d_a, rank=5)
    fin_b = _from_delta(s_hi.modules["q"].dense_delta() + d_b, rank=5, rows=[0, 1, 2])
    g.aggregate([(fin_a, 1.0), (fin_b, 3.0)], starts=[s_lo, s_hi])
    want = G.clone()
    want[:3] += (d_a[:3] + 3 * d_b[:3]) / 4  # rows both kept: weighted mean of the changes
    want[3:] += d_a[3:]  # rows only a kept: a's change, unshrunk
    assert torch.allclose(g.delta["q"], want, atol=1e-4)


def test_starts_must_match_the_updates():
    with pytest.raises(ValueError):
        GlobalLora().aggregate([(upd(2), 1.0)], starts=[])


def _imp(idx, score, size=6):
    return {"0.channels": GroupScores(idx=torch.tensor(idx), score=torch.tensor(score), size=size)}


def test_fleet_importance_is_a_coverage_weighted_average_carried_by_every_slice():
    a = LoraUpdate(upd(2).modules, {}, _imp([0, 1, 2, 3, 4, 5], [0.6, 0.0, 0.0, 0.0, 0.0, 0.8]))
    b = LoraUpdate(upd(2, seed=1).modules, {}, _imp([0, 1, 5], [1.0, 0.0, 0.0]))  # b pruned channels 2..4
    g = GlobalLora()
    g.aggregate([(a, 1.0), (b, 3.0)], starts=[None, None])
    got = g.fleet_importance()["0.channels"]
    assert got.idx.tolist() == [0, 1, 2, 3, 4, 5] and got.size == 6
    want = torch.tensor([(0.6 + 3 * 1.0) / 4, 0.0, 0.0, 0.0, 0.0, 0.8 / 4])  # 2..4: only a scored them, unshrunk
    assert torch.allclose(got.score, want)
    for sl in (g.slice_for(None, 2, 16.0), g.slice_for({"q": (torch.arange(3), torch.arange(5))}, 2, 16.0)):
        assert torch.allclose(sl.importance["0.channels"].score, want)  # the same fleet view for every node
        assert LoraUpdate.from_bytes(sl.to_bytes()).importance.keys() == {"0.channels"}
    g.aggregate([(LoraUpdate(upd(2).modules, {}, _imp([5], [0.2])), 1.0)])  # nobody else scored: keep the rest
    assert torch.allclose(g.fleet_importance()["0.channels"].score, torch.cat([want[:5], torch.tensor([0.2])]))
    restored = GlobalLora()
    restored.load_tensors(g.state_tensors())  # the checkpoint keeps it
    assert torch.equal(restored.fleet_importance()["0.channels"].score, g.fleet_importance()["0.channels"].score)
    with pytest.raises(UpdateError, match="importance.0.channels"):
        g.check(LoraUpdate(upd(2).modules, {}, _imp([0], [1.0], size=7)))


def test_importance_on_the_wire_is_validated():
    good = LoraUpdate(upd(2).modules, {}, _imp([0, 2], [0.5, 0.1]))
    assert torch.equal(LoraUpdate.from_bytes(good.to_bytes()).importance["0.channels"].idx, torch.tensor([0, 2]))
    bad = [_imp([0, 2], [0.5, float("nan")]), _imp([0, 2], [0.5, -0.1]), _imp([2, 0], [0.5, 0.1]),
           _imp([0, 6], [0.5, 0.1]), _imp([0, 2], [0.5]), {"x.heads": _imp([0], [1.0])["0.channels"]},
           {"0.ffn": _imp([0], [1.0])["0.channels"]}]
    for imp in bad:
        with pytest.raises(UpdateError, match="importance"):
            LoraUpdate.from_bytes(LoraUpdate(upd(2).modules, {}, imp).to_bytes())


def test_changes_are_averaged_per_local_step_when_nodes_ran_different_steps():
    """FedNova's normalisation: a node that ran 4x the steps moves the average no further per step."""
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(6, 5, generator=gen)
    full, part = {"q": (torch.arange(6), torch.arange(5))}, {"q": (torch.arange(3), torch.arange(5))}
    a, b = 0.1 * torch.randn(6, 5, generator=gen), 0.1 * torch.randn(6, 5, generator=gen)  # per-step changes

    def run(steps):
        g = GlobalLora(min_keepers=1)  # the spec's rule
        g.load_tensors({"delta.q": G.clone(), "dense.head": torch.zeros(2)})
        s_a, s_b = g.slice_for(full, 5, 16.0), g.slice_for(part, 5, 16.0)
        fin_a = LoraUpdate(_from_delta(G + 4 * a, rank=5).modules, {"head": torch.full((2,), 4.0)})  # 4 steps
        fin_b = LoraUpdate(_from_delta(G + b, rank=5, rows=[0, 1, 2]).modules, {"head": torch.full((2,), 1.0)})
        g.aggregate([(fin_a, 1.0), (fin_b, 1.0)], starts=[s_a, s_b], steps=steps)
        return g

    g = run([4, 1])
    tau_eff = (4 + 1) / 2  # the weighted mean steps of the nodes that kept rows 0..2
    assert torch.allclose(g.delta["q"][:3], G[:3] + tau_eff * (a[:3] + b[:3]) / 2, atol=1e-4)
    assert torch.allclose(g.delta["q"][3:], G[3:] + 4 * a[3:], atol=1e-4)  # a alone kept them: its whole change
    assert torch.allclose(g.dense["head"], torch.full((2,), tau_eff * (4 / 4 + 1 / 1) / 2))
    plain = run(None)  # without steps: the plain average of the changes, dominated by the node that ran longer
    assert torch.allclose(plain.delta["q"][:3], G[:3] + (4 * a[:3] + b[:3]) / 2, atol=1e-4)
    same = run([3, 3])  # equal steps: the same as no steps
    assert torch.allclose(same.delta["q"], plain.delta["q"], atol=1e-5)
    assert torch.allclose(same.dense["head"], plain.dense["head"])
    with pytest.raises(ValueError, match="steps"):
        GlobalLora().aggregate([(upd(2), 1.0)], starts=[None], steps=[0])


def test_min_keepers_changes_only_coordinates_enough_nodes_kept():
    gen = torch.Generator().manual_seed(6)
    G = torch.randn(6, 5, generator=gen)
    kept = {"a": list(range(6)), "b": [0, 1, 2], "c": [0, 1, 2, 3]}  # rows 4, 5: only a; row 3: a and c
    d = {n: 0.1 * torch.randn(6, 5, generator=gen) for n in kept}

    def run(min_keepers, nodes=("a", "b", "c")):
        g = GlobalLora(min_keepers=min_keepers)
        g.load_tensors({"delta.q": G.clone()})
        starts = [g.slice_for({"q": (torch.tensor(kept[n]), torch.arange(5))}, 5, 16.0) for n in nodes]
        fins = [_from_delta(G + d[n], rank=5, rows=kept[n]) if n != "a" else _from_delta(G + d[n], rank=5)
                for n in nodes]
        g.aggregate([(f, 1.0) for f in fins], starts=starts)
        return g.delta["q"]

    spec, two = run(1), run(2)
    assert torch.allclose(spec[4:], G[4:] + d["a"][4:], atol=1e-4)  # the spec's rule: a's step alone
    assert torch.allclose(two[4:], G[4:], atol=1e-5)  # one keeper < 2: the coordinate keeps its value
    assert torch.allclose(two[3], G[3] + (d["a"][3] + d["c"][3]) / 2, atol=1e-4)  # two keepers: their mean
    assert torch.allclose(two[:3], G[:3] + (d["a"][:3] + d["b"][:3] + d["c"][:3]) / 3, atol=1e-4)
    assert torch.allclose(two[:4], spec[:4], atol=1e-5)  # where enough nodes kept it, nothing differs
    alone = run(2, nodes=("b",))  # a round with one node still learns: at most the round's node count is needed
    assert torch.allclose(alone[:3], G[:3] + d["b"][:3], atol=1e-4) and torch.allclose(alone[3:], G[3:])
    with pytest.raises(ValueError, match="min_keepers"):
        GlobalLora(min_keepers=0)


def test_the_leading_components_of_a_higher_rank_slice_are_the_slice_at_the_lower_rank():
    """What a node trains from when it is sent the slice at the deployed rank: its first
    r components, which for FedSpine are the best rank-r approximation and for HetLoRA its first r padded ones."""
    g = torch.Generator().manual_seed(3)
    spectrum = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25] + [0.1] * 12)  # rank 20, distinct values
    u, _ = torch.linalg.qr(torch.randn(400, 20, generator=g))
    v, _ = torch.linalg.qr(torch.randn(300, 20, generator=g))
    fed = GlobalLora()
    fed.delta["q"] = (u * spectrum) @ v.T
    deployed, low = fed.slice_for(None, 16, 16.0), fed.slice_for(None, 4, 16.0)
    lead = deployed.leading(4)
    assert (deployed.rank, lead.rank, deployed.leading(16) is deployed) == (16, 4, True)
    assert lead.modules["q"].scale == deployed.modules["q"].scale  # same scale: the product of those components
    assert torch.allclose(lead.modules["q"].delta(), low.modules["q"].delta(), atol=1e-4)
    assert (lead.modules["q"].delta() - deployed.modules["q"].delta()).norm() > 1.0  # and not the rank-16 one
    start = fed.start_for(None, 4, 16, 16.0)  # what the coordinator subtracts: shared by nodes alike
    assert start is fed.start_for(None, 4, 16, 16.0) and torch.equal(start.modules["q"].A, lead.modules["q"].A)
    assert fed.start_for(None, 16, 16, 16.0) is deployed
    zp = ZeroPadLora()
    zp.aggregate([(upd(16, seed=1, shape=(12, 10)), 1.0), (upd(8, seed=2, shape=(12, 10)), 3.0)])
    for r in (4, 8):
        assert torch.allclose(zp.slice_for(16, 16.0).leading(r).modules["q"].delta(),
                              zp.slice_for(r, 16.0).modules["q"].delta(), atol=1e-5)


def _round(g, change, head_change):
    """One node, unpruned, at full rank: it starts from the global slice and adds ``change`` (and to the head)."""
    s = g.slice_for(None, rank=5, alpha=16.0)
    start = s.modules["q"].dense_delta() if s is not None else torch.zeros(6, 5)
    head = s.dense["head"] if s is not None else torch.zeros(2)
    fin = _from_delta(start + change, rank=5)
    fin.dense["head"] = head + head_change
    g.aggregate([(fin, 1.0)], starts=[s], steps=[8])


def test_momentum_keeps_a_persistent_direction_and_damps_one_that_flips():
    gen = torch.Generator().manual_seed(11)
    d = torch.randn(6, 5, generator=gen)
    steady = GlobalLora(momentum=0.5)
    for k in range(1, 5):  # the same change every round: the global moves by all of it each round
        _round(steady, d, torch.ones(2))
        assert torch.allclose(steady.delta["q"], k * d, atol=1e-4)
        assert torch.allclose(steady.dense["head"], torch.full((2,), float(k)), atol=1e-5)
    moves = {}
    for beta in (0.0, 0.5):
        g = GlobalLora(momentum=beta)
        before, moves[beta] = torch.zeros(6, 5), []
        for k in range(8):  # a change that flips sign every round
            _round(g, d if k % 2 == 0 else -d, torch.zeros(2))
            moves[beta].append(float((g.delta["q"] - before).norm() / d.norm()))
            before = g.delta["q"].clone()
    assert moves[0.0] == pytest.approx([1.0] * 8, rel=1e-4)  # without momentum: every flip in full
    assert moves[0.5][0] == pytest.approx(1.0, rel=1e-4)  # round 1 moves by its change exactly (bias correction)
    assert moves[0.5][-1] == pytest.approx(1 / 3, rel=0.05)  # then (1 - β)/(1 + β) of it


def test_momentum_survives_a_checkpoint_and_stays_out_of_the_regions_state():
    gen = torch.Generator().manual_seed(12)
    changes = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    a = GlobalLora()
    for c in changes[:2]:
        _round(a, c, torch.ones(2))
    assert not any(k.startswith("velocity") for k in a.state_tensors())  # what a region is sent
    b = GlobalLora()
    b.load_tensors({**a.state_tensors(), **a.momentum_tensors()})  # what the checkpoint holds
    fresh = GlobalLora()
    fresh.load_tensors(a.state_tensors())  # without the optimiser's state the next round differs
    for g in (a, b, fresh):
        _round(g, changes[2], torch.ones(2))
    assert torch.equal(a.delta["q"], b.delta["q"]) and torch.equal(a.dense["head"], b.dense["head"])
    assert not torch.allclose(a.delta["q"], fresh.delta["q"], atol=1e-3)


def test_zero_padding_moves_by_the_same_momentum():
    a, b = upd(2, seed=5, dense={"head": torch.ones(2)}), upd(2, seed=6, dense={"head": -torch.ones(2)})
    z, plain = ZeroPadLora(), ZeroPadLora(momentum=0.0)
    for g in (z, plain):
        g.aggregate([(a, 1.0)])
    assert torch.equal(z.delta("q"), plain.delta("q"))  # round 1: the average itself
    for g in (z, plain):
        g.aggregate([(b, 1.0)])
    # v1 = (1 - β)·s_a, v2 = β·v1 + (1 - β)(s_b - s_a); the state moves from s_a by v2 / (1 - β²): (2 s_a + 2 s_b) / 3
    for key in ("B", "A"):
        s_a, s_b = (getattr(u.modules["q"], key) * u.modules["q"].scale ** 0.5 for u in (a, b))
        assert torch.allclose(getattr(plain, key)["q"], s_b, atol=1e-6)
        assert torch.allclose(getattr(z, key)["q"], 2 * (s_a + s_b) / 3, atol=1e-5)
    assert torch.allclose(z.dense["head"], torch.zeros(2), atol=1e-6)
    restored = ZeroPadLora()
    restored.load_tensors({**z.state_tensors(), **z.momentum_tensors()})
    for g in (z, restored):
        g.aggregate([(a, 1.0)])
    assert torch.equal(z.delta("q"), restored.delta("q"))


def test_zero_padding_pads_to_its_rank_and_resumes_a_narrower_checkpoint_padded():
    """Padded to a fixed rank, the state keeps its width when a round has no node of the top rank (its higher
    components move on by the momentum instead of vanishing); a checkpoint whose factors are as wide as their round's
    largest rank (written before the padding rank) loads zero-padded, and the next rounds are the same."""
    a, b = upd(2, seed=7, dense={"head": torch.ones(2)}), upd(4, seed=8, dense={"head": torch.zeros(2)})
    fixed = ZeroPadLora(rank=8)
    fixed.aggregate([(a, 1.0), (b, 1.0)])
    top = fixed.B["q"][:, 2:4].clone()
    fixed.aggregate([(a, 1.0)])  # no rank-4 node this round
    assert fixed.B["q"].shape == (6, 8)
    assert torch.allclose(fixed.B["q"][:, 2:4], 2 * top / 3, atol=1e-6)  # moved toward 0 by the momentum, not cut
    old = ZeroPadLora()  # as wide as the round's largest rank
    old.aggregate([(a, 1.0)])
    assert old.B["q"].shape == (6, 2)
    resumed = ZeroPadLora(rank=8)
    resumed.load_tensors({**old.state_tensors(), **old.momentum_tensors()})
    assert resumed.B["q"].shape == (6, 8) and resumed.A["q"].shape == (8, 5)
    assert resumed.momentum.velocity["B.q"].shape == (6, 8) and resumed.momentum.velocity["A.q"].shape == (8, 5)
    assert torch.equal(resumed.delta("q"), old.delta("q"))
    for g in (old, resumed):
        g.aggregate([(a, 2.0), (upd(2, seed=9), 1.0)])
    assert torch.allclose(resumed.delta("q"), old.delta("q"), atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the padding rank"):
        ZeroPadLora(rank=1).load_tensors(old.state_tensors())
