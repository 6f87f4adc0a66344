"""Fault injection with the real services over a real mosquitto: coordinator and node agents (fake trainers) in
this process, each with its own MqttTransport and credentials, so presence, wills, reconnects and the round
loop are the production code paths; only the training is simulated (fixed delays, small LoRA updates)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from coordinator.aggregation import GlobalLora
from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from coordinator.simulate import write_toml
from coordinator.state import CheckpointStore
from coordinator.strategies import NodeResult
from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from shared import transport
from shared.messages import NodeStatus, decode
from shared.updates import LORA_ALPHA, LoraUpdate
from tests.broker import Inbox, TransportFactory, running_broker
from tests.coordinator.test_rounds import FakeTrainer
from tests.integration.fleet import stop_processes

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
KEEPALIVE_S = 5


@pytest.fixture(autouse=True)
def fast_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process transports get a short keep-alive and quick reconnects (module constants, not config)."""
    monkeypatch.setattr(transport, "KEEPALIVE_S", KEEPALIVE_S)
    monkeypatch.setattr(transport, "RECONNECT_MIN_S", 0.2)
    monkeypatch.setattr(transport, "RECONNECT_MAX_S", 2.0)


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
        b = broker.broker_config(user)
        return {k: v for k, v in asdict(b).items() if v is not None}

    state_dir = tmp_path / "coord"
    cfg = CoordinatorConfig.from_dict({
        "broker": broker_section("coordinator"),
        "coordinator": {"method": "fedspine", "rounds": 1, "min_nodes": len(trainers), "local_steps": 2, "deadline_s": 60.0,
                        "state_dir": str(state_dir), "join_timeout_s": 30.0, **coordinator}})
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
            replayed = check_global_is_the_aggregate(f.state_dir, {k: v for t in trainers.values() for k, v in t.sent.items()})
        finally:
            watch.close()
    reliability.add("faults", f"local round of {5 * KEEPALIVE_S} s with a {KEEPALIVE_S} s MQTT keep-alive "
                    "(slow device)", 1, "one connection throughout, only 'online' presence, update accepted; global model = "
                    f"replayed aggregate of the {replayed} accepted updates")


def test_broker_restart_mid_round_clients_reconnect_and_the_run_completes(tmp_path, reliability) -> None:
    """mosquitto stops while the nodes train and comes back 2 s later: everyone reconnects by itself, the round
    completes or is retried, and the run ends with every round aggregated once and checkpointed."""
    with running_broker(tls=False) as broker:
        trainers = {n: SlowTrainer(n, delay_s=4.0) for n in ("node-a", "node-b")}
        with fleet(broker, tmp_path, trainers, rounds=2, deadline_s=25.0) as f:  # MAX_RETRIES = 3
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
        replayed = check_global_is_the_aggregate(f.state_dir, {k: v for t in trainers.values() for k, v in t.sent.items()})
    reliability.add("faults", "broker restarted (stop, 2 s down, start) during round 1's local training", 1,
                    f"coordinator and {len(trainers)} nodes reconnected by themselves; rounds 1-2 aggregated once "
                    f"each (accepted {[r['accepted'] for r in rounds]}); checkpoint at round 2 = replayed aggregate of the "
                    f"{replayed} accepted updates")


# ---- node processes (tests/reliability/fake_node.py) -------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]
CHUNK = 16 * 1024


