"""Physical structured pruning: shapes, equivalence with masking, sparsity accounting, monotonicity, options."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_node.model import arch_of, layer_geometry, lora_layers, unwrap
from edge_node.pruning import (
    apply_plan,
    kept_maps,
    layer_costs,
    module_maps,
    plan_counts,
    plan_prune,
    restore_structure,
    sparsity,
)
from tests.edge_node.tiny import load_lora_model, random_batch

KINDS = [("bert", "seq_cls"), ("roberta", "seq_cls"), ("distilbert", "seq_cls"), ("llama", "causal_lm")]


def _scores(model, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    kept = kept_maps(model)
    return {i: (torch.rand(len(k.heads), generator=gen) + 0.1, torch.rand(len(k.channels), generator=gen) + 0.1)
            for i, k in kept.items()}


@pytest.mark.parametrize(("kind", "task"), KINDS)
def test_shapes_attributes_and_sparsity_after_pruning(kind, task):
    model = load_lora_model(kind, task)
    spec = arch_of(model)
    counts = plan_counts(model, 0.3)
    apply_plan(model, plan_prune(model, 0.3, _scores(model)))
    assert sparsity(model) >= 0.3
    base = unwrap(model)
    kept = kept_maps(model)
    for g in layer_geometry(model):
        n_groups, n_ch = counts[g.index]
        assert (len(kept[g.index].heads), len(kept[g.index].channels)) == (n_groups, n_ch)
        assert n_groups == g.n_kv_heads - round(0.3 * g.n_kv_heads)  # 4 heads -> 3, 2 KV groups -> 1
        n_q = n_groups * g.q_per_group
        q = base.get_submodule(g.name(spec.q))
        assert q.base_layer.weight.shape == (n_q * g.head_dim, g.hidden)
        assert q.lora_B["default"].weight.shape[0] == n_q * g.head_dim and q.out_features == n_q * g.head_dim
        o = base.get_submodule(g.name(spec.o))
        assert o.base_layer.weight.shape == (g.hidden, n_q * g.head_dim)
        assert o.lora_A["default"].weight.shape[1] == n_q * g.head_dim and o.in_features == n_q * g.head_dim
        down = base.get_submodule(g.name(spec.ffn_out))
        assert down.base_layer.weight.shape == (g.hidden, n_ch) and down.base_layer.in_features == n_ch
        for rel in spec.ffn_in:
            up = base.get_submodule(g.name(rel))
            assert up.base_layer.weight.shape == (n_ch, g.hidden)
            if up.base_layer.bias is not None:
                assert up.base_layer.bias.shape == (n_ch,)
        attn = base.get_submodule(g.name(spec.attn))
        assert getattr(attn, "num_attention_heads", getattr(attn, "n_heads", getattr(attn, "num_heads", None))) == n_q
    maps = module_maps(model)
    for name, layer in lora_layers(model).items():
        rows, cols, _ = maps[name]
        assert layer.base_layer.weight.shape == (rows.numel(), cols.numel())
    out = model(**random_batch())
    assert torch.isfinite(out.logits).all()


def _masked(model, plan):
    """The unpruned model with the removed groups' contributions zeroed (o / down input columns, LoRA A too)."""
    masked = copy.deepcopy(model)
    spec, base = arch_of(masked), unwrap(masked)
    for g in layer_geometry(masked):
        heads, channels = plan[g.index]
        gone_h = sorted(set(range(g.n_kv_heads)) - set(heads.tolist()))
        gone_c = sorted(set(range(g.intermediate)) - set(channels.tolist()))
        width = g.q_per_group * g.head_dim
        cols = [h * width + j for h in gone_h for j in range(width)]
        with torch.no_grad():
            for rel, idx in ((spec.o, cols), (spec.ffn_out, gone_c)):
                mod = base.get_submodule(g.name(rel))
                mod.base_layer.weight[:, idx] = 0
                mod.lora_A["default"].weight[:, idx] = 0
    return masked


