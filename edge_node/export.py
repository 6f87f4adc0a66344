"""Export of a node's final model: LoRA merged into the pruned backbone, saved as a folder that plain
``transformers`` reloads (``AutoModelFor…from_pretrained(path, trust_remote_code=True)``), and its latency.

Stock configs cannot describe per-layer head and FFN sizes (BERT derives the head size from hidden size /
heads), so, following the Hub's convention for custom architectures, the folder carries a small modeling
file (``modeling_fedspine.py``, torch + transformers only) referenced by ``auto_map`` in config.json, and the
sizes live in the config: every resized projection (``fedspine_linear``) and the head counts of every
attention module (``fedspine_attrs``).  An unpruned model is saved as it is.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TEMPLATE = Path(__file__).with_name("export_templates") / "modeling_fedspine.py"
HEAD_ATTRS = ("num_attention_heads", "all_head_size", "attention_head_size", "n_heads", "num_heads",
              "num_key_value_heads", "num_key_value_groups", "head_dim", "intermediate_size")
AUTO_CLASS = {"ForSequenceClassification": "AutoModelForSequenceClassification", "ForCausalLM": "AutoModelForCausalLM"}


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    size_bytes: int
    params: int
    layers: list[dict]  # per layer: heads (query), kv_heads, head_dim, ffn


def pruned_variants() -> set[str]:
    """The transformers classes the export template has a pruned variant of (``FedSpine<class>``)."""
    return set(re.findall(r'^FedSpine(\w+) = _pruned\("\1"\)$', TEMPLATE.read_text(), flags=re.M))


def _reference(model: nn.Module) -> nn.Module:
    """An unpruned model of the same config on the meta device, to find what pruning changed."""
    with torch.device("meta"):
        return type(model)(model.config)


def _layer_sizes(model: nn.Module) -> list[dict]:
    from edge_node.model import layer_geometry
    from edge_node.pruning import kept_maps

    geos = layer_geometry(model)
    kept = kept_maps(model)
    out = []
    for g in geos:
        k = kept.get(g.index)
        heads_kv = len(k.heads) if k else g.n_kv_heads
        out.append({"heads": heads_kv * g.q_per_group, "kv_heads": heads_kv, "head_dim": g.head_dim,
                    "ffn": len(k.channels) if k else g.intermediate})
    return out


def export_pruned_model(model: nn.Module, out_dir: str | Path, *, tokenizer=None) -> ExportInfo:
    """Save ``model`` (LoRA merged, physically pruned, plain transformers modules) to ``out_dir``."""
    ref_modules = dict(_reference(model).named_modules())
    linear, attrs = {}, {}
    for name, mod in model.named_modules():
        base = ref_modules.get(name)
        if isinstance(mod, nn.Linear) and isinstance(base, nn.Linear) and \
                (mod.in_features, mod.out_features) != (base.in_features, base.out_features):
            linear[name] = [mod.out_features, mod.in_features, mod.bias is not None]
        if base is not None:
            changed = {a: getattr(mod, a) for a in HEAD_ATTRS
                       if isinstance(getattr(mod, a, None), int) and getattr(mod, a) != getattr(base, a, None)}
            if changed:
                attrs[name] = changed
    cls = type(model).__name__
    pruned = bool(linear or attrs)
    auto = next((a for suffix, a in AUTO_CLASS.items() if cls.endswith(suffix)), None)
    if pruned and (auto is None or cls not in pruned_variants()):  # before ``out_dir`` is touched
        raise ValueError(f"no pruned variant of {cls} in {TEMPLATE.name}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if pruned:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        custom = f"FedSpine{cls}"
        cfg.update(architectures=[custom], auto_map={auto: f"modeling_fedspine.{custom}"},
                   fedspine_linear=linear, fedspine_attrs=attrs, fedspine_layers=_layer_sizes(model))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        shutil.copy(TEMPLATE, out / TEMPLATE.name)
    for p in out.rglob("*"):  # one mode for every file (safetensors writes its file 0600 through a temp file)
        if p.is_file():
            p.chmod(0o644)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    params = sum(p.numel() for p in model.parameters())
    return ExportInfo(path=out, size_bytes=size, params=params, layers=_layer_sizes(model))


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 32, seq_len: int = 64, repeats: int = 10,
                    warmup: int = 2, threads: int | None = None) -> float:
    """Median forward latency in ms of a batch of ``batch_size`` x ``seq_len`` random tokens."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model.eval()
        device = next(model.parameters()).device
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = torch.randint(5, max(vocab, 6), (batch_size, seq_len), device=device)
        mask = torch.ones_like(ids)
        times = []
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)
