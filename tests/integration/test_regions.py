"""Hierarchical rounds through a real broker: a root coordinator, two regional aggregators and protocol-level
nodes under each; the root's global state equals flat aggregation of exactly the nodes' updates, and the run ends
through the regions (final sync, then every node's export).  Then the whole stack: node processes on a tiny model
under a region, behind the production ACL, pruned by the default method and exporting their models."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from benchmarks.brokers import mosquitto
from benchmarks.coordinator.swarm import run as swarm
from benchmarks.coordinator.swarm import synthetic_update, update_seed
from coordinator.aggregation import GlobalLora
from coordinator.config import CoordinatorConfig, RegionConfig
from coordinator.region import Region
from coordinator.server import Coordinator
from coordinator.state import CheckpointStore
from shared.updates import LORA_ALPHA, LoraUpdate

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.mosquitto]

ROOT, RANK, ROUNDS = "fedspine/hier", 4, 2
REGIONS = {"east": ["lite-00000", "lite-00001"], "west": ["lite-00002", "lite-00003", "lite-00004"]}


def _flat_reference() -> GlobalLora:
    """One coordinator aggregating every node's update of each round (each node answers with 32 samples, τ = 1)."""
    g = GlobalLora()
    nodes = sorted(n for members in REGIONS.values() for n in members)
    for rnd in range(1, ROUNDS + 1):
        pairs = [(LoraUpdate.from_bytes(synthetic_update(RANK, update_seed(n, rnd))), 32.0) for n in nodes]
        starts = [g.start_for(None, RANK, RANK, LORA_ALPHA) for _ in nodes]
        g.aggregate(pairs, starts=starts, steps=[1] * len(nodes))
    return g


def test_root_with_two_regions_equals_flat_aggregation(tmp_path):
    with mosquitto(tmp_path / "broker") as (host, port):
        broker = {"url": f"mqtt://{host}:{port}", "topic_root": ROOT}
        stop = threading.Event()
        threads = []
        regions = []
        first = 0
        for rid, members in REGIONS.items():
            region = Region(RegionConfig.from_dict({"broker": broker, "region": {"region_id": rid, "deadline_s": 30}}))
            regions.append(region)
            threads.append(threading.Thread(target=region.run, daemon=True))
            threads.append(threading.Thread(target=swarm, args=(host, port, f"{ROOT}/region/{rid}", first,
                                                                len(members), 120.0, stop), daemon=True))
            first += len(members)
        for t in threads:
            t.start()
        cfg = CoordinatorConfig.from_dict({
            "broker": broker,
            "coordinator": {"method": "fedlora", "rounds": ROUNDS, "local_steps": 1, "min_nodes": 5,
                            "deadline_s": 30.0, "join_timeout_s": 30.0, "state_dir": str(tmp_path / "root")},
            "lora": {"rank": RANK},
        })
        try:
            summary = Coordinator(cfg).run()
        finally:
            stop.set()
            for r in regions:
                r.stop()
            for t in threads:
                t.join(timeout=10)
    assert summary.rounds_done == ROUNDS, summary.stopped_early
    rows = [json.loads(line) for line in (tmp_path / "root" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["regions"], r["accepted"]) for r in rows if r.get("kind") == "round"] == [(2, 5)] * ROUNDS
    state = CheckpointStore(tmp_path / "root").load()["strategy"]["tensors"]
    flat = _flat_reference()
    assert set(flat.delta) == {k[len("delta."):] for k in state if k.startswith("delta.")}
    for name, want in flat.delta.items():
        got = state[f"delta.{name}"]
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5, name
    assert torch.allclose(state["dense.classifier.weight"], flat.dense["classifier.weight"], rtol=1e-5, atol=1e-6)
    # The run ended as a flat one does: the final sync reached every node through its region (a lite node answers
    # the export "ok" only if it took part in the run's final sync), and each region reported its nodes' exports.
    ends = {(r["region"], "final" if r.get("final") else "export"): r for r in rows if r.get("kind") == "region"}
    assert {rid: ends[rid, "final"]["accepted"] for rid in REGIONS} == {r: len(m) for r, m in REGIONS.items()}
    assert {rid: (e.nodes, e.ok) for rid, e in summary.region_exports.items()} == \
        {rid: (len(m), len(m)) for rid, m in REGIONS.items()}
    assert {rid: ends[rid, "export"]["ok"] for rid in REGIONS} == {r: len(m) for r, m in REGIONS.items()}
    assert (tmp_path / "root" / "finished").read_text() == summary.run_id


EAST = ["agx-1", "nx-2"]  # the nodes of _run_under_region's one region