class NodeProcs:
    """Node agent processes with fake trainers; logs under <root>/logs; ``sent(node)`` = digests it uploaded."""

    def __init__(self, broker, root: Path) -> None:
        self.broker, self.root, self.procs = broker, root, {}

    def start(self, nid: str, *args: str) -> subprocess.Popen:
        b = self.broker.broker_config(nid, chunk_size=CHUNK)
        cfg = self.root / f"{nid}.toml"
        write_toml(cfg, {"broker": {k: v for k, v in asdict(b).items() if v is not None},
                         "node": {"id": nid, "state_dir": str(self.root / nid)}})
        log = self.root / "logs" / f"{nid}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        with open(log, "ab") as fh:
            p = subprocess.Popen([sys.executable, "-m", "tests.reliability.fake_node", "--config", str(cfg), *args],
                                 stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.procs[nid] = p
        return p

    def sent(self, nid: str) -> list[str]:
        f = self.root / nid / "sent.txt"
        return [line.split()[1] for line in f.read_text().splitlines()] if f.exists() else []

    def stop(self) -> None:
        stop_processes(self.procs.values(), timeout_s=15)


def spy_accepted(coord: Coordinator) -> tuple[list, list]:
    """Record (round, node, sha256 of the upload) for every accepted upload and (round, nodes) per aggregation."""
    accepted: list[tuple[int, str, str]] = []
    aggregated: list[tuple[int, list[str]]] = []
    accept, aggregate = coord._accept, coord.strategy.aggregate_round

    def _accept(p, log):  # type: ignore[no-untyped-def]
        res = accept(p, log)
        if isinstance(res, NodeResult):
            accepted.append((coord._active, p.assignment.node_id, hashlib.sha256(bytes(p.payload)).hexdigest()))
        return res

    def _aggregate(rnd, results, failures):  # type: ignore[no-untyped-def]
        aggregated.append((rnd, sorted(r.node_id for r in results)))
        return aggregate(rnd, results, failures)

    coord._accept = _accept  # type: ignore[method-assign]
    coord.strategy.aggregate_round = _aggregate  # type: ignore[method-assign]
    return accepted, aggregated


def check_nothing_lost(accepted, aggregated, nodes: NodeProcs, rounds_done: int) -> None:
    """Every aggregated update was accepted once in that round and is byte-identical to one its node sent."""
    accepted = [a for a in accepted if a[0] > 0]  # round 0: the final evaluation-only sync, never aggregated
    assert [r for r, _ in aggregated] == list(range(1, rounds_done + 1))  # each round aggregated exactly once
    for rnd, ids in aggregated:
        got = sorted(n for r, n, _ in accepted if r == rnd)
        assert got == ids, (rnd, got, ids)
    digests = [d for _, _, d in accepted]
    assert len(digests) == len(set(digests)), "an update was counted twice"
    for _, nid, d in accepted:
        assert d in nodes.sent(nid), f"{nid}: aggregated an update it never sent"


def check_global_is_the_aggregate(state_dir: Path, sent: dict[str, bytes], metrics: Path | None = None,
                                  deploy_rank: int = 8) -> int:
    """Rebuild the global model from scratch, round by round, from the updates *as their nodes sent them*
    (``sent``: sha256 -> payload), taking exactly those the coordinator's metrics record as accepted in each
    round; it must equal the checkpointed global model. Returns the number of updates replayed."""
    rows = [json.loads(x) for x in (metrics or state_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["round"] for r in rows if r.get("kind") == "round"]
    assert rounds == sorted(set(rounds)), rounds  # each round recorded once
    accepted = [r for r in rows if r.get("kind") == "node" and r.get("status") == "ok" and not r.get("eval_only")]
    digests = [r["update_sha256"] for r in accepted]
    assert len(digests) == len(set(digests)), "an update was counted twice"
    replay = GlobalLora()
    structure: dict[str, dict] = {}  # node -> kept rows/cols of its last accepted update (what it was sliced to)
    for rnd in rounds:
        mine = [r for r in accepted if r["round"] == rnd]
        assert mine, f"round {rnd} aggregated nothing"
        ups = [LoraUpdate.from_bytes(sent[r["update_sha256"]]) for r in mine]
        # Each node was sent the global state sliced to its structure at the deployed rank (or its own, if larger)
        # and started from that slice's leading components (``deploy_rank``: the coordinator's [lora] rank).
        ranks = [next(iter(u.modules.values())).rank for u in ups]
        starts = [replay.start_for(structure.get(r["node"]), k, max(k, deploy_rank), LORA_ALPHA)
                  for r, k in zip(mine, ranks, strict=True)]
        # Weighted by training examples (every node reports them), each change per local step (FedNova).
        assert all(r["examples"] > 0 and r["steps"] > 0 for r in mine)
        replay.aggregate([(u, float(r["examples"])) for r, u in zip(mine, ups, strict=True)], starts=starts,
                         steps=[r["steps"] for r in mine])
        for r, u in zip(mine, ups, strict=True):
            structure[r["node"]] = {n: (m.rows, m.cols) for n, m in u.modules.items()}
    ck = CheckpointStore(state_dir).load()
    assert ck is not None and ck["round"] == rounds[-1]
    got = {k: v for k, v in ck["strategy"]["tensors"].items() if not k.startswith("structure.")}
    want = {**replay.state_tensors(), **replay.momentum_tensors()}  # the server momentum's history too
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-5), k
    return len(accepted)


def sent_payloads(root: Path, node_ids) -> dict[str, bytes]:
    """What fake node processes under ``root`` uploaded (tests/reliability/fake_node.py)."""
    return {f.stem: f.read_bytes() for nid in node_ids for f in (root / nid / "sent").glob("*.safetensors")}


def coordinator_for(broker, tmp_path: Path, **settings) -> Coordinator:
    b = broker.broker_config("coordinator", chunk_size=CHUNK)
    cfg = CoordinatorConfig.from_dict({
        "broker": {k: v for k, v in asdict(b).items() if v is not None},
        "coordinator": {"method": "fedspine", "min_nodes": 2, "local_steps": 2, "state_dir": str(tmp_path / "coord"),
                        "join_timeout_s": 60.0, **settings}})
    return Coordinator(cfg)


def test_node_killed_mid_upload_and_restarted_takes_part_in_the_same_round(tmp_path, reliability) -> None:
    """node-b SIGKILLed after 3 of ~32 upload chunks and restarted 2 s later: the coordinator sees it come back
    before it reported, sends its configuration and slice again, and the round takes the restarted process's
    update; nothing of the killed process's partial transfer is aggregated."""
    ROUNDS = 5  # noqa: N806
    with running_broker(tls=False) as broker:
        nodes = NodeProcs(broker, tmp_path)
        watch = TransportFactory(broker)
        try:
            uploads = Inbox()
            watch("coordinator", subscriptions={"fedspine/v1/node/node-b/upload": uploads})
            coord = coordinator_for(broker, tmp_path, rounds=ROUNDS, deadline_s=15.0)
            accepted, aggregated = spy_accepted(coord)
            out: dict = {}
            t = threading.Thread(target=lambda: out.setdefault("s", coord.run()), daemon=True)
            t.start()
            nodes.start("node-a", "--send-delay", "0.1", "--kb", "512")  # rounds of a few seconds: time to rejoin
            nodes.start("node-b", "--send-delay", "0.25", "--kb", "512")  # ~32 chunks, ~8 s of upload
            assert uploads.wait_for(3, 90), "node-b never started uploading"
            nodes.procs["node-b"].send_signal(signal.SIGKILL)  # in the middle of its upload
            nodes.procs["node-b"].wait(10)
            killed_digest = nodes.sent("node-b")[0]
            time.sleep(2.0)
            nodes.start("node-b", "--kb", "512")  # restarted: same identity, state dir and model width
            t.join(180)
            assert not t.is_alive(), "the run did not finish"
            summary = out["s"]
        finally:
            coord.stop()
            nodes.stop()
            watch.close()
    assert summary.rounds_done == ROUNDS and not summary.stopped_early, summary
    assert aggregated[0] == (1, ["node-a", "node-b"]), aggregated  # the restarted node took part in round 1
    restarted_digest = nodes.sent("node-b")[1]  # its first upload after the restart
    assert (1, "node-b", restarted_digest) in accepted, accepted
    assert killed_digest != restarted_digest
    assert killed_digest not in [d for _, _, d in accepted]  # nothing of the partial transfer was aggregated
    check_nothing_lost(accepted, aggregated, nodes, ROUNDS)
    replayed = check_global_is_the_aggregate(tmp_path / "coord", sent_payloads(tmp_path, ("node-a", "node-b")))
    reliability.add("faults", "node SIGKILLed in the middle of its upload (after 3 of ~32 chunks), restarted 2 s "
                    "later", 1, f"the coordinator sent the restarted node round 1 again and aggregated its new update "
                    f"in round 1; the killed process's partial transfer discarded (aggregated per round: "
                    f"{[ids for _, ids in aggregated]}); global model = replayed aggregate of exactly the {replayed} "
                    f"accepted updates as sent, none twice")


def test_slow_uplink_is_cut_by_the_deadline_not_stalling_the_fleet(tmp_path, reliability) -> None:
    deadline_s = 8.0
    with running_broker(tls=False) as broker:
        nodes = NodeProcs(broker, tmp_path)
        try:
            coord = coordinator_for(broker, tmp_path, rounds=2, deadline_s=deadline_s)
            accepted, aggregated = spy_accepted(coord)
            out: dict = {}
            t = threading.Thread(target=lambda: out.setdefault("s", coord.run()), daemon=True)
            t.start()
            nodes.start("node-a")
            nodes.start("node-b", "--send-delay", "1.0", "--kb", "512")  # ~32 s of upload for an 8 s deadline
            t.join(150)
            assert not t.is_alive(), "the run did not finish"
            summary = out["s"]
        finally:
            coord.stop()
            nodes.stop()
    assert summary.rounds_done == 2 and not summary.stopped_early, summary
    rows = [json.loads(x) for x in (tmp_path / "coord" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r.get("kind") == "round"]
    assert all(r["round_wall_s"] < deadline_s + 5 for r in rounds), rounds  # the deadline ends the round
    slow = [r for r in rows if r.get("kind") == "node" and r["node"] == "node-b" and not r.get("eval_only")]
    assert slow and all(r["status"] == "timeout" for r in slow), slow
    assert all(ids == ["node-a"] for _, ids in aggregated), aggregated
    check_nothing_lost(accepted, aggregated, nodes, 2)
    replayed = check_global_is_the_aggregate(tmp_path / "coord", sent_payloads(tmp_path, ("node-a", "node-b")))
    reliability.add("faults", f"node with a slow uplink (1 s injected before each upload chunk, ~32 s per upload, "
                    f"deadline {deadline_s:.0f} s)", len(slow),
                    f"rounds ended at the deadline (wall {[round(r['round_wall_s'], 1) for r in rounds]} s); "
                    "node-b 'timeout', recorded for the bandit; node-a aggregated every round; global model = "
                    f"replayed aggregate of the {replayed} accepted updates")


def test_coordinator_killed_mid_round_resumes_from_checkpoint(tmp_path, reliability) -> None:
    """SIGKILL the coordinator process during round 2; restarted, it resumes from the round-1 checkpoint (same
    run id), re-runs round 2 once, and finishes: every round aggregated and recorded exactly once."""
    rounds = 4
    with running_broker(tls=False) as broker:
        nodes = NodeProcs(broker, tmp_path)
        b = broker.broker_config("coordinator", chunk_size=CHUNK)
        state = tmp_path / "coord"
        cfg = tmp_path / "coordinator.toml"
        write_toml(cfg, {"broker": {k: v for k, v in asdict(b).items() if v is not None},
                         "coordinator": {"method": "fedspine", "rounds": rounds, "min_nodes": 2, "local_steps": 2, "deadline_s": 30.0,
                                         "state_dir": str(state), "join_timeout_s": 60.0}})
        log = tmp_path / "logs" / "coordinator.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

        def start() -> subprocess.Popen:
            with open(log, "ab") as fh:
                return subprocess.Popen([sys.executable, "-m", "shared.cli", "--log-format", "json", "coordinator",
                                         "--config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)

        coord = start()
        try:
            for nid in ("node-a", "node-b"):
                nodes.start(nid, "--send-delay", "0.1", "--kb", "512")  # ~3 s uploads: time to strike mid-round
            store = CheckpointStore(state)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not ((ck := store.load()) and ck["round"] >= 1):
                time.sleep(0.1)
            assert ck and ck["round"] == 1, "round 1 was never checkpointed"
            run_id = ck["run_id"]
            time.sleep(1.5)  # round 2 is being collected now
            coord.send_signal(signal.SIGKILL)
            coord.wait(10)
            assert store.load()["round"] == 1  # killed before round 2 was committed
            coord = start()
            assert coord.wait(180) == 0
        finally:
            if coord.poll() is None:
                coord.kill()
            nodes.stop()
    ck = CheckpointStore(state).load()
    assert ck["round"] == rounds and ck["run_id"] == run_id
    events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["round"] == 1 and resumed[0]["run_id"] == run_id
    rows = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    done = [r["round"] for r in rows if r.get("kind") == "round"]
    assert done == list(range(1, rounds + 1)), done  # nothing lost, nothing counted twice
    accepted = [r["accepted"] for r in rows if r.get("kind") == "round"]
    assert all(a >= 1 for a in accepted)
    retries = sum(1 for e in events if e.get("event") == "round_below_quorum")
    replayed = check_global_is_the_aggregate(state, sent_payloads(tmp_path, ("node-a", "node-b")))
    node_events = [json.loads(x).get("event") for nid in ("node-a", "node-b")
                   for x in (tmp_path / "logs" / f"{nid}.log").read_text().splitlines() if x.startswith("{")]
    answered = node_events.count("config_repeated_report_resent")  # same round, same transfer: answered again
    superseded = node_events.count("round_superseded") + node_events.count("config_superseded_dropped")
    reliability.add("faults", "coordinator process SIGKILLed while collecting round 2, restarted", 1,
                    f"resumed from the round-1 checkpoint (same run id) and re-sent round 2's configuration; nodes "
                    f"answered it without retraining ({answered}x) or dropped the dead run's work ({superseded}x); "
                    f"round 2 retried {retries} time(s); rounds 1-{rounds} aggregated and "
                    f"recorded once each (accepted {accepted}); global model = replayed aggregate of exactly the "
                    f"{replayed} accepted updates as sent; exit 0")


# ---- real training: node and coordinator processes on a tiny BERT ----------------------------------------
def wire_payloads(chunks: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Whole uploads rebuilt from chunks captured on the wire (sha256 -> payload) by the project's Reassembler,
    which checks each transfer's digest; repeated chunks (resends) are dropped as duplicates."""
    from shared.chunking import Reassembler
    from shared.messages import Chunk

    r = Reassembler(max_bytes=512 * 1024 * 1024, timeout_s=3600.0)
    expected: set[str] = set()
    out = {}
    for _, raw in chunks:
        c = decode(raw, Chunk)
        if c.transfer_id not in expected:
            expected.add(c.transfer_id)
            r.expect(c.transfer_id, c.sender)
        whole = r.feed(c, c.sender)
        if whole is not None:
            out[c.digest] = bytes(whole)
    return out


def _events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


def test_real_training_fleet_survives_a_node_and_the_coordinator_killed(tmp_path, reliability) -> None:
    """Three node processes training a tiny BERT (real LoRA, pruning, importance): one node SIGKILLed during
    round 2 and restarted, then the coordinator SIGKILLed during round 3 and restarted. The run completes,
    every round is recorded once, and the checkpointed global model equals the aggregate of exactly the
    accepted updates as they crossed the wire (captured by an observer)."""
    from tests.integration.fleet import make_fleet, tiny_model

    nodes = ["agx-1", "nx-2", "tx2-3"]
    rounds = 4
    users = {"coordinator": "c-pw", "monitor": "m-pw", **{n: f"{n}-pw" for n in nodes}}
    with running_broker(tls=False, users=users) as broker:
        fleet = make_fleet(tmp_path, broker, tiny_model(tmp_path / "tiny-bert"), nodes, rounds=rounds,
                           local_steps=40, deadline_s=40.0)
        wire = Inbox()
        watch = TransportFactory(broker)
        watch("coordinator", "test-observer", subscriptions={f"{broker.root}/node/+/upload": wire})
        store = CheckpointStore(fleet.state_dir)
        try:
            for n in nodes:
                fleet.start(n)
            fleet.start("coordinator")
            def started(name: str, rnd: int, event: str) -> bool:
                return any(e.get("event") == event and e.get("round") == rnd for e in _events(fleet.logs(name)))

            assert fleet.wait_for(lambda: started("nx-2", 2, "round_config"), 180), fleet.logs("coordinator")[-3000:]
            fleet.kill("nx-2")  # while it trains round 2
            time.sleep(1.0)
            fleet.start("nx-2")
            assert fleet.wait_for(lambda: started("coordinator", 3, "round_started"), 180, poll_s=0.05)
            killed_at = store.load()["round"]  # round 3's configs and slices are out, the nodes train
            fleet.kill("coordinator")
            assert killed_at == 2, killed_at  # killed before round 3 was committed
            fleet.start("coordinator")
            rc = fleet.wait_coordinator(timeout_s=300)
        finally:
            fleet.stop()
            watch.close()
    assert rc == 0, fleet.logs("coordinator")[-3000:]
    rows = fleet.rows("round")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)), rows  # each round once, none lost
    trained = [r for r in fleet.rows("node") if not r.get("eval_only")]
    assert any(r["node"] == "nx-2" and r["status"] == "ok" and r["round"] > 2 for r in trained)  # it rejoined
    assert "resumed" in fleet.logs("coordinator")
    replayed = check_global_is_the_aggregate(fleet.state_dir, wire_payloads(wire.items), fleet.metrics,
                                             deploy_rank=4)  # make_fleet's [lora] rank
    exports = fleet.rows("export")
    assert sorted(e["node_id"] for e in exports) == nodes and all(e["status"] == "ok" for e in exports)
    reliability.add("faults", "real training (tiny BERT, 3 node processes): node SIGKILLed during round 2 and "
                    "restarted, then the coordinator SIGKILLed during round 3 and restarted", 2,
                    f"run completed (rounds 1-{rounds} once each, accepted {[r['accepted'] for r in rows]}); "
                    f"global model = replayed aggregate of exactly the {replayed} accepted updates captured on the "
                    "wire; every node exported its pruned model")