@pytest.mark.parametrize(("kind", "task"), KINDS)
def test_pruning_zero_importance_groups_equals_masking(kind, task):
    model = load_lora_model(kind, task)
    scores = _scores(model)
    counts = plan_counts(model, 0.4)
    zero_h, zero_c = {}, {}
    for g in layer_geometry(model):
        n_h, n_c = counts[g.index]
        perm_h = torch.randperm(g.n_kv_heads, generator=torch.Generator().manual_seed(g.index))
        perm_c = torch.randperm(g.intermediate, generator=torch.Generator().manual_seed(10 + g.index))
        zero_h[g.index] = set(perm_h[: g.n_kv_heads - n_h].tolist())
        zero_c[g.index] = set(perm_c[: g.intermediate - n_c].tolist())
        scores[g.index][0][list(zero_h[g.index])] = 0.0
        scores[g.index][1][list(zero_c[g.index])] = 0.0
    plan = plan_prune(model, 0.4, scores)
    for g in layer_geometry(model):
        assert set(range(g.n_kv_heads)) - set(plan[g.index][0].tolist()) == zero_h[g.index]
        assert set(range(g.intermediate)) - set(plan[g.index][1].tolist()) == zero_c[g.index]
    batch = random_batch()
    expected = _masked(model, plan)(**batch).logits
    apply_plan(model, plan)
    got = model(**batch).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("kind", "task"), [("bert", "seq_cls"), ("llama", "causal_lm")])
def test_pruning_is_monotone_and_keeps_one_group(kind, task):
    model = load_lora_model(kind, task)
    apply_plan(model, plan_prune(model, 0.5, _scores(model)))
    first, s1 = kept_maps(model), sparsity(model)
    apply_plan(model, plan_prune(model, 0.3, _scores(model, 1)))  # a lower target changes nothing
    assert kept_maps(model) == first and sparsity(model) == s1
    apply_plan(model, plan_prune(model, 0.95, _scores(model, 2)))
    second = kept_maps(model)
    assert sparsity(model) > s1
    for i, k in second.items():
        assert set(k.heads) <= set(first[i].heads) and set(k.channels) <= set(first[i].channels)
        assert len(k.heads) >= 1 and len(k.channels) >= 1
    assert torch.isfinite(model(**random_batch()).logits).all()


def test_sparsity_accounting_matches_parameter_count():
    model = load_lora_model("bert")
    costs = layer_costs(model)
    base = unwrap(model)
    spec = arch_of(model)

    def prunable_params() -> int:
        total = 0
        for g in layer_geometry(model):
            for rel in (spec.q, spec.k, spec.v, spec.o, *spec.ffn_in, spec.ffn_out):
                lin = base.get_submodule(g.name(rel)).base_layer
                total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        return total

    full = prunable_params()
    assert full == sum(c.total for c in costs.values())
    apply_plan(model, plan_prune(model, 0.3, _scores(model)))
    assert sparsity(model) == pytest.approx(1 - prunable_params() / full)


def test_round_multiple_and_global_scope():
    model = load_lora_model("bert")
    plan = plan_prune(model, 0.3, _scores(model), round_multiple=8)
    assert all(ch.numel() % 8 == 0 for _, ch in plan.values())
    apply_plan(model, plan)
    assert sparsity(model) >= 0.3
    other = load_lora_model("bert")
    scores = _scores(other)
    scores[0] = (scores[0][0] + 10, scores[0][1] + 10)  # layer 0 matters more: global ranking prunes layer 1
    apply_plan(other, plan_prune(other, 0.3, scores, scope="global"))
    kept = kept_maps(other)
    assert sparsity(other) >= 0.3
    assert len(kept[0].channels) == 64 and len(kept[1].channels) < 64 and len(kept[1].heads) >= 1


def test_random_plan_same_counts_and_seeded():
    model = load_lora_model("llama", "causal_lm")
    guided = plan_prune(model, 0.3, _scores(model))
    r1 = plan_prune(model, 0.3, None, generator=torch.Generator().manual_seed(3))
    r2 = plan_prune(model, 0.3, None, generator=torch.Generator().manual_seed(3))
    for i in guided:
        assert [t.numel() for t in guided[i]] == [t.numel() for t in r1[i]]
        assert all(torch.equal(a, b) for a, b in zip(r1[i], r2[i], strict=True))


def test_restore_structure_reproduces_pruned_model():
    model = load_lora_model("roberta")
    fresh = copy.deepcopy(model)
    apply_plan(model, plan_prune(model, 0.4, _scores(model)))
    restore_structure(fresh, kept_maps(model))
    assert kept_maps(fresh) == kept_maps(model)
    batch = random_batch()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="monotone"):
        restore_structure(model, kept_maps(load_lora_model("roberta")))
