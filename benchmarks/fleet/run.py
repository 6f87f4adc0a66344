"""All six methods side by side on one simulated fleet (the paper-style table); the evaluation set is evaluate.py.

Full size: 3 nodes (AGX, Xavier NX, TX2 profiles), 10 rounds of τ = 20 local steps, batch 16, sequence length 64,
learning rate 1e-3, 1,200 tweets per node (Dirichlet α = 0.5), 600 held-out test tweets (16 batches evaluated per
round for the curves; all 600 for the final figures), target sparsity 0.3, seed 0: about 1.5 h on 2 CPU cores.
``--quick`` (a few minutes): 3 rounds of τ = 6, sequence length 32, 300 tweets per node, 96 test tweets.  Writes
results/fleet[-quick]/summary.md (table), summary.json, rounds.md and plots, and prints the table.

    python -m benchmarks.fleet.run [--quick] [--methods all] [--broker embedded|mosquitto] [--seed S]
"""

from __future__ import annotations

import argparse
import sys

from coordinator.simulate import main as simulate

FULL = ["--nodes", "3", "--rounds", "10", "--local-steps", "20", "--batch-size", "16", "--max-length", "64",
        "--samples-per-node", "1200", "--test-size", "600", "--test-batches", "16", "--alpha", "0.5", "--lr", "1e-3"]
QUICK = ["--nodes", "3", "--rounds", "3", "--local-steps", "6", "--batch-size", "8", "--max-length", "32",
         "--samples-per-node", "300", "--test-size", "96", "--test-batches", "4", "--alpha", "0.5", "--lr", "2e-3"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--broker", default="embedded")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", default="0")
    a, rest = ap.parse_known_args(argv)
    out = a.out or ("results/fleet-quick" if a.quick else "results/fleet")
    size = QUICK if a.quick else FULL
    return simulate([*size, "--method", a.methods, "--broker", a.broker, "--out", out, "--seed", a.seed,
                     "--target-sparsity", "0.3", *rest])


if __name__ == "__main__":
    sys.exit(main())
