"""Helpers to run a real fleet in tests: a mosquitto with per-node credentials, a tiny model, one coordinator
process and node processes (``python -m shared.cli …``), each with its own TOML config and data files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.simulate import write_toml
from tests.edge_node.tiny import make_model_folder, sentiment_rows, write_csv

REPO = Path(__file__).resolve().parents[2]


def stop_processes(procs, timeout_s: float = 20) -> None:
    """SIGTERM every process still running, wait, and SIGKILL the ones that did not exit in time."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def tiny_model(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        make_model_folder(folder, "bert", hidden=32, heads=4, intermediate=64, layers=2)
    return folder


@dataclass
class Fleet:
    """Configs and processes of one test fleet; ``stop()`` ends every process still running."""

    root: Path
    broker: object  # broker_config.local.LocalMosquitto
    model: Path
    node_ids: list[str]
    state_dir: Path
    metrics: Path
    coordinator_cfg: Path
    node_cfgs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    profiles: dict[str, dict] = field(default_factory=dict)  # node -> its simulated device profile

    def env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}

    def start(self, name: str) -> subprocess.Popen:
        """Start (or restart) ``coordinator`` or a node by id; logs append to <root>/logs/<name>.log."""
        cfg = self.coordinator_cfg if name == "coordinator" else self.node_cfgs[name]
        kind = "coordinator" if name == "coordinator" else "node"
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            cmd = [sys.executable, "-m", "shared.cli", "--log-format", "json", kind, "--config", str(cfg)]
            if name in self.profiles:  # a simulated device, as ``fedspine simulate`` starts it
                cmd = [sys.executable, "-m", "coordinator.simulate", "node", "--config", str(cfg),
                       "--profile", json.dumps(self.profiles[name])]
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO)
        self.procs[name] = p
        return p

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            p.wait(timeout=30)

    def wait_coordinator(self, timeout_s: float) -> int:
        return self.procs["coordinator"].wait(timeout=timeout_s)

    def stop(self) -> None:
        stop_processes(self.procs.values(), timeout_s=20)

    def rows(self, kind: str | None = None) -> list[dict]:
        if not self.metrics.exists():
            return []
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def logs(self, name: str) -> str:
        p = self.root / "logs" / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_for(self, predicate, timeout_s: float, poll_s: float = 0.2) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(poll_s)
        return False


def make_fleet(root: Path, broker, model: Path, node_ids: list[str], *, rounds: int = 3, method: str = "fedspine",
               local_steps: int = 3, deadline_s: float = 60.0, target_sparsity: float = 0.3, quorum: float = 0.5,
               samples: int = 96, coordinator: dict | None = None, node: dict | None = None,
               bandit: dict | None = None) -> Fleet:
    """Write every config and each node's own data files (an easy synthetic sentiment task)."""
    state_dir = root / "coordinator"
    metrics = state_dir / "metrics.jsonl"

    def broker_section(user: str) -> dict:
        return {"url": broker.url(), "username": user, "password": broker.users[user], "topic_root": broker.root}

    coord_cfg = root / "coordinator.toml"
    write_toml(coord_cfg, {
        "broker": broker_section("coordinator"),
        "coordinator": {"rounds": rounds, "method": method, "min_nodes": len(node_ids), "local_steps": local_steps,
                        "deadline_s": deadline_s, "state_dir": str(state_dir), "quorum": quorum, "join_timeout_s": 120.0, **(coordinator or {})},
        "pruning": {"target_sparsity": target_sparsity},
        "lora": {"rank": 4},
        "bandit": bandit or {},
    })
    fleet = Fleet(root=root, broker=broker, model=model, node_ids=list(node_ids), state_dir=state_dir,
                  metrics=metrics, coordinator_cfg=coord_cfg)
    test = write_csv(root / "test.csv", sentiment_rows(64, seed=999))
    for i, nid in enumerate(node_ids):
        (root / "nodes" / nid).mkdir(parents=True, exist_ok=True)
        data = write_csv(root / "nodes" / nid / "train.csv", sentiment_rows(samples, seed=i))
        cfg = root / "configs" / f"{nid}.toml"
        write_toml(cfg, {
            "broker": broker_section(nid),
            "node": {"id": nid, "device_type": ("agx", "nx", "tx2")[i % 3], "model_path": str(model),
                     "data_path": str(data), "test_path": str(test), "labels": ["neg", "pos"],
                     "state_dir": str(root / "nodes" / nid / "state"), "seed": i, **(node or {})},
            "train": {"batch_size": 8, "max_length": 16, "learning_rate": 5e-3, "test_batches": 4},
            "telemetry": {"interval_s": 1.0},
        })
        fleet.node_cfgs[nid] = cfg
        fleet.profiles[nid] = {"speed": (1.0, 0.5, 0.2)[i % 3], "uplink_mbps": 50.0, "latency_s": 0.0}
    return fleet
