"""The coordinator's CPU per node with model-sized updates (the swarm of benchmarks.coordinator.run sends 15 KB ones).

A root or region handles each node's update once a round: decode and validate it (``LoraUpdate.from_bytes``), add
it to the round's sums (``GlobalLora.partial``, per distinct kept structure) and, for FedSpine, take its norm for
the reward's importance term.  This measures each with rank-r LoRA updates of a BERT-style encoder (default
all-MiniLM-L6-v2: 6 layers, hidden 384, FFN 1536, 12 heads; q, k, v, o and both FFN projections adapted), unpruned
and with a fraction of every layer's heads and FFN channels cut, on one thread.  The aggregation's cost per node is
marginal: the round's fixed cost (dividing the sums, the server momentum) is taken out by timing two fleet sizes.
The norm is timed side by side with the dense product it replaced (‖scale·B·A‖ from the rows×cols matrix).  Writes
``results/update-cost.json`` and ``.md``.

    python -m benchmarks.coordinator.update_cost [--rank 8] [--sparsity 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from coordinator.aggregation import GlobalLora
from shared.updates import LoraUpdate, ModuleUpdate, UpdateLimits


def encoder_update(seed: int, *, layers: int, hidden: int, ffn: int, heads: int, rank: int,
                   sparsity: float) -> LoraUpdate:
    """A random rank-``rank`` update of every adapted module, with ``sparsity`` of each layer's heads and FFN
    channels cut (the kept ones: the first, as a cut's kept-index maps are sorted)."""
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    kept_heads = max(1, round(heads * (1 - sparsity)))
    attn = torch.arange(kept_heads * head_dim)  # the kept heads' rows of q, k, v and columns of o
    chans = torch.arange(max(1, round(ffn * (1 - sparsity))))
    every = torch.arange(hidden)
    mods = {}
    for layer in range(layers):
        for name, shape, rows, cols in (("q", (hidden, hidden), attn, every), ("k", (hidden, hidden), attn, every),
                                        ("v", (hidden, hidden), attn, every), ("o", (hidden, hidden), every, attn),
                                        ("up", (ffn, hidden), chans, every), ("down", (hidden, ffn), every, chans)):
            mods[f"layer.{layer}.{name}"] = ModuleUpdate(
                A=0.01 * torch.randn(rank, cols.numel(), generator=g), B=0.01 * torch.randn(rows.numel(), rank, generator=g),
                rows=rows.clone(), cols=cols.clone(), shape=shape, scale=16.0 / rank)
    return LoraUpdate(modules=mods, dense={}, importance={})


def dense_norm(u: LoraUpdate) -> float:
    """The importance term as it was computed before the Gram form: from each module's rows×cols product."""
    return float(sum(torch.linalg.matrix_norm(m.delta()).item() for m in u.modules.values()))


def _cpu(fn, repeat: int = 3) -> float:
    """Median process CPU seconds of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def measure(sparsity: float, args) -> dict:
    shape = dict(layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads, rank=args.rank)
    small, large = args.nodes
    updates = [encoder_update(i, sparsity=sparsity, **shape) for i in range(large)]
    wire = [u.to_bytes() for u in updates]
    limits = UpdateLimits(max_bytes=1 << 31)
    decode = _cpu(lambda: [LoraUpdate.from_bytes(b, limits) for b in wire]) / large

    def aggregate(n: int) -> float:
        g = GlobalLora()
        g.aggregate([(u, 1.0) for u in updates[:2]])  # a global state to start from, as every round after the first
        return _cpu(lambda: g.partial([(u, 1.0) for u in updates[:n]], starts=[None] * n, steps=[8] * n))

    per_node_sum = (aggregate(large) - aggregate(small)) / (large - small)
    gram = _cpu(lambda: [u.norm() for u in updates]) / large
    dense = _cpu(lambda: [dense_norm(u) for u in updates]) / large
    if abs(updates[0].norm() - dense_norm(updates[0])) > 1e-4 * dense_norm(updates[0]):
        raise RuntimeError("the Gram-form norm disagrees with the dense product's")
    return {"sparsity": sparsity, "update_bytes": len(wire[0]), "decode_ms": 1e3 * decode,
            "sums_ms": 1e3 * per_node_sum, "norm_ms": 1e3 * gram, "dense_norm_ms": 1e3 * dense,
            "norm_speedup": dense / gram if gram > 0 else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.3, help="the pruned case's share of heads and channels cut")
    ap.add_argument("--nodes", default="8,40", help="the two fleet sizes the aggregation's marginal cost is taken from")
    ap.add_argument("--out", default="results/update-cost.json")
    args = ap.parse_args(argv)
    args.nodes = tuple(int(x) for x in args.nodes.split(","))
    torch.set_num_threads(1)
    rows = []
    for s in (0.0, args.sparsity):
        rows.append(measure(s, args))
        print(f"  sparsity {s}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()})}",
              flush=True)
    lines = [f"Per node, one thread, rank {args.rank}, {args.layers} layers × hidden {args.hidden} / FFN {args.ffn}:", "",
             "| sparsity | update MB | decode + validate ms | aggregation sums ms (marginal) | reward norm ms | "
             "norm from the rows×cols product ms | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']:.2f} | {r['update_bytes'] / 1e6:.2f} | {r['decode_ms']:.1f} | {r['sums_ms']:.1f} | "
                     f"{r['norm_ms']:.1f} | {r['dense_norm_ms']:.1f} | {r['norm_speedup']:.1f}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": vars(args) | {"nodes": list(args.nodes)}, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
