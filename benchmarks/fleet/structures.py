"""Why a pruned node's model scores what it does: the fleet's final global model at each node's structure.

After a fleet run, ``python -m benchmarks.fleet.structures results/fleet-s0 [--method fedspine]`` merges the
coordinator's final global LoRA update and task head into the pretrained model and evaluates it on the whole test
split (accuracy, recall and predicted share per class):

- unpruned;
- at each node's final structure (the kept heads and FFN channels in its trainer state);
- at the structure the fleet's averaged importance (sent with every slice) keeps at the same per-layer counts;
- and each node's exported model (its rank-limited slice, merged), for comparison.

Every node deploys the same global update and head, sliced to its structure, so where the rows differ the structure
is the cause. Nothing is trained. Writes ``structures.md`` into the method's folder and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from coordinator.aggregation import GlobalLora
from edge_node.data import collate, encode_classification, read_records
from edge_node.model import load_base_model, load_tokenizer
from edge_node.pruning import LayerKept, kept_from_json, restore_structure


def merge_global(model: nn.Module, state: GlobalLora) -> nn.Module:
    """Add the global update of every adapted module to its weight and load the task head, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.delta.items():
            weight = model.get_submodule(name).weight
            if tuple(weight.shape) != tuple(value.shape):
                raise ValueError(f"delta.{name}: shape {tuple(value.shape)} != the model's {tuple(weight.shape)}")
            weight += value.to(weight.dtype)
        for name, value in state.dense.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"dense.{name}: no parameter of that name and shape in the model")
            params[name].copy_(value)
    return model


def fleet_structure(state: GlobalLora, like: Mapping[int, LayerKept]) -> dict[int, LayerKept]:
    """Per layer, the heads and channels with the highest fleet importance, as many as ``like`` keeps there."""
    out = {}
    for idx, k in like.items():
        heads = state.importance[f"{idx}.heads"]
        channels = state.importance[f"{idx}.channels"]
        out[idx] = LayerKept(tuple(sorted(torch.topk(heads, len(k.heads)).indices.tolist())),
                             tuple(sorted(torch.topk(channels, len(k.channels)).indices.tolist())))
    return out


def evaluate(model: nn.Module, data, pad_id: int, n_labels: int, batch_size: int = 64) -> dict:
    """Accuracy, and per class its recall and the share of predictions that named it."""
    model.eval()
    preds, gold = [], []
    with torch.no_grad():
        for start in range(0, len(data.targets), batch_size):
            batch = collate(data, range(start, min(start + batch_size, len(data.targets))), pad_id, causal=False)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            preds += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
    hits = [p == y for p, y in zip(preds, gold, strict=True)]
    return {"accuracy": sum(hits) / len(gold),
            "recall": [sum(h for h, y in zip(hits, gold, strict=True) if y == c) / max(gold.count(c), 1)
                       for c in range(n_labels)],
            "predicted": [preds.count(c) / len(preds) for c in range(n_labels)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a fleet results folder (e.g. results/fleet-s0)")
    ap.add_argument("--method", default="fedspine")
    ap.add_argument("--model", default=None, help="the pretrained model folder (default: the packaged MiniLM)")
    ap.add_argument("--max-length", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    root, run = Path(a.results), Path(a.results) / a.method
    checkpoints = sorted((run / "coordinator").glob("global-*.safetensors"))
    if not checkpoints:
        print(f"no global checkpoint under {run / 'coordinator'}", file=sys.stderr)
        return 2
    glob = GlobalLora()
    glob.load_tensors(load_file(str(checkpoints[-1])))
    states = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("state/*/trainer/state.json"))}
    if not states:
        print(f"no node trainer state under {run / 'state'}", file=sys.stderr)
        return 2
    labels = next(iter(states.values()))["labels"]
    if a.model is None:
        from coordinator.simulate import default_model_path
        a.model = default_model_path()
    tok = load_tokenizer(a.model)
    rows = read_records(root / "nodes" / next(iter(states)) / "test.csv")
    data, _ = encode_classification(rows, tok, a.max_length, labels=labels, where="test split")
    merged = merge_global(load_base_model(a.model, "seq_cls", num_labels=len(labels)), glob)

    def at(structure: dict[int, LayerKept] | None) -> dict:
        model = merged
        if structure is not None:
            model = copy.deepcopy(merged)
            restore_structure(model, structure)
        return evaluate(model, data, tok.pad_token_id, len(labels))

    results = [("global, unpruned", at(None))]
    groups: dict[tuple, list[str]] = {}  # per-layer kept counts -> the nodes with them (one fleet row for each)
    for node, state in states.items():
        kept = kept_from_json(state["kept"])
        results.append((f"global at {node}'s structure", at(kept)))
        groups.setdefault(tuple((i, len(k.heads), len(k.channels)) for i, k in sorted(kept.items())), []).append(node)
    for nodes in groups.values():
        results.append((f"global at the fleet importance's top groups, {'/'.join(nodes)}'s counts",
                        at(fleet_structure(glob, kept_from_json(states[nodes[0]]["kept"])))))
    for node in states:  # what each node deployed: the slice at the final rank, merged (our own export folder)
        export = run / "state" / node / "export"
        if (export / "config.json").exists():
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True,
                                                                       local_files_only=True)
            results.append((f"{node}'s exported model", evaluate(model, data, tok.pad_token_id, len(labels))))
    lines = [f"# {a.method}: the final global model ({checkpoints[-1].name}) at each structure, {len(rows)} test rows",
             "", "| structure | accuracy | " + " | ".join(f"recall {c}" for c in labels) + " | "
             + " | ".join(f"predicted {c}" for c in labels) + " |", "|---|---|" + "---|" * (2 * len(labels))]
    for name, r in results:
        lines.append(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(f"{x:.2f}" for x in r["recall"]) + " | "
                     + " | ".join(f"{x:.0%}" for x in r["predicted"]) + " |")
    text = "\n".join(lines) + "\n"
    (run / "structures.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
