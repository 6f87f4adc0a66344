"""Coordinator cost per round with 100, 1,000 and 5,000 lightweight nodes (real MQTT clients, no training).

Starts its own mosquitto on a free port, the real coordinator process (``fedspine coordinator``) and swarm
processes of lightweight nodes (``benchmarks.coordinator.swarm``); the coordinator records its own process
CPU time per round in its metrics.  Prints a table and writes ``results/coordinator.json`` / ``.md``.

    python -m benchmarks.coordinator.run [--sizes 100,1000,5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.brokers import mosquitto
from coordinator.simulate import write_toml


def measure(n: int, rounds: int, swarm_procs: int, workdir: Path, profile: Path | None = None) -> dict:
    with mosquitto(workdir / f"broker-{n}") as (host, port):
        root = f"fedspine/bench{n}"
        metrics = workdir / f"state-{n}" / "metrics.jsonl"
        cfg = workdir / f"coordinator-{n}.toml"
        write_toml(cfg, {
            "broker": {"url": f"mqtt://{host}:{port}", "topic_root": root},
            "coordinator": {"rounds": rounds, "method": "fedspine", "min_nodes": n, "local_steps": 1,
                            "deadline_s": 300.0, "state_dir": str(workdir / f"state-{n}"),
                            "join_timeout_s": 600.0},
        })
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        per = -(-n // swarm_procs)
        swarm = [subprocess.Popen([sys.executable, "-m", "benchmarks.coordinator.swarm", "--host", host, "--port",
                                   str(port), "--root", root, "--first", str(i * per),
                                   "--count", str(min(per, n - i * per))], env=env)
                 for i in range(swarm_procs) if i * per < n]
        t0 = time.monotonic()
        prof = ["-m", "cProfile", "-o", str(profile / f"coordinator-{n}.prof")] if profile else []
        coord = subprocess.run([sys.executable, *prof, "-m", "shared.cli", "--log-format", "json", "--log-level",
                                "WARNING", "coordinator", "--config", str(cfg)], env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        for p in swarm:
            p.terminate()
        for p in swarm:
            p.wait(timeout=30)
        if coord.returncode != 0:
            raise RuntimeError(f"coordinator failed for n={n}: {coord.stderr[-2000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    per_round = [r for r in rows if r.get("kind") == "round"]
    cpu = [r["coordinator_cpu_s"] for r in per_round]
    return {"nodes": n, "rounds": len(per_round), "accepted": [r["accepted"] for r in per_round],
            "cpu_s_per_round": cpu, "median_cpu_s": statistics.median(cpu),
            "cpu_ms_per_node": 1000 * statistics.median(cpu) / n,
            "median_round_wall_s": statistics.median(r["round_wall_s"] for r in per_round), "total_wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swarm-procs", type=int, default=4)
    ap.add_argument("--out", default="results/coordinator.json")
    ap.add_argument("--profile", action="store_true",
                    help="run the coordinator under cProfile; writes coordinator-<n>.prof beside --out")
    a = ap.parse_args(argv)
    profile = Path(a.out).parent if a.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedspine-bench-") as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            results.append(measure(n, a.rounds, a.swarm_procs, Path(tmp), profile))
            print(f"  {n} nodes: median coordinator CPU {results[-1]['median_cpu_s']:.2f} s/round", flush=True)
    base = results[0]
    lines = ["| nodes | rounds | accepted per round | coordinator CPU s/round (median) | CPU ms per node | "
             "vs linear from smallest | round wall s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        linear = base["median_cpu_s"] * r["nodes"] / base["nodes"]
        lines.append(f"| {r['nodes']} | {r['rounds']} | {r['accepted']} | {r['median_cpu_s']:.2f} | "
                     f"{r['cpu_ms_per_node']:.2f} | {r['median_cpu_s'] / linear:.2f}x | {r['median_round_wall_s']:.1f} |")
    table = "\n".join(lines)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
