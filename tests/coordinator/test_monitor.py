"""The live fleet view, fed raw (topic, payload) pairs as they come off the broker."""

import json
import subprocess
import time

import pytest
from structlog.testing import capture_logs

from coordinator.monitor import FleetView, run_monitor
from edge_node.telemetry import PsutilProvider, TelemetryPublisher
from shared.config import BrokerConfig
from shared.messages import CoordinatorStatus, NodeStatus, RoundReport, RoundTelemetry, Telemetry, encode
from shared.topics import Topics

T = Topics("fedspine/v1")


def test_view_follows_presence_telemetry_and_reports():
    v = FleetView(T)
    assert v.apply(T.node("agx-1", "status"), encode(NodeStatus(node_id="agx-1", state="online", ts=1.0,
                                                                device_type="agx")))
    assert v.apply(T.node("agx-1", "telemetry"), encode(Telemetry(
        node_id="agx-1", ts=2.0, source="jtop", power_w=9.5, power_estimated=False, rails_w={}, cpu_percent=55.0,
        gpu_percent=80.0, ram_used_mb=1.0, ram_total_mb=2.0, temperatures_c={}, round=2, phase="training")))
    assert v.apply(T.node("agx-1", "report"), encode(RoundReport(
        run_id="r", round=2, node_id="agx-1", status="ok", loss_end=0.42, sparsity=0.3, rank=4,
        metrics={"test_accuracy": 0.71})))
    assert v.apply(T.node("agx-1", "telemetry/round"), encode(RoundTelemetry(
        node_id="agx-1", round=2, source="jtop", duration_s=10.0, energy_j=95.0, avg_power_w=9.5,
        power_estimated=False, avg_cpu_percent=50.0, avg_gpu_percent=70.0, samples=20)))
    assert v.apply(T.coordinator_status, encode(CoordinatorStatus(state="online", ts=3.0, round=2, method="fedspine")))
    row = v.nodes["agx-1"]
    assert (row.state, row.device_type, row.round, row.phase) == ("online", "agx", 2, "training")
    assert (row.power_w, row.power_source, row.loss, row.sparsity, row.rank) == (9.5, "jtop", 0.42, 0.3, 4)
    assert row.accuracy == 0.71 and row.energy_j == 95.0
    v.apply(T.node("agx-1", "status"), encode(NodeStatus(node_id="agx-1", state="offline", ts=4.0)))
    assert v.nodes["agx-1"].state == "offline"
    assert v.table().row_count == 1


def test_a_new_run_clears_the_previous_runs_progress():
    """A monitor left running between two jobs: the new run's round 1 is not hidden behind the old run's round 4."""
    v = FleetView(T)
    v.apply(T.coordinator_status, encode(CoordinatorStatus(state="online", ts=1.0, run_id="run-a", round=3)))
    v.apply(T.node("agx-1", "status"), encode(NodeStatus(node_id="agx-1", state="online", ts=1.0, device_type="agx",
                                                         sparsity=0.3, round=4)))
    v.apply(T.node("agx-1", "report"), encode(RoundReport(run_id="run-a", round=4, node_id="agx-1", status="ok",
                                                          loss_end=0.4, sparsity=0.3, rank=16,
                                                          metrics={"test_accuracy": 0.7})))
    v.apply(T.coordinator_status, encode(CoordinatorStatus(state="finished", ts=2.0, run_id="run-a", round=3)))
    assert v.nodes["agx-1"].round == 4 and v.nodes["agx-1"].accuracy == 0.7  # the same run: nothing cleared
    v.apply(T.coordinator_status, encode(CoordinatorStatus(state="online", ts=3.0, run_id="run-b", round=0)))
    v.apply(T.node("agx-1", "report"), encode(RoundReport(run_id="run-b", round=1, node_id="agx-1", status="ok",
                                                          loss_end=1.1, sparsity=0.0, rank=4, metrics={})))
    row = v.nodes["agx-1"]
    assert (row.round, row.sparsity, row.rank, row.loss, row.accuracy) == (1, 0.0, 4, 1.1, None)
    assert (row.state, row.device_type) == ("online", "agx")


