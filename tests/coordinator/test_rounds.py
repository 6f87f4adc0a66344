"""The coordinator's round loop with real node agents over the in-memory bus (fake trainers, no broker)."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import structlog
import torch

from coordinator import planning
from coordinator.collect import quorum_count
from coordinator.config import CoordinatorConfig
from coordinator.server import MAX_RETRIES, Coordinator
from coordinator.state import CheckpointStore
from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from edge_node.engine import RoundResult
from shared.transport import MemoryBus, MemoryTransport
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate


class FakeTrainer:
    """Answers a round like LocalTrainer: an update at the assigned rank over its (shrinking) structure."""

    def __init__(self, name: str, behaviour: str = "ok", delay_s: float = 0.0, step_s: float = 0.0) -> None:
        self.name, self.behaviour, self.delay_s, self.step_s = name, behaviour, delay_s, step_s
        self.sparsity, self.calls, self.received, self.paces = 0.0, [], [], []
        self.sent: dict[str, bytes] = {}  # sha256 -> every update payload it produced

    def run_round(self, *, target_sparsity, rank, local_steps, global_update, importance=True, should_stop=None,
                  pace=None):
        self.calls.append((target_sparsity, rank, local_steps))
        self.paces.append(pace)
        self.received.append(global_update)
        if self.behaviour == "oom":
            raise MemoryError("CUDA out of memory (simulated)")
        time.sleep(self.delay_s + self.step_s * local_steps)
        self.sparsity = max(self.sparsity, target_sparsity)
        kept = max(1, round(8 * (1 - self.sparsity)))
        g = torch.Generator().manual_seed(len(self.calls) * 31 + len(self.name))
        m = ModuleUpdate(A=torch.randn(rank, 4, generator=g) * 0.1, B=torch.randn(kept, rank, generator=g) * 0.1,
                         rows=torch.arange(kept), cols=torch.arange(4), shape=(8, 4), scale=16.0 / rank)
        scores = {"0.heads": GroupScores(idx=torch.arange(2), score=torch.ones(2), size=2)} if importance else {}
        u = LoraUpdate({"layer.q": m}, {"classifier.weight": torch.ones(2, 4) * len(self.calls)}, scores)
        payload = u.to_bytes()
        self.sent[hashlib.sha256(payload).hexdigest()] = payload
        return RoundResult(update=u, payload=payload, loss_start=1.0, loss_end=0.9, samples=32, compute_s=0.01,
                          sparsity=self.sparsity, rank=rank, metrics={"test_accuracy": 0.5}, examples=64,
                           steps=(pace.max_steps + 1 if pace else local_steps + 1) if self.behaviour == "miscount"
                           else local_steps,
                           train_s=self.step_s * local_steps)


def start_fleet(tmp_path, trainers: dict[str, FakeTrainer], *, wire=None, **coordinator):
    bus = MemoryBus()
    cfg = CoordinatorConfig.from_dict({"coordinator": {"method": "fedspine", "rounds": 3, "min_nodes": len(trainers), "local_steps": 2,
                                                       "deadline_s": 5.0, "state_dir": str(tmp_path / "coord"),
                                                       "join_timeout_s": 10.0, **coordinator}})
    coord = Coordinator(cfg, transport=MemoryTransport(bus, "coordinator"))
    coord.transport.log = coord.log.bind(logger="transport")  # as the service's own MqttTransport logs
    agents = []
    for i, (nid, tr) in enumerate(trainers.items()):
        ncfg = NodeConfig.from_dict({"node": {"id": nid, "device_type": ("agx", "nx", "tx2")[i % 3],
                                              "state_dir": str(tmp_path / nid)}})
        a = NodeAgent(ncfg, trainer=tr)
        a.transport = MemoryTransport(bus, nid, on_connect=a._on_connect,
                                      will=(a.topics.node(nid, "status"), b""), log=a.log.bind(logger="transport"))
        agents.append(a)
        if wire is not None:
            wire(a, tr)
        threading.Thread(target=a.run, daemon=True).start()
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("summary", coord.run()), daemon=True)
    t.start()
    return coord, agents, t, out


def run_fleet(tmp_path, trainers: dict[str, FakeTrainer], **coordinator):
    """Run the fleet to the end (at most 60 s), stop the nodes; return the coordinator and its run summary."""
    coord, agents, t, out = start_fleet(tmp_path, trainers, **coordinator)
    t.join(60)
    for a in agents:
        a.stop()
    return coord, out["summary"]


def rows(tmp_path, kind):
    lines = (tmp_path / "coord" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_three_rounds_aggregate_and_checkpoint(tmp_path):
    trainers = {n: FakeTrainer(n) for n in ("agx-1", "nx-2", "tx2-3")}
    _, summary = run_fleet(tmp_path, trainers)
    assert summary.rounds_done == 3 and not summary.stopped_early
    assert [r["accepted"] for r in rows(tmp_path, "round")] == [3, 3, 3]
    for tr in trainers.values():
        assert tr.received[0] is None and all(g is not None for g in tr.received[1:])  # global slice from round 2
        assert tr.calls[-1][2] == 0  # the final sync: apply the aggregate and evaluate only
        # ... at the largest rank, whatever the node trained with: the export merges it at no inference cost
        assert tr.calls[-1][1] == 16 and {m.rank for m in tr.received[-1].modules.values()} == {16}
        assert tr.sparsity >= 0.3 - 1e-9
    ckpt = CheckpointStore(tmp_path / "coord").load()
    assert ckpt["round"] == 3 and "delta.layer.q" in ckpt["strategy"]["tensors"]


class LoggingTrainer(FakeTrainer):
    """Logs from inside its rounds through the logger it was given, as LocalTrainer does (``local_round``)."""

    log = None

    def run_round(self, **kw):  # type: ignore[no-untyped-def]
        self.log.info("inside_round", steps=kw["local_steps"])
        return super().run_round(**kw)


def test_every_log_line_names_its_node_and_round(tmp_path):
    """Services bind the node id once; the round comes from the round the process is in when the line is
    written, also for lines logged by parts that do not know it (the trainer, message decoding)."""
    trainers = {n: LoggingTrainer(n) for n in ("agx-1", "nx-2")}
    with structlog.testing.capture_logs() as lines:
        # the agent hands its logger to the trainer it builds (LocalTrainer(log=...))
        coord, agents, t, _ = start_fleet(tmp_path, trainers, wire=lambda a, tr: setattr(tr, "log", a.log))
        t.join(60)
        for a in agents:
            a.stop()
    assert lines and all("node_id" in e and "round" in e for e in lines), \
        [e for e in lines if "node_id" not in e or "round" not in e][:3]
    for nid in trainers:
        inside = [e["round"] for e in lines if e["event"] == "inside_round" and e["node_id"] == nid]
        assert inside == [1, 2, 3, 3]  # three rounds, then the final sync: round 3's aggregate, shown as round 3
        final = [e for e in lines if e["event"] == "round_config" and e["node_id"] == nid and e.get("final")]
        assert [e["round"] for e in final] == [3]
    assert [e["round"] for e in lines if e["event"] == "round_done"] == [1, 2, 3]
    joined = [e["round"] for e in lines if e["event"] == "node_joined"]
    assert len(joined) == 4 and set(joined) == {-1, 0}  # each node before its first round, the coordinator's


def test_the_retained_status_says_where_each_node_stands(tmp_path):
    """A monitor or mosquitto_sub started after the run sees each node's last round and its sparsity, not the
    round -1 and sparsity 0 it joined with."""
    from shared.messages import NodeStatus, decode

    trainers = {n: FakeTrainer(n) for n in ("agx-1", "nx-2")}
    coord, agents, t, _ = start_fleet(tmp_path, trainers)
    t.join(60)
    retained = {tp: decode(p, NodeStatus) for tp, p in coord.transport.bus.retained("fedspine/v1/node/+/status")}
    for a in agents:
        a.stop()
    assert sorted(s.node_id for s in retained.values()) == ["agx-1", "nx-2"]
    for st in retained.values():
        assert st.state == "online" and st.round == 3  # three rounds; the final sync evaluates round 3
        assert st.sparsity == trainers[st.node_id].sparsity >= 0.3 - 1e-9


class ResettableTrainer(FakeTrainer):
    resets = 0

    def reset(self):  # type: ignore[no-untyped-def]
        self.resets += 1
        self.sparsity = 0.0


def test_a_new_run_starts_from_the_base_model_and_a_resumed_one_continues(tmp_path):
    """Nodes stay up between jobs: a coordinator with a new run id (a new job, or one that lost its checkpoint)
    gets nodes that start from the base model, as its fresh global state assumes; a coordinator resumed from its
    checkpoint keeps its run id and its nodes keep their pruned state."""
    trainers = {n: ResettableTrainer(n) for n in ("agx-1", "nx-2")}
    coord, agents, t, _ = start_fleet(tmp_path, trainers, rounds=2)
    t.join(60)
    first_run = coord.run_id
    assert all(tr.resets == 0 and tr.sparsity >= 0.3 - 1e-9 for tr in trainers.values())

    def again(state_dir, rounds):
        cfg = CoordinatorConfig.from_dict({"coordinator": {
            "method": "fedspine", "rounds": rounds, "min_nodes": 2, "local_steps": 2, "deadline_s": 5.0, "state_dir": str(state_dir),
            "join_timeout_s": 10.0}})
        c = Coordinator(cfg, transport=MemoryTransport(coord.transport.bus, "coordinator"))
        summary = c.run()
        return c, summary

    resumed, summary = again(tmp_path / "coord", rounds=3)  # the same checkpoint: round 3 of the same run
    assert resumed.run_id == first_run and summary.rounds_done == 3
    assert all(tr.resets == 0 and tr.calls[-2][0] >= 0.3 - 1e-9 for tr in trainers.values())
    calls = {n: len(tr.calls) for n, tr in trainers.items()}

    fresh, summary = again(tmp_path / "coord-new", rounds=1)  # no checkpoint: a new run
    for a in agents:
        a.stop()
    assert fresh.run_id != first_run and summary.rounds_done == 1
    for n, tr in trainers.items():
        assert tr.resets == 1  # once, before the new run's first round, not again for its final sync
        assert len(tr.calls) == calls[n] + 2
    assert all((tmp_path / n / "run_id").read_text() == fresh.run_id for n in trainers)


def test_the_coordinator_waits_for_its_fleet_without_a_limit_by_default(tmp_path, monkeypatch):
    """A coordinator started while its Jetsons are still being provisioned waits for them (join_timeout_s 0, the
    default), saying who is missing, and starts when they come."""
    import coordinator.server as server

    monkeypatch.setattr(server, "WAIT_LOG_S", 0.3)
    assert CoordinatorConfig.from_dict({}).coordinator.join_timeout_s == 0.0
    with structlog.testing.capture_logs() as lines:
        coord, agents, t, out = start_fleet(tmp_path, {"agx-1": FakeTrainer("agx-1")}, min_nodes=2,
                                            join_timeout_s=0.0)
        end = time.monotonic() + 20  # the second Jetson is still being provisioned: three reminders go by
        while len([e for e in lines if e["event"] == "waiting_for_nodes"]) < 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert t.is_alive() and not [e for e in lines if e["event"] == "round_started"]
        late = NodeAgent(NodeConfig.from_dict({"node": {"id": "nx-2", "device_type": "nx",
                                                        "state_dir": str(tmp_path / "nx-2")}}),
                         trainer=FakeTrainer("nx-2"))
        late.transport = MemoryTransport(coord.transport.bus, "nx-2", on_connect=late._on_connect)
        threading.Thread(target=late.run, daemon=True).start()
        t.join(60)
        for a in [*agents, late]:
            a.stop()
    assert out["summary"].rounds_done == 3 and not out["summary"].stopped_early
    waiting = [e for e in lines if e["event"] == "waiting_for_nodes"]
    assert len(waiting) >= 3 and all(e["live"] == 1 and e["needed"] == 2 for e in waiting)
    assert [r["accepted"] for r in rows(tmp_path, "round")] == [2, 2, 2]


class LabelledTrainer(FakeTrainer):
    def __init__(self, name: str, labels: list[str]) -> None:
        super().__init__(name)
        self.labels = labels


def test_a_node_with_another_class_list_is_refused(tmp_path):
    """Non-IID data: a node whose local data lacks a class builds a head over the classes it has.  Averaging its
    head with the others' would mix different classes' rows, so the coordinator refuses it, once, by name."""
    three, two = ["negative", "neutral", "positive"], ["negative", "positive"]
    trainers = {"agx-1": LabelledTrainer("agx-1", three), "nx-2": LabelledTrainer("nx-2", two),
                "tx2-3": LabelledTrainer("tx2-3", three)}
    with structlog.testing.capture_logs() as lines:
        coord, summary = run_fleet(tmp_path, trainers, min_nodes=2, labels=three)
    assert summary.rounds_done == 3 and not summary.stopped_early
    assert trainers["nx-2"].calls == [] and len(trainers["agx-1"].calls) == len(trainers["tx2-3"].calls) == 4
    refused = [e for e in lines if e["event"] == "node_refused_labels"]
    assert len(refused) == 1 and refused[0]["node"] == "nx-2" and refused[0]["labels"] == two
    assert refused[0]["fleet_labels"] == three and "edge_node_labels" in refused[0]["hint"]
    told = [e for e in lines if e["event"] == "refused_by_coordinator"]  # the node's own log says why
    assert told and {e["node_id"] for e in told} == {"nx-2"} and "labels" in told[0]["reason"]
    assert CheckpointStore(tmp_path / "coord").load()["labels"] == three
    assert {r["node"] for r in rows(tmp_path, "node")} == {"agx-1", "tx2-3"}


class BasedTrainer(FakeTrainer):
    def __init__(self, name: str, base_model: str) -> None:
        super().__init__(name)
        self.base_model = base_model


@pytest.mark.parametrize("pinned", [False, True])
def test_a_node_on_another_base_model_is_refused(tmp_path, pinned):
    """A Jetson provisioned with another copy of the model (another release, a re-trained checkpoint) has the
    fleet's shapes, so its updates would pass every shape check and be averaged with updates made on other
    weights.  The coordinator refuses it by its base-model digest, once, by name; pinned, even if it joins first."""
    ours, other = hashlib.sha256(b"ours").hexdigest(), hashlib.sha256(b"other").hexdigest()
    # Unpinned, the first node to join sets the fleet's digest, so the odd one starts last; pinned, it starts first.
    order = [("nx-2", other), ("agx-1", ours), ("tx2-3", ours)] if pinned else \
        [("agx-1", ours), ("tx2-3", ours), ("nx-2", other)]
    trainers = {n: BasedTrainer(n, d) for n, d in order}

    def late(agent, trainer):  # the unpinned fleet's first two nodes have joined before the odd one starts
        if not pinned and trainer.base_model == other:
            time.sleep(0.5)

    with structlog.testing.capture_logs() as lines:
        coord, summary = run_fleet(tmp_path, trainers, min_nodes=2, wire=late,
                                   **({"base_model": ours} if pinned else {}))
    assert summary.rounds_done == 3 and not summary.stopped_early
    wrong = {n for n, t in trainers.items() if t.base_model == other}
    for n, t in trainers.items():
        assert (t.calls == []) == (n in wrong), n
    refused = [e for e in lines if e["event"] == "node_refused_base_model"]
    assert sorted(e["node"] for e in refused) == sorted(wrong)
    assert all(e["base_model"] == other and e["fleet_base_model"] == ours and "[coordinator] base_model" in e["hint"]
               for e in refused)
    assert CheckpointStore(tmp_path / "coord").load()["base_model"] == ours
    assert {r["node"] for r in rows(tmp_path, "node")} == set(trainers) - wrong


def test_the_global_model_does_not_depend_on_the_order_uploads_arrive_in(tmp_path):
    """The same updates arriving in the opposite order give a bit-identical global model (floating-point sums
    are taken in node order), so a run is reproducible and its audit replay exact."""
    names = ("agx-1", "nx-2", "tx2-3")
    state = {}
    for order, delays in (("forward", (0.0, 0.15, 0.3)), ("reverse", (0.3, 0.15, 0.0))):
        run_fleet(tmp_path / order, {n: FakeTrainer(n, delay_s=d) for n, d in zip(names, delays, strict=True)},
                  method="fedlora", deadline_s=10.0)
        state[order] = CheckpointStore(tmp_path / order / "coord").load()["strategy"]["tensors"]
    assert state["forward"].keys() == state["reverse"].keys()
    for k, v in state["forward"].items():
        assert torch.equal(v, state["reverse"][k]), k


def test_oom_node_is_reported_and_the_round_goes_on(tmp_path):
    trainers = {"agx-1": FakeTrainer("agx-1"), "nx-2": FakeTrainer("nx-2"), "tx2-3": FakeTrainer("tx2-3", "oom")}
    coord, summary = run_fleet(tmp_path, trainers, rounds=2)
    assert summary.rounds_done == 2
    node_rows = [r for r in rows(tmp_path, "node") if not r.get("eval_only")]
    assert {r["status"] for r in node_rows if r["node"] == "tx2-3"} == {"oom"}
    assert [r["accepted"] for r in rows(tmp_path, "round")] == [2, 2]
    first, second = trainers["tx2-3"].calls[:2]
    # the arm that ran out of memory and every heavier one (same or lower sparsity, same or higher rank) is gone
    assert not (second[0] <= first[0] + 1e-9 and second[1] >= first[1])
    assert coord.registry.is_live("tx2-3")  # the node stayed alive


def test_fast_nodes_are_given_more_steps_and_a_miscounted_round_is_rejected(tmp_path):
    trainers = {"agx-1": FakeTrainer("agx-1", step_s=0.01), "nx-2": FakeTrainer("nx-2", "miscount", step_s=0.01),
                "tx2-3": FakeTrainer("tx2-3", step_s=0.1)}
    _, summary = run_fleet(tmp_path, trainers, rounds=2)
    assert summary.rounds_done == 2
    assert [c[2] for c in trainers["agx-1"].calls[:2]] == [2, 10]  # τ, then 5τ: it would finish 10x early
    assert [c[2] for c in trainers["tx2-3"].calls[:2]] == [2, 2]  # the slowest runs τ
    node_rows = [r for r in rows(tmp_path, "node") if not r.get("eval_only")]
    assert {r["status"] for r in node_rows if r["node"] == "nx-2"} == {"rejected"}  # ran one step it was not given
    assert [r["steps"] for r in node_rows if r["node"] == "agx-1"] == [2, 10]


def test_aligned_rounds_are_paced_to_the_planned_finish(tmp_path):
    """From round 2 (timing known) every node is sent the round's planned finish and the step range [⌈τ/2⌉, cap]; its
    agent turns them into the engine's Pace on its own clock, leaving room for the round's upload."""
    trainers = {"agx-1": FakeTrainer("agx-1", step_s=0.01), "tx2-3": FakeTrainer("tx2-3", step_s=0.1)}
    coord, summary = run_fleet(tmp_path, trainers, rounds=2)
    assert summary.rounds_done == 2
    node_rows = [r for r in rows(tmp_path, "node") if not r.get("eval_only") and r["round"] == 2]
    finish = {r["finish_s"] for r in node_rows}
    # one finish for the round: about the TX2's 2 steps of 0.1 s (scaled to its new sparsity by the step-cost model)
    assert len(finish) == 1 and 0.1 < next(iter(finish)) < 1.0
    for tr in trainers.values():
        assert tr.paces[0] is None  # round 1: no timing yet, so nothing to pace to
        pace = tr.paces[1]
        assert (pace.min_steps, pace.max_steps) == (1, 10)  # τ = 2
        assert 0 < pace.finish_s <= next(iter(finish))  # less the time since the config arrived and the upload
        assert tr.paces[-1] is None  # the final sync evaluates only


class CalibratedTrainer(FakeTrainer):
    """A FakeTrainer that, like LocalTrainer, times its steps before the node joins."""

    rank = 4  # the LoRA rank it times them at

    def calibrate(self, steps):
        return {"step_s": self.step_s, "step_cpu_s": self.step_s, "fixed_s": 0.0, "fixed_cpu_s": 0.0}


def test_the_first_round_is_aligned_from_the_timing_nodes_measured_at_startup(tmp_path):
    trainers = {"agx-1": CalibratedTrainer("agx-1", step_s=0.01), "nx-2": FakeTrainer("nx-2", step_s=0.01),
                "tx2-3": CalibratedTrainer("tx2-3", step_s=0.1)}
    coord, summary = run_fleet(tmp_path, trainers, rounds=1)
    assert summary.rounds_done == 1
    assert trainers["agx-1"].calls[0][2] == 10  # 5τ from round 1 on: its startup timing said 10x faster
    assert trainers["tx2-3"].calls[0][2] == 2 and trainers["nx-2"].calls[0][2] == 2  # slowest; no timing: τ
    info = {n.node_id: n for n in coord.registry.live()}
    assert info["agx-1"].step_s == pytest.approx(0.01) and info["nx-2"].step_s == 0.0
    assert info["agx-1"].step_sparsity == 0.0  # the configuration it timed
    a = coord.strategy._pending["tx2-3"][0]  # after the round, the timing belongs to the round's configuration
    assert coord.strategy.nodes["tx2-3"].speeds[-1][1] == pytest.approx(0.1 / planning.step_cost(a.target_sparsity))


def test_a_node_stopped_while_it_loads_leaves_without_joining(tmp_path):
    """SIGTERM during model loading or calibration (a benchmark stopped at startup): the node, connected while it
    loads, must not go on to announce itself; it closes its connection gracefully (no will)."""
    bus = MemoryBus()
    seen = []
    watcher = MemoryTransport(bus, "watcher")
    watcher.subscribe("fedspine/#", lambda topic, payload: seen.append(topic))
    watcher.start()
    ncfg = NodeConfig.from_dict({"node": {"id": "tx2-3", "device_type": "tx2", "state_dir": str(tmp_path / "n")}})
    tr = CalibratedTrainer("tx2-3")
    a = NodeAgent(ncfg, trainer=tr)
    a.transport = MemoryTransport(bus, "tx2-3", on_connect=a._on_connect, will=(a.topics.node("tx2-3", "status"), b""))
    tr.calibrate = lambda steps: (a.stop(), CalibratedTrainer.calibrate(tr, steps))[1]  # the signal arrives here
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("rc", a.run()), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and out["rc"] == 0
    assert not a.transport.connected.is_set() and seen == []  # disconnected, never announced, no will
    assert tr.calls == []


def test_a_stopped_node_says_so_and_leaves_its_presence_offline(tmp_path):
    from shared.messages import NodeStatus, decode

    bus = MemoryBus()
    status: list[NodeStatus] = []
    watcher = MemoryTransport(bus, "watcher")
    watcher.subscribe("fedspine/v1/node/+/status", lambda topic, payload: status.append(decode(payload, NodeStatus)))
    watcher.start()
    ncfg = NodeConfig.from_dict({"node": {"id": "orin-7", "device_type": "nx", "state_dir": str(tmp_path / "n")}})
    a = NodeAgent(ncfg, trainer=FakeTrainer("orin-7"))
    a.transport = MemoryTransport(bus, "orin-7", on_connect=a._on_connect, will=(a.topics.node("orin-7", "status"), b""))
    out = {}
    with structlog.testing.capture_logs() as lines:
        t = threading.Thread(target=lambda: out.setdefault("rc", a.run()), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not status and time.monotonic() < deadline:
            time.sleep(0.05)
        a.stop()
        t.join(10)
    assert not t.is_alive() and out["rc"] == 0
    assert [s.state for s in status][-1] == "offline"
    events = [e["event"] for e in lines if e.get("node_id") == "orin-7"]  # other tests' agents may still stop
    assert events.count("node_stopped") == 1 and events[-1] == "node_stopped", events[-5:]


def test_silent_node_times_out_without_stalling_the_fleet(tmp_path):
    trainers = {"agx-1": FakeTrainer("agx-1"), "nx-2": FakeTrainer("nx-2"),
                "tx2-3": FakeTrainer("tx2-3", delay_s=30.0)}
    coord, agents, t, out = start_fleet(tmp_path, trainers, rounds=1, deadline_s=2.0)
    t0 = time.monotonic()
    t.join(30)
    assert time.monotonic() - t0 < 15  # the deadline, not the slow node, ends the round
    for a in agents:
        a.stop()
    assert out["summary"].rounds_done == 1
    statuses = {r["node"]: r["status"] for r in rows(tmp_path, "node") if not r.get("eval_only")}
    assert statuses == {"agx-1": "ok", "nx-2": "ok", "tx2-3": "timeout"}


def test_below_quorum_round_is_retried_then_training_stops(tmp_path):
    trainers = {n: FakeTrainer(n, "oom") for n in ("agx-1", "nx-2")}
    _, summary = run_fleet(tmp_path, trainers, rounds=2)
    assert summary.rounds_done == 0 and "quorum" in summary.stopped_early
    assert len(trainers["agx-1"].calls) == 1 + MAX_RETRIES  # the round was tried, then retried MAX_RETRIES times
    assert not (tmp_path / "coord" / "checkpoint.json").exists()


def test_the_quorum_is_the_share_of_participants_rounded_up_and_at_least_one():
    """``quorum_count``: the one rule of the root's flat and hierarchical rounds and of each region's."""
    assert [quorum_count(0.5, n) for n in range(6)] == [1, 1, 1, 2, 2, 3]
    assert quorum_count(1.0, 7) == 7 and quorum_count(0.01, 7) == 1 and quorum_count(0.3, 10) == 3
    # exactly ⌈q·n⌉ where q·n is a whole number that floating point overshoots (0.07 × 100 = 7.000000000000001)
    assert quorum_count(0.07, 100) == 7 and quorum_count(0.7, 10) == 7
    assert all(quorum_count(k / 100, n) == max(1, -(-k * n // 100)) for k in range(1, 101) for n in range(200))


@pytest.mark.parametrize("state", ["offline"])
def test_registry_ignores_unknown_offline_and_tracks_presence(state):
    from coordinator.registry import Registry
    from shared.messages import NodeStatus

    reg = Registry()
    assert reg.apply(NodeStatus(node_id="a", state=state, ts=1.0), 1.0, 0) is None
    assert reg.apply(NodeStatus(node_id="a", state="online", ts=1.0, device_type="nx"), 1.0, 0) == "joined"
    assert [n.node_id for n in reg.live(for_round=1)] == ["a"]
    assert reg.apply(NodeStatus(node_id="b", state="online", ts=2.0), 2.0, 1) == "joined"
    assert [n.node_id for n in reg.live(for_round=1)] == ["a"]  # b joined during round 1: from round 2 on
    assert [n.node_id for n in reg.live(for_round=2)] == ["a", "b"]
    assert reg.live_count() == 2
    assert reg.apply(NodeStatus(node_id="a", state="offline", ts=3.0), 3.0, 1) == "left"
    assert reg.apply(NodeStatus(node_id="a", state="offline", ts=3.5), 3.5, 1) is None  # no double count
    assert [n.node_id for n in reg.live()] == ["b"] and reg.live_count() == 1
    assert reg.apply(NodeStatus(node_id="b", state="online", ts=4.0), 4.0, 1) == "updated"
    assert reg.apply(NodeStatus(node_id="a", state="online", ts=5.0), 5.0, 1) == "joined"
    assert reg.live_count() == 2
    restored = Registry()
    restored.load_state_dict(reg.state_dict())
    assert restored.live_count() == 0  # presence is re-learnt from the broker after a restart


class StoppableTrainer(FakeTrainer):
    """A FakeTrainer whose local steps take ``step_s`` each and honour ``should_stop`` like LocalTrainer."""

    def __init__(self, name: str, step_s: float) -> None:
        super().__init__(name)
        self.step_s, self.interrupted = step_s, 0

    def run_round(self, *, local_steps, should_stop=None, **kw):  # type: ignore[no-untyped-def, override]
        from edge_node.engine import RoundInterrupted

        for _ in range(local_steps):
            if should_stop is not None and should_stop():
                self.interrupted += 1
                raise RoundInterrupted("stopped")
            time.sleep(self.step_s)
        return super().run_round(local_steps=local_steps, should_stop=should_stop, **kw)


@pytest.mark.parametrize("stage", ["waiting_for_download", "training"])
def test_a_newer_config_supersedes_the_round_in_progress(tmp_path, stage):
    """A restarted coordinator (new config for the same round) must not wait for the node to finish the dead
    run's round: the node drops it at once, without a report, and answers the newer config."""
    from shared.messages import RoundConfig, RoundReport, decode, encode

    bus = MemoryBus()
    tr = StoppableTrainer("n1", step_s=0.2)
    agent = NodeAgent(NodeConfig.from_dict({"node": {"id": "n1", "state_dir": str(tmp_path / "n1")}}), trainer=tr)
    agent.transport = MemoryTransport(bus, "n1", on_connect=agent._on_connect)
    reports: list[RoundReport] = []
    coord = MemoryTransport(bus, "coordinator")
    coord.subscribe("fedspine/v1/node/n1/report", lambda t, p: reports.append(decode(p, RoundReport)))
    coord.start()
    threading.Thread(target=agent.run, daemon=True).start()
    time.sleep(0.3)
    deadline = time.time() + 60
    old = RoundConfig(run_id="dead-run", round=2, target_sparsity=0.1, rank=4, local_steps=100, deadline_ts=deadline,
                      upload_transfer_id="up-old", download_transfer_id="down-old" if stage != "training" else None)
    new = RoundConfig(run_id="dead-run", round=2, target_sparsity=0.1, rank=4, local_steps=2, deadline_ts=deadline,
                      upload_transfer_id="up-new", download_transfer_id=None)
    topic = "fedspine/v1/node/n1/config"
    try:
        coord.publish(topic, encode(old))
        time.sleep(1.0)  # the old round is waiting for its global slice, or training (100 steps = 20 s)
        t0 = time.monotonic()
        coord.publish(topic, encode(new))
        end = time.monotonic() + 10
        while not reports and time.monotonic() < end:
            time.sleep(0.05)
        took = time.monotonic() - t0
        coord.publish(topic, encode(new))  # a redelivered config is answered again, not news
        time.sleep(0.5)
    finally:
        agent.stop()
        coord.stop()
    assert reports and reports[0].transfer_id == "up-new" and reports[0].status == "ok", reports
    assert all(r.transfer_id == "up-new" for r in reports)  # nothing was ever reported for the old round
    assert took < 5.0, took  # not the old round's 60 s deadline, nor its 20 s of training
    assert [c[2] for c in tr.calls] == [2]  # trained once, for the newer config only
    assert tr.interrupted == (1 if stage == "training" else 0)


