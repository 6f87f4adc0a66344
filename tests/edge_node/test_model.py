"""Model loading offline, architecture geometry, device/dtype choice and LoRA rank change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from edge_node.model import (
    attach_lora,
    base_model_digest,
    change_rank,
    current_rank,
    layer_geometry,
    load_base_model,
    load_tokenizer,
    lora_layers,
    lora_target_names,
    pick_device,
    pick_dtype,
    refactor,
    task_head_params,
)
from tests.edge_node.tiny import cached_model_folder, load_lora_model, make_model_folder, random_batch

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.mark.parametrize(("kind", "task", "n_kv", "modules_per_layer", "heads"), [
    ("bert", "seq_cls", 4, 6, {"classifier.weight", "classifier.bias"}),
    ("roberta", "seq_cls", 4, 6, {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                                  "classifier.out_proj.bias"}),
    ("distilbert", "seq_cls", 4, 6, {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight",
                                     "classifier.bias"}),
    ("llama", "causal_lm", 2, 7, set()),
    ("llama", "seq_cls", 2, 7, {"score.weight"}),
])
def test_load_offline_geometry_and_lora_targets(kind, task, n_kv, modules_per_layer, heads):
    folder = cached_model_folder(kind, task)
    tok = load_tokenizer(str(folder))
    model = load_base_model(str(folder), task, num_labels=3 if task == "seq_cls" else None)
    geo = layer_geometry(model)
    assert [g.index for g in geo] == [0, 1]
    assert all((g.n_heads, g.n_kv_heads, g.head_dim, g.hidden, g.intermediate) == (4, n_kv, 8, 32, 64) for g in geo)
    assert len(lora_target_names(model)) == 2 * modules_per_layer
    peft_model = attach_lora(model, rank=4, alpha=8.0, task=task)
    assert len(lora_layers(peft_model)) == 2 * modules_per_layer
    assert set(task_head_params(peft_model)) == heads
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = tok(["good day", "bad movie is not nice"], padding=True, return_tensors="pt")
    out = peft_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert torch.isfinite(out.logits).all()


def test_unsupported_task_and_labels_rejected():
    folder = cached_model_folder("bert")
    with pytest.raises(ValueError, match="labels"):
        load_base_model(str(folder), "seq_cls", num_labels=1)
    with pytest.raises(ValueError, match="task"):
        load_base_model(str(folder), "translation")
    with pytest.raises(ValueError, match="repeat"):
        load_base_model(str(folder), "seq_cls", labels=["pos", "pos"])
    with pytest.raises(ValueError, match="label names"):
        load_base_model(str(folder), "seq_cls", num_labels=3, labels=["neg", "pos"])


def test_label_names_go_into_the_config():
    model = load_base_model(str(cached_model_folder("roberta")), "seq_cls", labels=["negative", "neutral", "positive"])
    assert model.config.num_labels == 3 and model.classifier.out_proj.out_features == 3
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}


def test_device_and_dtype_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError):
        pick_dtype("int8", cpu)


def test_half_base_keeps_lora_fp32():
    folder = cached_model_folder("bert")
    model = attach_lora(load_base_model(str(folder), "seq_cls", num_labels=2, dtype=torch.bfloat16), rank=2, alpha=4)
    layer = next(iter(lora_layers(model).values()))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32


def _deltas(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(model).items():
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        out[name] = (s * b @ a).detach().clone()
    return out


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_rank_grow_then_shrink_preserves_update_and_outputs(kind):
    task = "causal_lm" if kind == "llama" else "seq_cls"
    model = load_lora_model(kind, task, rank=4)
    batch = random_batch()
    before, logits = _deltas(model), model(**batch).logits.detach()
    change_rank(model, 9, alpha=8.0, generator=torch.Generator().manual_seed(1))
    assert current_rank(model) == 9
    grown = _deltas(model)
    for name, delta in before.items():
        torch.testing.assert_close(grown[name], delta, atol=1e-5, rtol=0)
        layer = lora_layers(model)[name]
        assert layer.scaling["default"] == pytest.approx(8.0 / 9)
        assert torch.count_nonzero(layer.lora_B["default"].weight[:, 4:]) == 0  # new components: zero B
        assert torch.all(layer.lora_A["default"].weight[4:].abs().sum(1) > 0)  # ... and trainable A rows
    torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=0)
    change_rank(model, 4, alpha=8.0)  # the update has rank 4: shrinking back is exact
    assert current_rank(model) == 4
    for name, delta in _deltas(model).items():
        torch.testing.assert_close(delta, before[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=0)


def test_shrink_is_best_low_rank_approximation():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 6, generator=gen), torch.randn(6, 30, generator=gen)
    nb, na = refactor(B, A, 0.5, 3, 2.0)
    assert nb.shape == (20, 3) and na.shape == (3, 30)
    u, s, vh = torch.linalg.svd(0.5 * B @ A)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(2.0 * nb @ na, best, atol=1e-4, rtol=1e-4)


def test_refactor_reinitialises_dead_components_like_peft():
    B = torch.zeros(16, 4)
    B[:, 0] = 1.0
    A = torch.randn(4, 12)
    nb, na = refactor(B, A, 1.0, 4, 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nb @ na, B @ A, atol=1e-5, rtol=0)
    assert torch.count_nonzero(nb[:, 1:]) == 0
    bound = 1 / 12 ** 0.5
    assert torch.all(na[1:].abs() <= bound) and torch.all(na[1:].abs().sum(1) > 0)
    zb, za = refactor(torch.zeros(16, 4), torch.zeros(4, 12), 1.0, 2, 1.0)
    assert torch.count_nonzero(zb) == 0 and torch.all(za.abs().sum(1) > 0)


def test_base_model_digest_is_the_sha256sum_of_config_and_weights_and_tells_copies_apart(tmp_path):
    """The digest nodes announce on joining: what an operator gets on a Jetson with sha256sum; the same for a
    byte-identical copy, another for other weights or another config, and blind to files that load nothing."""
    import shutil
    import subprocess

    a = make_model_folder(tmp_path / "a", "bert", seed=0)
    digest = base_model_digest(str(a))
    listing = subprocess.run("ls config.json *.safetensors | LC_ALL=C sort | xargs sha256sum | sha256sum",
                             shell=True, cwd=a, capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest == listing and len(digest) == 64
    copy = Path(shutil.copytree(a, tmp_path / "copy"))
    (copy / "README.md").write_text("notes that load nothing")
    assert base_model_digest(str(copy)) == digest
    assert base_model_digest(str(make_model_folder(tmp_path / "b", "bert", seed=1))) != digest  # other weights
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_attention_heads": 2}))  # same tensors, other model
    assert base_model_digest(str(copy)) != digest
    for f in a.glob("*.safetensors"):
        f.unlink()
    (a / "pytorch_model.bin").write_bytes(b"weights as transformers' older format")  # loaded when no safetensors
    assert base_model_digest(str(a)) not in (digest, base_model_digest(str(copy)))
    (a / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors or \\*.bin"):
        base_model_digest(str(a))
