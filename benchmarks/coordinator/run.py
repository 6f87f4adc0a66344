"""Coordinator cost per round with 100, 1,000 and 5,000 lightweight nodes (real MQTT clients, no training).

Starts its own broker on free ports (mosquitto, or with ``--broker nats`` a 3-member NATS JetStream cluster,
LocalNatsCluster), the real coordinator process (``fedspine coordinator``), with ``--regions K`` K regional
aggregators (``fedspine region``) that the swarm's nodes are spread over, and swarm processes of lightweight
nodes (``benchmarks.coordinator.swarm``); the coordinator records its own process CPU time per round in its
metrics.  With NATS the brokers' memory (RSS of the nats-server processes) is sampled.  Prints a table and writes
``results/coordinator.json`` / ``.md``.

    python -m benchmarks.coordinator.run [--sizes 100,1000,5000] [--rounds 3]
    nice -n 5 python -m benchmarks.coordinator.run --broker nats --sizes 20000 --regions 0,10 --rounds 2 \
        --out results/scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.brokers import mosquitto
from coordinator.simulate import write_toml

PASSWORD = "bench-secret"  # NATS: every process of the benchmark logs in as the one coordinator-permission user


@contextlib.contextmanager
def _broker(kind: str, workdir: Path, root: str):
    """Yield (list of (host, port) members, [broker] table for a client, RSS sampler or None)."""
    if kind == "mosquitto":
        with mosquitto(workdir) as (host, port):
            yield [(host, port)], {"url": f"mqtt://{host}:{port}", "topic_root": root}, None
        return
    from broker_config.nats import LocalNatsCluster

    with LocalNatsCluster({"coordinator": PASSWORD}, root=root, workdir=workdir, monitor_users=()) as c:
        sampler = RssSampler([p.pid for p in c.procs if p is not None])
        sampler.start()
        try:
            yield ([(c.host, p) for p in c.mqtt_ports],
                   {"url": c.urls, "topic_root": root, "username": "coordinator", "password": PASSWORD}, sampler)
        finally:
            sampler.stop()


class RssSampler(threading.Thread):
    """Samples the summed resident memory of some processes every second (the broker's memory)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.samples, self._stop = pids, [], threading.Event()

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        return total / 1024

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(self.rss_mb())

    def stop(self) -> None:
        self._stop.set()


def measure(n: int, rounds: int, swarm_procs: int, workdir: Path, profile: Path | None = None,
            broker: str = "mosquitto", regions: int = 0, node_qos: int = 1, method: str = "fedspine") -> dict:
    root = f"fedspine/bench{n}r{regions}"
    tag = f"{broker}-{n}-r{regions}"
    with _broker(broker, workdir / f"broker-{tag}", root) as (members, table, sampler):
        metrics = workdir / f"state-{tag}" / "metrics.jsonl"
        cfg = workdir / f"coordinator-{tag}.toml"
        write_toml(cfg, {
            "broker": table,
            "coordinator": {"rounds": rounds, "method": method, "min_nodes": n,
                            "local_steps": 1,
                            "deadline_s": 300.0, "state_dir": str(workdir / f"state-{tag}"),
                            "join_timeout_s": 900.0},
        })
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SWARM_PASSWORD": PASSWORD}
        t0 = time.monotonic()
        prof = ["-m", "cProfile", "-o", str(profile / f"coordinator-{tag}.prof")] if profile else []
        err = open(workdir / f"coordinator-{tag}.log", "w")  # noqa: SIM115 - closed below
        coord = subprocess.Popen([sys.executable, *prof, "-m", "shared.cli", "--log-format", "json", "--log-level",
                                  "WARNING", "coordinator", "--config", str(cfg)], env=env, stderr=err)
        # A clustered engine sets up each subscription (NATS: a replicated JetStream consumer): the coordinator's
        # and the regions' are made before the swarm's thousands of sessions load the cluster.
        settle = 15.0 if broker == "nats" else 0.0
        time.sleep(settle)
        procs = []
        # nodes spread over the regions (or all under the root), each region's over swarm processes and members
        groups = [(f"{root}/region/r{k}", f"r{k}") for k in range(regions)] or [(root, None)]
        per_group = -(-n // len(groups))
        procs_per_group = max(1, swarm_procs // len(groups))
        # NATS: paced connects, about 150 sessions a second over all swarm processes (see swarm.run)
        n_swarms = len(groups) * procs_per_group
        auth = ["--username", "coordinator", "--qos", str(node_qos),
                "--connect-rate", str(round(150 / n_swarms, 1))] if broker == "nats" else []
        for k, (_, rid) in enumerate(groups):
            if rid is None:
                continue
            rcfg = workdir / f"region-{tag}-{rid}.toml"
            shift = k % len(members)
            urls = [f"mqtt://{h}:{p}" for h, p in members[shift:] + members[:shift]]
            write_toml(rcfg, {"broker": {**table, "url": urls if broker == "nats" else table["url"]},
                              "region": {"region_id": rid, "deadline_s": 240.0}})
            procs.append(subprocess.Popen([sys.executable, "-m", "shared.cli", "--log-format", "json",
                                           "--log-level", "WARNING", "region", "--config", str(rcfg)], env=env))
        if regions:
            time.sleep(settle)
        for k, (sub_root, _) in enumerate(groups):
            first, count = k * per_group, min(per_group, n - k * per_group)
            per = -(-count // procs_per_group)
            for i in range(procs_per_group):
                if i * per >= count:
                    break
                host, port = members[(k * procs_per_group + i) % len(members)]
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.coordinator.swarm", "--host", host, "--port", str(port),
                     "--root", sub_root, "--first", str(first + i * per), "--count", str(min(per, count - i * per)),
                     *auth], env=env))
        coord.wait()
        err.close()
        wall = time.monotonic() - t0
        broker_mb = sampler.rss_mb() if sampler else None
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        if coord.returncode != 0:
            tail = (workdir / f"coordinator-{tag}.log").read_text()[-2000:]
            raise RuntimeError(f"coordinator failed for n={n}: {tail}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    per_round = [r for r in rows if r.get("kind") == "round"]
    cpu = [r["coordinator_cpu_s"] for r in per_round]
    out = {"nodes": n, "broker": broker, "method": method, "regions": regions, "node_qos": node_qos, "rounds": len(per_round),
           "accepted": [r["accepted"] for r in per_round], "cpu_s_per_round": cpu, "median_cpu_s": statistics.median(cpu),
           "cpu_ms_per_node": 1000 * statistics.median(cpu) / n,
           "round_wall_s": [r["round_wall_s"] for r in per_round],
           "median_round_wall_s": statistics.median(r["round_wall_s"] for r in per_round), "total_wall_s": wall}
    if regions:
        out["region_cpu_s_per_round"] = [r.get("region_cpu_s") for r in per_round]
    if sampler is not None:
        out.update(broker_rss_mb_peak=round(max(sampler.samples, default=0.0), 1),
                   broker_rss_mb_end=round(broker_mb or 0.0, 1), broker_members=len(members))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swarm-procs", type=int, default=4)
    ap.add_argument("--broker", choices=("mosquitto", "nats"), default="mosquitto",
                    help="nats: a 3-member JetStream cluster (LocalNatsCluster)")
    ap.add_argument("--regions", default="0", help="comma list of regional aggregator counts (0: flat)")
    ap.add_argument("--node-qos", type=int, default=0, choices=(0, 1),
                    help="NATS: QoS of the swarm nodes' config subscription (1 costs a replicated JetStream "
                         "consumer per node: on 2 cores their creation times out from a few hundred nodes)")
    ap.add_argument("--method", default="fedspine", help="the coordinator's method, flat and under regions alike")
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
            for k in (int(x) for x in a.regions.split(",")):
                results.append(measure(n, a.rounds, a.swarm_procs, Path(tmp), profile, a.broker, k, a.node_qos,
                                       a.method))
                print(f"  {n} nodes, {k} regions: median coordinator CPU {results[-1]['median_cpu_s']:.3f} s/round",
                      flush=True)
                out = Path(a.out)  # after each size: a long run keeps what it measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2))
    base = results[0]
    lines = ["| broker | method | nodes | regions | accepted per round | root CPU s/round (median) | CPU ms per node | "
             "vs linear from first | round wall s | broker RSS MB (peak) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        linear = base["median_cpu_s"] * r["nodes"] / base["nodes"]
        lines.append(f"| {r['broker']} | {r['method']} | {r['nodes']} | {r['regions']} | {r['accepted']} | "
                     f"{r['median_cpu_s']:.3f} | "
                     f"{r['cpu_ms_per_node']:.3f} | {r['median_cpu_s'] / linear:.2f}x | {r['median_round_wall_s']:.1f} | "
                     f"{r.get('broker_rss_mb_peak', '-')} |")
    table = "\n".join(lines)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
