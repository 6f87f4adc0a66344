"""Claims equal reality: every supported model type x task trains, prunes, exports and reloads with plain
transformers to the same logits; anything else is refused when the node loads its model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from edge_node.export import export_pruned_model, measure_latency, pruned_variants
from edge_node.importance import ImportanceTracker
from edge_node.model import SUPPORTED, attach_lora, load_base_model, lora_layers, supported_cases
from edge_node.pruning import apply_plan, kept_maps, plan_prune, sparsity
from shared.config import ConfigError
from tests.edge_node.tiny import (
    cached_model_folder,
    lm_rows,
    load_lora_model,
    make_model_folder,
    random_batch,
    write_csv,
)

REPO = Path(__file__).resolve().parents[2]


def train_one_step(model, task: str) -> ImportanceTracker:
    """One local step as the node takes it (loss, importance from the LoRA gradients, AdamW on LoRA + head)."""
    batch = random_batch()
    labels = torch.tensor([0, 1, 2]) if task == "seq_cls" else batch["input_ids"].masked_fill(
        batch["attention_mask"] == 0, -100)
    tracker = ImportanceTracker(model)
    model.train()
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert tracker.update(model) and tracker.complete()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=1e-2).step()
    return tracker


@pytest.mark.parametrize(("model_type", "task"), supported_cases())
def test_supported_model_trains_prunes_exports_and_reloads_to_the_same_logits(tmp_path, model_type, task):
    model = load_base_model(str(cached_model_folder(model_type, task)), task,
                            num_labels=3 if task == "seq_cls" else None)
    model = attach_lora(model, rank=4, alpha=8.0, task=task)
    scores = train_one_step(model, task).scores
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(model).values())
    scores[0] = (scores[0][0] + 10, scores[0][1] + 10)  # layer 0 keeps everything: per-layer sizes differ
    apply_plan(model, plan_prune(model, 0.45, scores, scope="global"))
    maps = kept_maps(model)
    assert sparsity(model) > 0.3
    assert len({(len(k.heads), len(k.channels)) for k in maps.values()}) > 1  # heads and channels, unevenly
    merged = model.merge_and_unload().eval()
    batch = random_batch(seed=1)
    with torch.no_grad():
        expected = merged(**batch).logits
    info = export_pruned_model(merged, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["auto_map"] and (tmp_path / "export" / "modeling_fedspine.py").exists()
    assert [layer["ffn"] for layer in cfg["fedspine_layers"]] == [len(maps[i].channels) for i in sorted(maps)]
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(str(tmp_path / "export"), trust_remote_code=True).eval()
    assert type(reloaded).__name__ == f"FedSpine{SUPPORTED[model_type].classes[task]}"
    with torch.no_grad():
        got = reloaded(**batch).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    assert info.params == sum(p.numel() for p in reloaded.parameters())
    assert info.size_bytes > 0 and measure_latency(reloaded, batch_size=2, seq_len=8, repeats=2) > 0


def test_the_export_template_has_a_pruned_variant_of_every_supported_class_and_no_other():
    assert pruned_variants() == {cls for a in SUPPORTED.values() for cls in a.classes.values()}


@pytest.mark.parametrize(("model_type", "task", "named"), [
    ("gpt2", "causal_lm", ["'gpt2'", "not supported", "llama", "qwen2"]),
    ("bert", "causal_lm", ["'bert'", "task 'causal_lm'", "supports seq_cls", "llama, mistral, qwen2"]),
    ("distilbert", "causal_lm", ["'distilbert'", "task 'causal_lm'"]),
])
def test_unsupported_model_type_or_task_is_refused_when_the_model_loads(tmp_path, model_type, task, named):
    """A configuration error (the node exits at start-up, before joining) that names the model type and task."""
    build_task = "seq_cls" if model_type == "distilbert" else task  # transformers has no DistilBERT causal LM
    folder = make_model_folder(tmp_path / model_type, model_type, build_task)
    (folder / "model.safetensors").write_bytes(b"not read: the refusal comes from config.json")
    with pytest.raises(ConfigError) as err:
        load_base_model(str(folder), task)
    assert all(n in str(err.value) for n in named), str(err.value)
    assert str(folder) in str(err.value)


@pytest.mark.slow
def test_a_node_with_an_unsupported_model_exits_at_start_up_without_joining(tmp_path):
    """``fedspine node`` on a GPT-2 folder: a configuration error (exit 2: systemd does not restart it) naming
    the model type, before any connection (the broker URL points at nothing)."""
    folder = make_model_folder(tmp_path / "gpt2", "gpt2", "causal_lm")
    data, state = write_csv(tmp_path / "train.csv", lm_rows(8)), tmp_path / "state"
    config = tmp_path / "node.toml"
    config.write_text(f'[broker]\nurl = "mqtt://127.0.0.1:1"\n\n[node]\nid = "node-a"\nmodel_path = "{folder}"\n'
                      f'data_path = "{data}"\ntask = "causal_lm"\nstate_dir = "{state}"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "shared.cli", "node", "--config", str(config)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = json.loads(p.stderr.strip().splitlines()[-1])  # JSON lines without a terminal: the reason too
    assert last["event"] == "start_up_failed" and last["exit_status"] == 2
    assert last["error"].startswith(f"fedspine node: configuration error: model type 'gpt2' ({folder}) is not supported")
    events = [json.loads(x)["event"] for x in p.stderr.splitlines() if x.startswith("{")]
    assert not [e for e in events if e == "node_joined" or e.startswith("calibrat")], events  # never got that far


def test_unpruned_model_exports_as_a_stock_folder(tmp_path):
    merged = load_lora_model("bert").merge_and_unload().eval()
    export_pruned_model(merged, tmp_path / "dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "dense" / "modeling_fedspine.py").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "dense")).eval()
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, merged(**batch).logits, atol=1e-5)