def test_a_node_without_the_runs_final_model_does_not_export(tmp_path):
    """A node that joined after the last round (or whose final sync failed) holds no final model of the run: told
    to export, it says so instead of shipping the base model (or another run's) as the run's result."""
    from shared.messages import Command, ExportReport, RoundConfig, RoundReport, decode, encode

    bus = MemoryBus()
    agent = NodeAgent(NodeConfig.from_dict({"node": {"id": "n1", "state_dir": str(tmp_path / "n1")}}),
                      trainer=FakeTrainer("n1"))
    agent.transport = MemoryTransport(bus, "n1", on_connect=agent._on_connect)
    got: list = []
    coord = MemoryTransport(bus, "coordinator")
    coord.subscribe("fedspine/v1/node/n1/report", lambda t, p: got.append(decode(p, (RoundReport, ExportReport))))
    coord.start()
    threading.Thread(target=agent.run, daemon=True).start()

    def wait_for(n):
        end = time.monotonic() + 10
        while len(got) < n and time.monotonic() < end:
            time.sleep(0.05)
        return got[n - 1]

    try:
        time.sleep(0.3)
        export = encode(Command(command="export", run_id="r1", round=2))
        coord.publish("fedspine/v1/broadcast/command", export)
        skipped = wait_for(1)
        final = RoundConfig(run_id="r1", round=3, target_sparsity=0.3, rank=16, local_steps=0,
                            deadline_ts=time.time() + 30, upload_transfer_id="r1.r3.up", download_transfer_id=None)
        coord.publish("fedspine/v1/node/n1/config", encode(final))  # the final sync (round 3 of a 2-round run)
        assert isinstance(wait_for(2), RoundReport) and got[1].status == "ok"
        coord.publish("fedspine/v1/broadcast/command", export)
        attempted = wait_for(3)
    finally:
        agent.stop()
        coord.stop()
    assert isinstance(skipped, ExportReport) and skipped.status == "skipped" and "final sync" in skipped.error
    assert not (tmp_path / "n1" / "export").exists()
    # with the run's final model the export goes ahead (the fake trainer has no model to merge, so it fails there)
    assert isinstance(attempted, ExportReport) and attempted.status == "error" and "merged_model" in attempted.error


