"""Export: a pruned (non-uniformly across layers), LoRA-merged model reloads with plain transformers and matches."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from edge_node.export import export_pruned_model, measure_latency
from edge_node.model import layer_geometry
from edge_node.pruning import apply_plan, kept_maps, plan_prune
from tests.edge_node.tiny import load_lora_model, random_batch

CASES = [("bert", "seq_cls"), ("roberta", "seq_cls"), ("distilbert", "seq_cls"), ("llama", "causal_lm"),
         ("llama", "seq_cls")]


def prune_unevenly(model, target=0.45):
    """Global ranking with random scores: layers end with different head and channel counts."""
    gen = torch.Generator().manual_seed(3)
    scores = {g.index: (torch.rand(g.n_kv_heads, generator=gen), torch.rand(g.intermediate, generator=gen))
              for g in layer_geometry(model)}
    scores[0] = (scores[0][0] + 10, scores[0][1] + 10)  # layer 0 keeps everything, the other loses more
    apply_plan(model, plan_prune(model, target, scores, scope="global"))


@pytest.mark.parametrize("kind,task", CASES)
def test_export_reload_matches(tmp_path, kind, task, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_lora_model(kind, task)
    prune_unevenly(model)
    maps = kept_maps(model)
    assert len({(len(k.heads), len(k.channels)) for k in maps.values()}) > 1  # really per-layer sizes
    merged = model.merge_and_unload().eval()
    batch = random_batch()
    with torch.no_grad():
        expected = merged(**batch).logits
    info = export_pruned_model(merged, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["auto_map"] and (tmp_path / "export" / "modeling_fedspine.py").exists()
    assert [layer["ffn"] for layer in cfg["fedspine_layers"]] == [len(maps[i].channels) for i in sorted(maps)]
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(str(tmp_path / "export"), trust_remote_code=True).eval()
    assert type(reloaded).__name__.startswith("FedSpine")
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert info.params == sum(p.numel() for p in reloaded.parameters())
    assert info.size_bytes > 0 and measure_latency(reloaded, batch_size=2, seq_len=8, repeats=2) > 0


def test_unpruned_model_exports_as_a_stock_folder(tmp_path):
    merged = load_lora_model("bert").merge_and_unload().eval()
    export_pruned_model(merged, tmp_path / "dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "dense" / "modeling_fedspine.py").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "dense")).eval()
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, merged(**batch).logits, atol=1e-5)
