"""The structure diagnostic of a fleet run: global update merged into the base model, fleet-importance structures."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.fleet.structures import evaluate, fleet_structure, merge_global
from coordinator.aggregation import GlobalLora
from edge_node.data import encode_classification
from edge_node.model import load_base_model, load_tokenizer
from edge_node.pruning import LayerKept, kept_maps, restore_structure
from tests.edge_node.tiny import cached_model_folder, sentiment_rows

Q = "bert.encoder.layer.0.attention.self.query"


def _state(tensors: dict[str, torch.Tensor]) -> GlobalLora:
    """A coordinator's global state as its checkpoint tensors load it."""
    state = GlobalLora()
    state.load_tensors(tensors)
    return state


@pytest.mark.slow
def test_the_global_update_and_head_are_merged_into_the_base_weights():
    folder = cached_model_folder("bert")
    base = load_base_model(str(folder), "seq_cls", num_labels=2)
    before = base.get_submodule(Q).weight.clone()
    delta = torch.randn_like(before)
    head = torch.randn_like(base.classifier.weight)
    merged = merge_global(copy.deepcopy(base), _state({f"delta.{Q}": delta, "dense.classifier.weight": head,
                                                       "importance.0.heads": torch.ones(4)}))  # others ignored
    assert torch.allclose(merged.get_submodule(Q).weight, before + delta)
    assert torch.equal(merged.classifier.weight, head)
    with pytest.raises(ValueError, match="shape"):
        merge_global(copy.deepcopy(base), _state({f"delta.{Q}": torch.zeros(3, 3)}))
    with pytest.raises(ValueError, match="dense.nothing"):
        merge_global(copy.deepcopy(base), _state({"dense.nothing": torch.zeros(2)}))


def test_the_fleet_structure_keeps_the_most_important_groups_at_the_given_counts():
    tensors = {"importance.0.heads": torch.tensor([0.1, 0.9, 0.5, 0.2]),
               "importance.0.channels": torch.arange(8, dtype=torch.float32).flip(0),
               "importance.1.heads": torch.tensor([0.3, 0.1, 0.2, 0.4]),
               "importance.1.channels": torch.tensor([5.0, 1, 7, 3, 2, 8, 0, 4])}
    like = {0: LayerKept((0, 1), (0, 1, 2)), 1: LayerKept((2,), (3, 4, 5, 6))}
    out = fleet_structure(_state(tensors), like)
    assert out == {0: LayerKept((1, 2), (0, 1, 2)), 1: LayerKept((3,), (0, 2, 5, 7))}


def test_evaluate_reports_accuracy_recall_and_predicted_shares_at_a_structure():
    folder = cached_model_folder("bert")
    tok = load_tokenizer(str(folder))
    data, labels = encode_classification(sentiment_rows(40, seed=3), tok, 16)
    base = load_base_model(str(folder), "seq_cls", num_labels=len(labels))
    full = evaluate(base, data, tok.pad_token_id, len(labels), batch_size=7)
    assert sum(full["predicted"]) == pytest.approx(1.0)
    counts = [data.targets.count(c) for c in range(len(labels))]
    assert full["accuracy"] == pytest.approx(sum(r * n for r, n in zip(full["recall"], counts, strict=True)) / len(data.targets))
    # At the unpruned structure the model is unchanged; pruned, it is a different (smaller) model.
    same = copy.deepcopy(base)
    restore_structure(same, kept_maps(same))
    assert evaluate(same, data, tok.pad_token_id, len(labels)) == full
    pruned = copy.deepcopy(base)
    restore_structure(pruned, {i: LayerKept(k.heads[:1], k.channels[:4]) for i, k in kept_maps(pruned).items()})
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        batch = {"input_ids": torch.tensor([data.input_ids[0]]),
                 "attention_mask": torch.ones(1, len(data.input_ids[0]), dtype=torch.long)}
        assert not torch.allclose(pruned(**batch).logits, base(**batch).logits)