def test_a_restart_on_a_finished_state_directory_reports_the_run_once(tmp_path):
    """The finished run's final evaluation and exports are in metrics.jsonl once: a coordinator restarted on its state
    directory (a service restart after the run) neither evaluates nor exports again, nor waits for nodes."""
    trainers = {n: FakeTrainer(n) for n in ("agx-1", "nx-2")}
    coord, summary = run_fleet(tmp_path, trainers, rounds=2)
    assert summary.rounds_done == 2 and len(rows(tmp_path, "export")) == 2
    before = (tmp_path / "coord" / "metrics.jsonl").read_text()
    cfg = CoordinatorConfig.from_dict({"coordinator": {"method": "fedspine", "rounds": 2, "min_nodes": 2,
                                                       "state_dir": str(tmp_path / "coord"),
                                                       "join_timeout_s": 0.0}})  # 0: would wait forever for nodes
    again = Coordinator(cfg, transport=MemoryTransport(MemoryBus(), "coordinator"))
    with structlog.testing.capture_logs() as lines:
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("summary", again.run()), daemon=True)
        t.start()
        t.join(30)
    assert out["summary"].rounds_done == 2 and not out["summary"].exports
    assert "run_already_finished" in [e["event"] for e in lines]
    assert (tmp_path / "coord" / "metrics.jsonl").read_text() == before


