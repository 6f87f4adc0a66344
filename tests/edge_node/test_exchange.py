"""Exchange in unpruned coordinates: build, wire round trip, coordinator-style dense round trip, slicing, errors."""

from __future__ import annotations

import pytest
import torch

from edge_node.exchange import apply_update, build_update
from edge_node.model import lora_layers, task_head_params
from edge_node.pruning import apply_plan, kept_maps, module_maps, plan_prune
from shared.updates import LoraUpdate, ModuleUpdate, UpdateError
from tests.edge_node.tiny import load_lora_model, random_batch


def _scores(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {i: (torch.rand(len(k.heads), generator=gen), torch.rand(len(k.channels), generator=gen))
            for i, k in kept_maps(model).items()}


def _pruned(kind="llama", task="causal_lm", target=0.4, seed=0, rank=4):
    model = load_lora_model(kind, task, rank=rank, seed=seed)
    apply_plan(model, plan_prune(model, target, _scores(model, seed)))
    return model


def _local_deltas(model):
    return {n: float(lay.scaling["default"]) * lay.lora_B["default"].weight @ lay.lora_A["default"].weight
            for n, lay in lora_layers(model).items()}


def _coordinator_style(update: LoraUpdate) -> LoraUpdate:
    """What an aggregator holds: the dense unpruned delta, here as an exact full-coordinate factorisation."""
    modules = {}
    for name, m in update.modules.items():
        dense = m.dense_delta()
        modules[name] = ModuleUpdate(A=torch.eye(m.shape[1]), B=dense, rows=torch.arange(m.shape[0]),
                                     cols=torch.arange(m.shape[1]), shape=m.shape, scale=1.0)
    return LoraUpdate(modules=modules, dense=dict(update.dense))


@pytest.mark.parametrize(("kind", "task"), [("bert", "seq_cls"), ("llama", "causal_lm")])
def test_update_uses_unpruned_coordinates_and_survives_the_wire(kind, task):
    model = _pruned(kind, task)
    update = build_update(model)
    maps = module_maps(model)
    assert set(update.modules) == set(lora_layers(model))
    for name, m in update.modules.items():
        rows, cols, shape = maps[name]
        assert torch.equal(m.rows, rows) and torch.equal(m.cols, cols) and m.shape == shape
        torch.testing.assert_close(m.delta(), _local_deltas(model)[name].detach())
    if task == "seq_cls":
        assert set(update.dense) == set(task_head_params(model))
    decoded = LoraUpdate.from_bytes(update.to_bytes())
    for name, m in update.modules.items():
        d = decoded.modules[name]
        assert torch.equal(d.A, m.A) and torch.equal(d.B, m.B) and torch.equal(d.rows, m.rows)
    # llama GQA: removing KV group g removes query heads 2g and 2g+1 and rows of k/v for group g only
    if kind == "llama":
        kept = kept_maps(model)[0]
        q = update.modules["model.layers.0.self_attn.q_proj"]
        k = update.modules["model.layers.0.self_attn.k_proj"]
        assert q.rows.tolist() == [h * 8 + j for g in kept.heads for h in (2 * g, 2 * g + 1) for j in range(8)]
        assert k.rows.tolist() == [g * 8 + j for g in kept.heads for j in range(8)]


def test_dense_round_trip_is_exact_and_restores_outputs():
    node = _pruned("bert", "seq_cls", seed=1)
    update = build_update(node)
    twin = _pruned("bert", "seq_cls", seed=1)  # same structure, different LoRA state after this
    with torch.no_grad():
        for layer in lora_layers(twin).values():
            layer.lora_B["default"].weight.zero_()
        for p in task_head_params(twin).values():
            p.zero_()
    apply_update(twin, _coordinator_style(update), rank=4, alpha=8.0)
    theirs, ours = _local_deltas(twin), _local_deltas(node)
    for name in ours:
        assert (theirs[name] - ours[name]).abs().max().item() <= 1e-5
    batch = random_batch()
    torch.testing.assert_close(twin(**batch).logits, node(**batch).logits, atol=1e-5, rtol=0)


def test_apply_slices_to_a_differently_pruned_node_and_truncates_rank():
    source = load_lora_model("llama", "causal_lm", rank=6, seed=2)  # unpruned, rank 6
    update = build_update(source)
    target = _pruned("llama", "causal_lm", target=0.5, seed=3)
    apply_update(target, update, rank=6, alpha=8.0)
    maps = module_maps(target)
    for name, delta in _local_deltas(target).items():
        rows, cols, _ = maps[name]
        want = update.modules[name].dense_delta()[rows][:, cols]
        assert (delta - want).abs().max().item() <= 1e-5
    apply_update(target, update, rank=2, alpha=8.0)  # truncated SVD to a lower rank
    for name, delta in _local_deltas(target).items():
        rows, cols, _ = maps[name]
        want = update.modules[name].dense_delta()[rows][:, cols]
        s = torch.linalg.svdvals(want)
        err = torch.linalg.matrix_norm(delta - want).item()
        assert err == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-3, abs=1e-5)


def test_zero_components_restart_with_trainable_factors():
    model = load_lora_model("bert", rank=2)
    update = build_update(model)
    m0 = next(iter(update.modules))
    modules = {n: ModuleUpdate(A=m.A, B=torch.zeros_like(m.B), rows=m.rows, cols=m.cols, shape=m.shape, scale=m.scale)
               for n, m in update.modules.items()}
    apply_update(model, LoraUpdate(modules=modules, dense=update.dense), rank=4, alpha=8.0)
    layer = lora_layers(model)[m0]
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.all(layer.lora_A["default"].weight.abs().sum(1) > 0)
    model.train()
    model(**random_batch()).logits.sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0  # LoRA is not stuck at zero gradient


def test_bad_updates_are_rejected_before_anything_changes():
    model = _pruned("bert", "seq_cls")
    update = build_update(model)
    before = _local_deltas(model)
    name, m = next(iter(update.modules.items()))
    wrong_shape = ModuleUpdate(A=m.A, B=m.B, rows=m.rows, cols=m.cols, shape=(m.shape[0] + 1, m.shape[1]),
                               scale=m.scale)
    cases = [
        LoraUpdate(modules={**update.modules, name: wrong_shape}, dense=update.dense),
        LoraUpdate(modules={**update.modules, "bert.encoder.layer.9.attention.self.query": m}, dense=update.dense),
        LoraUpdate(modules=update.modules, dense={**update.dense, "classifier.weight": torch.zeros(5, 5)}),
        LoraUpdate(modules=update.modules, dense={**update.dense, "bert.pooler.dense.weight": torch.zeros(32, 32)}),
    ]
    for bad in cases:
        with pytest.raises(UpdateError):
            apply_update(model, bad, rank=4, alpha=8.0)
    after = _local_deltas(model)
    for n in before:
        assert torch.equal(before[n], after[n])