def test_a_causal_lm_node_shows_its_perplexity():
    v = FleetView(T)
    v.apply(T.node("lm-1", "report"), encode(RoundReport(run_id="r", round=1, node_id="lm-1", status="ok",
                                                         loss_end=3.5, sparsity=0.1, rank=8,
                                                         metrics={"test_loss": 3.5, "test_perplexity": 33.12})))
    v.apply(T.node("cls-1", "report"), encode(RoundReport(run_id="r", round=1, node_id="cls-1", status="ok",
                                                          loss_end=0.9, sparsity=0.1, rank=8,
                                                          metrics={"test_accuracy": 0.61})))
    from rich.console import Console

    console = Console(width=240, record=True)
    console.print(v.table())
    text = console.export_text()
    lm, cls = (next(line for line in text.splitlines() if name in line) for name in ("lm-1", "cls-1"))
    assert "ppl 33.12" in lm and "0.610" in cls and "ppl" not in cls


def test_malformed_and_spoofed_messages_are_dropped_with_one_line_each():
    v = FleetView(T)
    spoof = encode(NodeStatus(node_id="nx-2", state="online", ts=1.0))
    with capture_logs() as logs:
        assert not v.apply(T.node("agx-1", "status"), spoof)  # names another node than its topic
        assert not v.apply(T.node("agx-1", "telemetry"), b"{not json")
        assert not v.apply("other/tree/x", b"{}")
    assert v.nodes == {} and v.rejected == 3
    assert [e["event"] for e in logs] == ["message_rejected"] * 3


def test_nodes_under_a_region_are_shown_with_their_region():
    v = FleetView(T)
    R = T.region_root("eu-1")  # noqa: N806
    assert v.apply(T.node("agx-1", "status"), encode(NodeStatus(node_id="agx-1", state="online", ts=1.0)))
    assert v.apply(R.node("nx-2", "status"), encode(NodeStatus(node_id="nx-2", state="online", ts=1.0,
                                                               device_type="nx")))
    assert v.apply(R.node("nx-2", "report"), encode(RoundReport(
        run_id="r", round=3, node_id="nx-2", status="ok", loss_end=0.5, sparsity=0.3, rank=8,
        metrics={"test_accuracy": 0.6})))
    assert (v.nodes["nx-2"].region, v.nodes["nx-2"].round, v.nodes["nx-2"].accuracy) == ("eu-1", 3, 0.6)
    assert v.nodes["agx-1"].region == ""
    # the region's presence toward its own nodes is not the fleet's coordinator
    assert not v.apply(R.coordinator_status, encode(CoordinatorStatus(state="online", ts=2.0, round=3)))
    assert v.coordinator is None
    with capture_logs() as logs:  # spoofing and bad region ids are dropped as at the root
        assert not v.apply(R.node("nx-2", "status"), encode(NodeStatus(node_id="agx-1", state="offline", ts=3.0)))
        assert not v.apply("fedspine/v1/region/+bad/node/nx-2/status", b"{}")
    assert v.rejected == 2 and [e["event"] for e in logs] == ["message_rejected"] * 2
    table = v.table()
    assert [c.header for c in table.columns][:2] == ["node", "region"] and table.row_count == 2
    assert [c.header for c in FleetView(T).table().columns][1] == "presence"  # no region column in a flat fleet