def test_a_node_that_gets_no_round_says_so_and_where_to_look(tmp_path, monkeypatch):
    """A node the coordinator refused (other labels or base model) or one with no coordinator logged node_joined and
    then nothing, on its own host; it now logs waiting_for_rounds after IDLE_NOTICE_S, then at doubling intervals."""
    from edge_node import agent as agent_module

    monkeypatch.setattr(agent_module, "IDLE_NOTICE_S", 0.3)
    bus = MemoryBus()
    a = NodeAgent(NodeConfig.from_dict({"node": {"id": "agx-1", "state_dir": str(tmp_path / "agx-1")}}),
                  trainer=FakeTrainer("agx-1"))
    a.transport = MemoryTransport(bus, "agx-1", on_connect=a._on_connect, will=(a.topics.node("agx-1", "status"), b""))
    with structlog.testing.capture_logs() as lines:
        t = threading.Thread(target=a.run, daemon=True)
        t.start()
        time.sleep(2.5)
        a.stop()
        t.join(10)
    idle = [e for e in lines if e["event"] == "waiting_for_rounds"]
    assert 2 <= len(idle) <= 3, idle  # at 0.3 s, 0.6 s later, 1.2 s later: not at every 0.5 s poll
    assert "node_refused_labels" in idle[0]["hint"] and "waiting_for_nodes" in idle[0]["hint"]
