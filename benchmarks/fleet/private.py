"""Diagnose a fleet run: the final global update evaluated on each node's structure, as it is and with the
coordinates that only that node kept set to zero (the part of the global update trained by that node alone).

    python -m benchmarks.fleet.private results/fleet/fedspine [--nodes-dir results/fleet/nodes]

Reads the coordinator's configuration and last checkpoint and each node's resume state (its pruned structure and task head) from
the run folder and each node's test file; prints a table.  Offline, nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import structlog

from coordinator.aggregation import GlobalLora
from coordinator.config import CoordinatorConfig
from coordinator.simulate import default_model_path
from coordinator.state import CheckpointStore
from coordinator.strategy import LORA_ALPHA, make_strategy
from edge_node.config import TrainSettings
from edge_node.engine import LocalTrainer
from edge_node.exchange import apply_update

QUIET = structlog.wrap_logger(structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(
    logging.WARNING))


def private(node: str, kept: dict, module: str) -> tuple[list[int], list[int]]:
    """The rows and cols of ``module`` that ``node`` kept and no other node did."""
    rows, cols = kept[node][module]
    others = [kept[n][module] for n in kept if n != node]
    o_rows = set().union(*(set(o[0].tolist()) for o in others))
    o_cols = set().union(*(set(o[1].tolist()) for o in others))
    return [r for r in rows.tolist() if r not in o_rows], [c for c in cols.tolist() if c not in o_cols]


def private_count(node: str, kept: dict) -> int:
    return sum(len(r) + len(c) for r, c in (private(node, kept, m) for m in kept[node]))


def without_private(g: GlobalLora, node: str, kept: dict) -> GlobalLora:
    """A copy of ``g`` with the rows/cols that only ``node`` kept set to zero."""
    out = GlobalLora()
    out.load_tensors({k: v.clone() for k, v in g.state_tensors().items()})  # load_tensors keeps the tensors
    for module in kept[node]:
        rows, cols = private(node, kept, module)
        out.delta[module][rows, :] = 0
        out.delta[module][:, cols] = 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="one method's run folder, e.g. results/fleet/fedspine")
    ap.add_argument("--nodes-dir", default=None, help="the nodes' data folders (default: <run>/../nodes)")
    ap.add_argument("--model", default=None)
    a = ap.parse_args(argv)
    run = Path(a.run)
    nodes_dir = Path(a.nodes_dir) if a.nodes_dir else run.parent / "nodes"
    ck = CheckpointStore(run / "coordinator").load()
    if ck is None:
        print(f"no checkpoint under {run / 'coordinator'}", file=sys.stderr)
        return 2
    cfg = CoordinatorConfig.load(run / "coordinator.toml")
    strategy = make_strategy(cfg, total_rounds=cfg.coordinator.rounds)
    strategy.load_state_dict(ck["strategy"])  # the global update and every node's structure, as the coordinator had them
    g, rank = strategy.global_, strategy.final_rank()  # the final sync's slice rank
    if not isinstance(g, GlobalLora):
        print(f"method {strategy.method} never prunes: nothing is private to a node", file=sys.stderr)
        return 2
    kept = {n: st.structure for n, st in strategy.nodes.items() if st.structure}
    labels = ["negative", "neutral", "positive"]
    print("| node | kept only by it (rows+cols) | accuracy | without its private coordinates |")
    print("|---|---|---|---|")
    for node in sorted(kept):
        tr = LocalTrainer(a.model or default_model_path(), str(nodes_dir / node / "train.csv"), device="cpu",
                          train=TrainSettings(), log=QUIET, test_path=str(nodes_dir / node / "test.csv"), labels=labels)
        tr.load_resume(run / "state" / node / "trainer")
        accs = []
        for glob in (g, without_private(g, node, kept)):  # each slice replaces the LoRA factors and task head
            apply_update(tr.model, glob.slice_for(kept[node], rank, LORA_ALPHA), rank=rank, alpha=LORA_ALPHA)
            accs.append(tr.evaluate("test")["accuracy"])
        print(f"| {node} | {private_count(node, kept)} | {accs[0]:.3f} | {accs[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