def _run_under_region(tmp_path, method: str):
    """A root, one region "east" and two node processes on a tiny model behind the production ACL (a region user),
    3 rounds of ``method`` to s* 0.3: (the run's summary, the fleet, the region)."""
    import types

    from broker_config.local import LocalMosquitto
    from shared.config import load_toml
    from tests.integration.fleet import make_fleet, tiny_model

    users = {"coordinator": "c-pw", "east": "e-pw", **{n: f"{n}-pw" for n in EAST}}
    model = tiny_model(tmp_path / "tiny-bert")
    with LocalMosquitto(users=users, region_users=("east",)) as broker:
        sub = types.SimpleNamespace(url=broker.url, users=broker.users, root=f"{broker.root}/region/east")
        fleet = make_fleet(tmp_path, sub, model, EAST, rounds=3, method=method, local_steps=2,
                           target_sparsity=0.3, deadline_s=60.0)
        cfg = load_toml(fleet.coordinator_cfg)
        cfg["broker"]["topic_root"] = broker.root
        region = Region(RegionConfig.from_dict({"broker": {**cfg["broker"], "username": "east", "password": "e-pw"},
                                                "region": {"region_id": "east", "deadline_s": 50}}))
        t = threading.Thread(target=region.run, daemon=True)
        t.start()
        try:
            for n in EAST:
                fleet.start(n)
            summary = Coordinator(CoordinatorConfig.from_dict(cfg)).run()
        finally:
            region.stop()
            fleet.stop()
            t.join(timeout=10)
    return summary, fleet, region


def test_real_nodes_under_a_region_prune_train_and_export_through_the_acl(tmp_path):
    """The whole stack under a region: node processes on a tiny model, the production ACL with a region user, the
    default method (uniform) pruning to s* through the region, and every node's export written."""
    summary, fleet, _ = _run_under_region(tmp_path, "uniform")
    assert summary.rounds_done == 3, summary.stopped_early
    rounds = fleet.rows("round")
    assert [(r["accepted"], round(r["target_sparsity"], 2)) for r in rounds] == [(2, 0.0), (2, 0.3), (2, 0.3)]
    assert {rid: (e.nodes, e.ok) for rid, e in summary.region_exports.items()} == {"east": (2, 2)}
    for n in EAST:
        export = tmp_path / "nodes" / n / "state" / "export"
        assert (export / "config.json").exists(), fleet.logs(n)[-3000:]
        assert json.loads((export / "fedspine_export.json").read_text())["run_id"] == summary.run_id
        # what the node was told through the region: no cut before the fleet's importance, then s*; the final sync
        # keeps the sparsity the node reached (at or above s*)
        events = [json.loads(x) for x in fleet.logs(n).splitlines() if x.startswith("{")]
        targets = [(e.get("final", False), e["target_sparsity"]) for e in events if e["event"] == "round_config"]
        assert [f for f, _ in targets] == [False, False, False, True] and targets[0][1] == 0.0, targets
        assert all(t >= 0.3 - 1e-9 for _, t in targets[1:]), targets


def test_fedspines_bandit_runs_in_a_region_over_real_nodes_through_the_acl(tmp_path):
    """FedSpine under a region, the whole stack: node processes on a tiny model behind the production ACL; the region
    runs the nodes' bandits (the root asks it twice a round: the fleet's timing, then its choice), every node reaches
    s* by the last round and exports."""
    summary, fleet, region = _run_under_region(tmp_path, "fedspine")
    assert summary.rounds_done == 3, summary.stopped_early
    assert [r["accepted"] for r in fleet.rows("round")] == [2, 2, 2]
    assert {rid: (e.nodes, e.ok) for rid, e in summary.region_exports.items()} == {"east": (2, 2)}
    assert region.policy is not None and sorted(region.policy.bandit.bandits) == EAST
    # Each node's bandit learned from every round (both halves of an arm credited per round).
    assert all(sum(b["dp"].plays) == sum(b["rank"].plays) == 3 for b in region.policy.bandit.bandits.values())
    for n in EAST:
        events = [json.loads(x) for x in fleet.logs(n).splitlines() if x.startswith("{")]
        configs = [e for e in events if e["event"] == "round_config"]
        assert [e.get("final", False) for e in configs] == [False, False, False, True], configs
        assert configs[0]["target_sparsity"] == 0.0 and configs[-1]["target_sparsity"] >= 0.3 - 1e-9, configs
        assert (tmp_path / "nodes" / n / "state" / "export" / "config.json").exists(), fleet.logs(n)[-3000:]