@pytest.mark.mosquitto
@pytest.mark.slow
def test_fleet_followed_through_mosquitto_with_sub_and_monitor(mqtt_transport, tmp_path, capsys):
    """A non-Jetson node publishes fallback telemetry; mosquitto_sub -v (monitor user) prints readable JSON lines
    and ``fedspine monitor --once`` shows the node, connecting like any other client."""
    b = mqtt_transport.broker
    node = mqtt_transport("node-a")
    topics = node.topics
    node.publish(topics.node("node-a", "status"), encode(NodeStatus(node_id="node-a", state="online", ts=time.time(),
                                                                    device_type="x86", telemetry_source="psutil")),
                 retain=True)
    pub = TelemetryPublisher(PsutilProvider(), node.publish, topics, "node-a", interval_s=0.3, sample_s=0.1)
    pub.start()
    try:
        pub.set_phase("training", 1)
        out = subprocess.run(["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-u", "monitor", "-P",
                              b.users["monitor"], "-v", "-t", topics.telemetry_filter, "-C", "2", "-W", "10"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        lines = out.strip().splitlines()
        assert len(lines) == 2
        for line in lines:
            topic, _, body = line.partition(" ")
            doc = json.loads(body)
            assert topic == f"{b.root}/node/node-a/telemetry"
            assert doc["source"] == "psutil" and doc["node_id"] == "node-a" and doc["phase"] == "training"
            assert 0.0 <= doc["cpu_percent"] <= 100.0 and doc["ram_total_mb"] > 0
        pw = tmp_path / "monitor.pw"
        pw.write_text(b.users["monitor"])
        capsys.readouterr()
        # no console given: the one `fedspine monitor --once` makes, writing to a captured (non-terminal) stdout
        view = run_monitor(BrokerConfig(url=b.url(), username="monitor", password_file=str(pw), topic_root=b.root),
                           once=True, duration_s=1.5, client_id="test-monitor")
        printed = capsys.readouterr().out
    finally:
        pub.stop()
        node.publish(topics.node("node-a", "status"), b"", retain=True)  # leave no retained state behind
    row = view.nodes["node-a"]
    assert (row.state, row.device_type, row.power_source, row.phase) == ("online", "x86", "psutil", "training")
    assert row.cpu_percent is not None and view.rejected == 0
    # every column whole on the node's line, not cut to rich's default 80 columns ("no…", "ps…")
    line = next(x for x in printed.splitlines() if "node-a" in x)
    assert "online" in line and "x86" in line and "psutil" in line and "training" in line and "…" not in printed


def test_an_offline_node_keeps_its_place_and_the_final_sync_shows_as_the_last_round():
    """The offline status a node publishes on leaving carries its sparsity, round and accuracy (a monitor started
    later shows them); its will (round -1) clears nothing; the final sync, sent as round N + 1, is shown as N."""
    v = FleetView(T)
    v.apply(T.node("n1", "report"), encode(RoundReport(run_id="r", round=4, node_id="n1", status="ok", sparsity=0.3,
                                                       rank=4, final=True, metrics={"test_accuracy": 0.8})))
    assert (v.nodes["n1"].round, v.nodes["n1"].accuracy) == (3, 0.8)
    v.apply(T.node("n1", "status"), encode(NodeStatus(node_id="n1", state="offline", ts=2.0, sparsity=0.35, round=3,
                                                      test_accuracy=0.8)))
    v.apply(T.node("n1", "status"), encode(NodeStatus(node_id="n1", state="offline", ts=3.0)))  # the will
    row = v.nodes["n1"]
    assert (row.state, row.sparsity, row.round, row.accuracy) == ("offline", 0.35, 3, 0.8)
    fresh = FleetView(T)  # started after the node left: the retained status alone
    fresh.apply(T.node("n1", "status"), encode(NodeStatus(node_id="n1", state="offline", ts=2.0, sparsity=0.35,
                                                          round=3, test_accuracy=0.8)))
    assert (fresh.nodes["n1"].sparsity, fresh.nodes["n1"].accuracy) == (0.35, 0.8)


def test_the_coordinator_logs_a_presence_it_cannot_attribute(tmp_path):
    from coordinator.config import CoordinatorConfig
    from coordinator.server import Coordinator
    from shared.transport import MemoryBus, MemoryTransport

    cfg = CoordinatorConfig.from_dict({"broker": {}, "coordinator": {"state_dir": str(tmp_path)}})
    c = Coordinator(cfg, transport=MemoryTransport(MemoryBus(), "coordinator"))
    with capture_logs() as logs:
        c._handle_status(T.node("jetson-01", "status"), encode(NodeStatus(node_id="jetson-1", state="online", ts=1.0)))
    assert [e["event"] for e in logs] == ["presence_unattributed"] and "jetson-1" in logs[0]["error"]
    assert c.events.empty()
