"""The paper-style fleet benchmark: FedSpine and the five baselines side by side in one harness.

Full size (about an hour on 2 CPU cores: 32–62 min measured, by machine): 3 nodes (AGX, Xavier NX, TX2 profiles), 10 rounds of τ = 20
local steps, batch 16, sequence length 64, learning rate 1e-3, 1,200 tweets per node (Dirichlet α = 0.5), 600 held-out test tweets
(16 batches, 256 tweets, evaluated per round for the curves; all 600 for the final figures),
target sparsity 0.3, seed 0.  ``--quick`` (a few minutes): 3 nodes, 3 rounds of τ = 6, sequence length 32,
300 tweets per node, 96 test tweets.  Writes results/fleet[-quick]/summary.md (table), summary.json and
plots, and prints the table.  ``--repeats K`` runs FedSpine K times at the seed, spread among the baselines, and
compares every baseline with FedSpine's median run (the issue-6 runs from the twelfth registration on use 3).

    python -m benchmarks.fleet.run [--quick] [--methods all] [--broker embedded|mosquitto] [--repeats K]
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
