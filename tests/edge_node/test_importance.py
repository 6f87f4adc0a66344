"""LoRA-guided importance: the formula, finiteness, ranking of zeroed groups, EMA and non-finite steps."""

from __future__ import annotations

import pytest
import torch

from edge_node.importance import ImportanceTracker, module_scores
from edge_node.model import arch_of, layer_geometry, lora_layers, unwrap
from edge_node.pruning import apply_plan, plan_prune
from tests.edge_node.tiny import load_lora_model, random_batch


def test_module_scores_match_dense_formula():
    gen = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(12, 10, generator=gen), torch.randn(3, 10, generator=gen), torch.randn(12, 3, generator=gen)
    gA, gB = torch.randn(3, 10, generator=gen), torch.randn(12, 3, generator=gen)
    s = 0.7
    G = s * (gB @ A + B @ gA - gB @ gA)
    full = (G * (W + s * B @ A)).abs()
    torch.testing.assert_close(module_scores(W, A, B, gA, gB, s, 0), full.sum(1))
    torch.testing.assert_close(module_scores(W, A, B, gA, gB, s, 1), full.sum(0))


def _loss(model, batch, task):
    out = model(**batch)
    if task == "causal_lm":
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2]))


def _zero_group(model, layer: int, group: int, channel: int) -> None:
    """Zero one head group (q/k/v rows, o columns) and one FFN channel in base weights and LoRA factors."""
    spec, base = arch_of(model), unwrap(model)
    g = layer_geometry(model)[layer]
    q_rows = slice(group * g.q_per_group * g.head_dim, (group + 1) * g.q_per_group * g.head_dim)
    kv_rows = slice(group * g.head_dim, (group + 1) * g.head_dim)
    with torch.no_grad():
        for rel, rows in ((spec.q, q_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
            mod = base.get_submodule(g.name(rel))
            mod.base_layer.weight[rows] = 0
            if mod.base_layer.bias is not None:
                mod.base_layer.bias[rows] = 0
            mod.lora_B["default"].weight[rows] = 0
        o = base.get_submodule(g.name(spec.o))
        o.base_layer.weight[:, q_rows] = 0
        o.lora_A["default"].weight[:, q_rows] = 0
        for rel in spec.ffn_in:
            mod = base.get_submodule(g.name(rel))
            mod.base_layer.weight[channel] = 0
            if mod.base_layer.bias is not None:
                mod.base_layer.bias[channel] = 0
            mod.lora_B["default"].weight[channel] = 0
        down = base.get_submodule(g.name(spec.ffn_out))
        down.base_layer.weight[:, channel] = 0
        down.lora_A["default"].weight[:, channel] = 0


@pytest.mark.parametrize(("kind", "task"), [("bert", "seq_cls"), ("roberta", "seq_cls"),
                                            ("distilbert", "seq_cls"), ("llama", "causal_lm")])
def test_zeroed_group_scores_lowest_and_scores_finite(kind, task):
    model = load_lora_model(kind, task)
    model.train()
    _zero_group(model, layer=1, group=1, channel=5)
    tracker = ImportanceTracker(model, beta=0.9)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        _loss(model, random_batch(seed=step), task).backward()
        assert tracker.update(model)
    assert tracker.complete() and tracker.steps == 3
    for heads, channels in tracker.scores.values():
        assert torch.isfinite(heads).all() and torch.isfinite(channels).all()
        assert (heads >= 0).all() and (channels >= 0).all()
    heads, channels = tracker.scores[1]
    assert int(heads.argmin()) == 1 and float(heads[1]) == 0.0
    assert int(channels.argmin()) == 5 and float(channels[5]) == 0.0
    assert float(heads.max()) > 0 and float(tracker.scores[0][0].min()) > 0


def test_moving_average_and_non_finite_steps_skipped():
    model = load_lora_model("bert")
    model.train()
    tracker = ImportanceTracker(model, beta=0.5)
    _loss(model, random_batch(), "seq_cls").backward()
    assert tracker.update(model)
    first = {i: (h.clone(), c.clone()) for i, (h, c) in tracker.scores.items()}
    assert tracker.update(model)  # same gradients: the average of identical scores is unchanged
    for i, (h, c) in tracker.scores.items():
        torch.testing.assert_close(h, first[i][0])
        torch.testing.assert_close(c, first[i][1])
    model.zero_grad(set_to_none=True)
    _loss(model, random_batch(seed=5), "seq_cls").backward()
    fresh = ImportanceTracker(model, beta=0.5)
    fresh.update(model)
    assert tracker.update(model)
    for i, (h, _) in tracker.scores.items():
        torch.testing.assert_close(h, 0.5 * first[i][0] + 0.5 * fresh.scores[i][0])
    snapshot = {i: h.clone() for i, (h, _) in tracker.scores.items()}
    layer = next(iter(lora_layers(model).values()))
    layer.lora_A["default"].weight.grad[0, 0] = float("nan")
    assert not tracker.update(model)
    assert tracker.skipped == 1
    for i, (h, _) in tracker.scores.items():
        torch.testing.assert_close(h, snapshot[i])


def test_tracker_follows_pruning():
    model = load_lora_model("llama", "causal_lm")
    model.train()
    tracker = ImportanceTracker(model)
    _loss(model, random_batch(), "causal_lm").backward()
    tracker.update(model)
    plan = plan_prune(model, 0.5, tracker.scores)
    expected = {i: (tracker.scores[i][0][h], tracker.scores[i][1][c]) for i, (h, c) in plan.items()}
    apply_plan(model, plan)
    tracker.slice(plan)
    for i, (h, c) in tracker.scores.items():
        torch.testing.assert_close(h, expected[i][0])
        torch.testing.assert_close(c, expected[i][1])
    model.zero_grad(set_to_none=True)
    _loss(model, random_batch(seed=1), "causal_lm").backward()
    assert tracker.update(model)  # the pruned shapes line up with the sliced scores
    assert all(h.numel() == 1 for h, _ in tracker.scores.values())
