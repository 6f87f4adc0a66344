"""Fault injection with the real services over a real mosquitto: coordinator and node agents (fake trainers) in
this process, each with its own MqttTransport and credentials, so presence, wills, reconnects and the round
loop are the production code paths; only the training is simulated (fixed delays, small LoRA updates)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from coordinator.state import CheckpointStore
from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from shared.messages import NodeStatus, decode
from tests.broker import Inbox, TransportFactory, running_broker
from tests.coordinator.test_rounds import FakeTrainer

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
KEEPALIVE_S = 5


class SlowTrainer(FakeTrainer):
    """A FakeTrainer whose training rounds (not the final evaluation-only sync) take ``delay_s``."""

    def run_round(self, *, local_steps, **kw):  # type: ignore[no-untyped-def, override]
        delay, self.delay_s = self.delay_s, (self.delay_s if local_steps > 0 else 0.0)
        try:
            return super().run_round(local_steps=local_steps, **kw)
        finally:
            self.delay_s = delay


@dataclass
class Fleet:
    coordinator: Coordinator
    agents: dict[str, NodeAgent]
    thread: threading.Thread
    out: dict = field(default_factory=dict)
    state_dir: Path = Path()

    def rows(self, kind: str) -> list[dict]:
        lines = (self.state_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@contextmanager
def fleet(broker, tmp_path: Path, trainers: dict[str, FakeTrainer], **coordinator) -> Iterator[Fleet]:
    def broker_section(user: str) -> dict:
        b = broker.broker_config(user, keepalive_s=KEEPALIVE_S, reconnect_min_s=0.2, reconnect_max_s=2.0)
        return {k: v for k, v in asdict(b).items() if v is not None}

    state_dir = tmp_path / "coord"
    cfg = CoordinatorConfig.from_dict({
        "broker": broker_section("coordinator"),
        "coordinator": {"rounds": 1, "min_nodes": len(trainers), "local_steps": 2, "deadline_s": 60.0,
                        "state_dir": str(state_dir), "export_at_end": False, "join_timeout_s": 30.0, **coordinator}})
    coord = Coordinator(cfg)
    agents = {}
    for nid, tr in trainers.items():
        ncfg = NodeConfig.from_dict({"broker": broker_section(nid), "node": {"id": nid, "state_dir": str(tmp_path / nid)}})
        agents[nid] = NodeAgent(ncfg, trainer=tr)
    for a in agents.values():
        threading.Thread(target=a.run, daemon=True).start()
    f = Fleet(coord, agents, threading.Thread(target=lambda: None), state_dir=state_dir)
    f.thread = threading.Thread(target=lambda: f.out.setdefault("summary", coord.run()), daemon=True)
    f.thread.start()
    try:
        yield f
    finally:
        coord.stop()
        f.thread.join(30)
        for a in agents.values():
            a.stop()


def test_local_round_far_longer_than_keepalive_keeps_connection_and_presence(tmp_path, reliability) -> None:
    """A slow device trains for 5 x the keep-alive: no false 'offline', no reconnect, its update is accepted."""
    with running_broker(tls=False) as broker:
        watch = TransportFactory(broker)
        statuses = Inbox()
        watch("monitor", subscriptions={"fedspine/v1/node/+/status": statuses})
        trainers = {"node-a": SlowTrainer("node-a"), "node-b": SlowTrainer("node-b", delay_s=5 * KEEPALIVE_S)}
        try:
            with fleet(broker, tmp_path, trainers) as f:
                f.thread.join(120)
                assert not f.thread.is_alive(), "the run did not finish"
                seen = [decode(p, NodeStatus) for t, p in list(statuses.items) if p and t.endswith("/node-b/status")]
                slow_transport = f.agents["node-b"].transport
                assert slow_transport.connects == 1 and slow_transport.connected.is_set()
            summary = f.out["summary"]
            assert summary.rounds_done == 1 and not summary.stopped_early
            node_rows = {r["node"]: r for r in f.rows("node") if not r.get("eval_only")}
            assert node_rows["node-b"]["status"] == "ok" and node_rows["node-a"]["status"] == "ok"
            assert node_rows["node-b"]["wall_s"] >= 5 * KEEPALIVE_S - 1
            assert [s.state for s in seen] and all(s.state == "online" for s in seen), [s.state for s in seen]
            assert trainers["node-b"].calls[0][2] == 2  # its configuration arrived intact (local_steps)
        finally:
            watch.close()
    reliability.add("faults", f"local round of {5 * KEEPALIVE_S} s with a {KEEPALIVE_S} s MQTT keep-alive "
                    "(slow device)", 1, "one connection throughout, only 'online' presence, update accepted")


def test_broker_restart_mid_round_clients_reconnect_and_the_run_completes(tmp_path, reliability) -> None:
    """mosquitto stops while the nodes train and comes back 2 s later: everyone reconnects by itself, the round
    completes or is retried, and the run ends with every round aggregated once and checkpointed."""
    with running_broker(tls=False) as broker:
        trainers = {n: SlowTrainer(n, delay_s=4.0) for n in ("node-a", "node-b")}
        with fleet(broker, tmp_path, trainers, rounds=2, deadline_s=25.0, max_retries=3) as f:
            deadline = time.monotonic() + 60
            while not all(t.calls for t in trainers.values()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert all(t.calls for t in trainers.values()), "round 1 never started"
            broker.stop()  # in the middle of the local round
            time.sleep(2.0)
            broker.start()
            f.thread.join(180)
            assert not f.thread.is_alive(), "the run did not finish after the broker restart"
            transports = [f.coordinator.transport, *(a.transport for a in f.agents.values())]
            assert all(t.connects >= 2 for t in transports), [t.connects for t in transports]
        summary = f.out["summary"]
        assert summary.rounds_done == 2 and not summary.stopped_early, summary
        rounds = f.rows("round")
        assert [r["round"] for r in rounds] == [1, 2]  # each round aggregated exactly once
        assert all(r["accepted"] >= 1 for r in rounds)
        ckpt = CheckpointStore(f.state_dir).load()
        assert ckpt is not None and ckpt["round"] == 2
    reliability.add("faults", "broker restarted (stop, 2 s down, start) during round 1's local training", 1,
                    f"coordinator and {len(trainers)} nodes reconnected by themselves; rounds 1-2 aggregated once "
                    f"each (accepted {[r['accepted'] for r in rounds]}); checkpoint at round 2")
