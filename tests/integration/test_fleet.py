"""End to end over a real mosquitto: one coordinator process and three node processes on a tiny model."""

from __future__ import annotations

import pytest

from coordinator.state import CheckpointStore
from edge_node.model import base_model_digest
from tests.broker import running_broker
from tests.integration.fleet import make_fleet, tiny_model

pytestmark = [pytest.mark.mosquitto, pytest.mark.integration, pytest.mark.slow]

NODES = ["agx-1", "nx-2", "tx2-3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def test_three_nodes_three_rounds_fedspine(tmp_path, model):
    users = {"coordinator": "c-pw", "monitor": "m-pw", **{n: f"{n}-pw" for n in NODES}}
    with running_broker(tls=False, users=users) as broker:
        fleet = make_fleet(tmp_path, broker, model, NODES, rounds=3, local_steps=3, target_sparsity=0.3)
        try:
            for n in NODES:
                fleet.start(n)
            fleet.start("coordinator")
            rc = fleet.wait_coordinator(timeout_s=240)
        finally:
            fleet.stop()
        assert rc == 0, fleet.logs("coordinator")[-3000:]

    rounds = fleet.rows("round")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["accepted"] == 3 for r in rounds)
    nodes = [r for r in fleet.rows("node") if not r.get("eval_only")]
    assert len(nodes) == 9 and all(r["status"] == "ok" for r in nodes)
    # The bandit chose per node: some round gave different (sparsity, rank) to different nodes.
    per_round = {}
    for r in nodes:
        per_round.setdefault(r["round"], set()).add((round(r["target_sparsity"], 4), r["rank"]))
    assert any(len(configs) > 1 for configs in per_round.values()), per_round
    # Every node ends at or above the fleet target, pruning is monotone, and the losses are finite.
    for n in NODES:
        seq = [r["sparsity"] for r in sorted(nodes, key=lambda r: r["round"]) if r["node"] == n]
        assert seq == sorted(seq) and seq[-1] >= 0.3 - 1e-9, (n, seq)
    # Aggregation ran and was checkpointed after every round, with the base model every node announced.
    assert CheckpointStore(fleet.state_dir).load()["base_model"] == base_model_digest(str(model))
    # The final sync and the exports: each node exported its pruned, merged model and reported it.
    exports = fleet.rows("export")
    assert sorted(e["node_id"] for e in exports) == sorted(NODES)
    assert all(e["status"] == "ok" and e["size_bytes"] > 0 and e["latency_ms"] > 0 for e in exports)
    assert all(e["sparsity"] >= 0.3 - 1e-9 for e in exports)
    for n in NODES:
        assert (tmp_path / "nodes" / n / "state" / "export" / "config.json").exists()
