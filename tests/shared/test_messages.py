"""Every wire message: round trip through the codec, and the table of payloads the codec must reject."""

from __future__ import annotations

import hashlib
import json
import math

import msgpack
import pytest

from shared.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Chunk,
    Command,
    CoordinatorStatus,
    ExportReport,
    Message,
    NodeRefused,
    NodeStatus,
    ProtocolError,
    RegionExport,
    RegionPlan,
    RegionPlanQuery,
    RegionReport,
    RegionRound,
    RegionStatus,
    ResendRequest,
    RoundConfig,
    RoundReport,
    RoundTelemetry,
    Telemetry,
    decode,
    encode,
)

DATA = bytes(range(256)) * 4
SAMPLES: list[Message] = [
    NodeStatus(node_id="node-a", state="online", ts=1.7e9, device_type="orin-nano", model_id="minilm",
               memory_mb=7620, software_version="0.1.0", sparsity=0.25, round=3, telemetry_source="jtop",
               base_model="0f" * 32),
    CoordinatorStatus(state="finished", ts=1.7e9, run_id="abc123", round=10, method="fedspine"),
    Telemetry(node_id="node-a", ts=1.7e9, source="jtop", power_w=7.25, power_estimated=False,
              rails_w={"VDD_IN": 7.25, "VDD_CPU_GPU_CV": 2.5}, cpu_percent=41.5, gpu_percent=88.0,
              ram_used_mb=3100.0, ram_total_mb=7620.0, temperatures_c={"cpu": 51.2, "gpu": 49.0},
              nvpmodel="15W", round=2, phase="train"),
    Telemetry(node_id="node-b", ts=1.7e9, source="psutil", power_w=None, power_estimated=True, rails_w={},
              cpu_percent=12.0, gpu_percent=None, ram_used_mb=1.0, ram_total_mb=2.0, temperatures_c={}),
    RoundTelemetry(node_id="node-a", round=2, source="jtop", duration_s=31.5, energy_j=220.5, avg_power_w=7.0,
                   power_estimated=False, avg_cpu_percent=40.0, avg_gpu_percent=None, samples=63),
    RoundConfig(run_id="abc123", round=4, target_sparsity=0.3, rank=8, local_steps=20, deadline_ts=1.7e9 + 60,
                upload_transfer_id="abc123.r4.a0.node-a.up", download_transfer_id=None),
    RoundConfig(run_id="abc123", round=5, target_sparsity=0.0, rank=16, local_steps=1, deadline_ts=1.7e9,
                upload_transfer_id="u", download_transfer_id="abc123.r5.a1.node-a.down", importance=False),
    RoundReport(run_id="abc123", round=4, node_id="node-a", status="ok", transfer_id="abc123.r4.a0.node-a.up",
                upload_bytes=123456, loss_start=0.69, loss_end=0.41, samples=640, compute_s=12.5, upload_s=0.8,
                virtual_s=14.0, sparsity=0.3, rank=8, energy_j=95.0, avg_power_w=7.1, power_source="jtop",
                metrics={"val_accuracy": 0.81, "test_accuracy": 0.8}, peak_memory_mb=812.5),
    RoundReport(run_id="abc123", round=4, node_id="node-b", status="oom", error="CUDA out of memory"),
    ExportReport(run_id="abc123", node_id="node-a", status="ok", path="/var/lib/fedspine/export", size_bytes=9_000_000,
                 params=15_000_000, sparsity=0.5, latency_ms=3.2, metrics={"test_accuracy": 0.79}),
    Command(command="export", run_id="abc123", round=10),
    Command(command="stop", run_id="abc123"),
    Chunk(transfer_id="abc123.r4.a0.node-a.up", sender="node-a", index=2, count=3, total_size=3 * len(DATA),
          digest=hashlib.sha256(DATA * 3).hexdigest(), data=DATA),
    ResendRequest(transfer_id="abc123.r4.a0.node-a.up", requester="coordinator", missing=[0, 5, 17]),
    ResendRequest(transfer_id="t", requester="node-a", missing=[]),
    RoundConfig(run_id="abc123", round=6, target_sparsity=0.3, rank=8, local_steps=55, deadline_ts=1.7e9,
                upload_transfer_id="u", download_transfer_id=None, finish_s=61.5, min_steps=20, max_steps=100),
    RegionStatus(region_id="east", state="online", ts=1.7e9, nodes=2000),
    RegionRound(run_id="abc123", round=3, target_sparsity=0.2, rank=8, sent_rank=16, local_steps=20, deadline_ts=1.7e9,
                upload_transfer_id="abc123.r3.a0.east.part", download_transfer_id="abc123.r3.a0.east.state",
                importance=False, labels=["negative", "neutral", "positive"], base_model="0f" * 32),  # the identity
    RegionReport(run_id="abc123", round=3, region_id="east", status="ok", transfer_id="abc123.r3.a0.east.part",
                 upload_bytes=123456, accepted=1990, failed=10, cpu_s=4.5, labels=["negative", "positive"],
                 base_model="0f" * 32),
    RegionExport(run_id="abc123", region_id="east", nodes=2000, ok=1990, skipped=4, failed=1, missing=5),
    RegionPlanQuery(run_id="abc123", round=1, attempt=2, target_sparsity=0.0, rank=8, local_steps=20,
                    tier_ranks={"agx": 16, "nx": 8, "tx2": 4}),  # the root lacks the region's finish for this plan
    RegionPlan(run_id="abc123", round=1, attempt=2, region_id="east", finish_s=61.5),
    RegionPlan(run_id="abc123", round=1, region_id="east"),  # it cannot say
    RegionRound(run_id="abc123", round=2, target_sparsity=0.0, rank=8, sent_rank=16, local_steps=20, deadline_ts=1.7e9,
                upload_transfer_id="u", download_transfer_id="d", importance=False, next_target_sparsity=0.0,
                next_rank=8, tier_ranks={"agx": 16, "nx": 8, "tx2": 4}, zero_pad_rank=16),  # HetLoRA
    NodeRefused(node_id="node-b", reason="labels ['positive', 'negative'] here, ['negative', 'positive'] in the fleet",
                hint="every node needs the same class list in the same order"),
    # FedSpine under regions: the two stages of its plan query, the answers, the round's statistics, the round
    RegionPlanQuery(run_id="abc123", round=5, target_sparsity=0.3, rank=16, local_steps=20, stage="timing",
                    caps={"agx": 0.4, "default": 0.5}, ranks=[2, 4, 8, 16], reward={"loss": 1.0, "time": 1.0},
                    total_rounds=20, seed=7),
    RegionPlanQuery(run_id="abc123", round=5, attempt=1, target_sparsity=0.3, rank=16, local_steps=20, stage="choose",
                    caps={"default": 0.5}, ranks=[2, 16], total_rounds=20, cut=True,
                    slowest_at_tau={"tx2-3": 61.5, "nx-2": 30.0}, learn_round=4, learn_regions=["east", "west"],
                    best_loss=0.4, best_importance=12.5, lowest_energy=0.8, slowest={"tx2-3": 60.0}),
    RegionPlan(run_id="abc123", round=5, region_id="east", slowest_at_tau={"nx-2": 30.0, "agx-1": 12.0}),
    RegionReport(run_id="abc123", round=4, region_id="east", status="ok", accepted=2, best_loss=0.4,
                 best_importance=12.5, slowest={"nx-2": 29.0, "agx-1": 11.0}),  # lowest_energy None: not all had it
    RegionRound(run_id="abc123", round=5, target_sparsity=0.0, rank=16, sent_rank=16, local_steps=20,
                deadline_ts=1.7e9, upload_transfer_id="u", download_transfer_id="d", finish_s=61.5, per_node=True),
    RegionRound(run_id="abc123", round=4, target_sparsity=0.2, rank=8, sent_rank=8, local_steps=20, deadline_ts=1.7e9,
                upload_transfer_id="u", download_transfer_id=None, finish_s=61.5, next_target_sparsity=0.3,
                next_rank=8),  # paced, and asking for the next round's slowest completion
    RegionReport(run_id="abc123", round=4, region_id="east", status="error", error="no quorum", next_finish_s=0.0),
]


@pytest.mark.parametrize("build", [
    lambda: RegionStatus(region_id="east/1", state="online", ts=1.7e9),  # not one topic level
    lambda: RegionStatus(region_id="east", state="gone", ts=1.7e9),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=4, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None),  # sent below the training rank
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", accepted=-1),
    lambda: RegionExport(run_id="r", region_id="east", nodes=3, ok=1, skipped=1),  # one node unaccounted for
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=0, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, finish_s=10.0),  # a paced final sync
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, next_rank=8),  # rank without sparsity
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, next_target_sparsity=0.1, next_rank=0),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, finish_s=-1.0),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", next_finish_s=math.inf),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, tier_ranks={"agx": 0}),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, tier_ranks={"agx": 4.5}),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, tier_ranks={"": 4}),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, tier_ranks={"agx": 16}, zero_pad_rank=8),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, base_model="ABC"),
    lambda: RegionRound(run_id="r", round=1, target_sparsity=0.0, rank=8, sent_rank=8, local_steps=1, deadline_ts=1.0,
                        upload_transfer_id="u", download_transfer_id=None, labels=["a", 1]),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", base_model="0f" * 31),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", labels=["x"] * 1025),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.0, rank=8, local_steps=0),  # the final sync
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=1.0, rank=8, local_steps=2),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.0, rank=0, local_steps=2),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.0, rank=8, local_steps=2, tier_ranks={"agx": 0}),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.0, rank=8, local_steps=2, attempt=-1),
    lambda: RegionPlan(run_id="r", round=1, region_id="east/1", finish_s=1.0),
    lambda: RegionPlan(run_id="r", round=1, region_id="east", finish_s=-1.0),
    lambda: RegionPlan(run_id="r", round=1, region_id="east", finish_s=math.nan),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose"),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="vote",
                            ranks=[8], total_rounds=3),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, slowest_at_tau={"a": 1.0, "b": 2.0, "c": 3.0}),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, slowest={"a/b": 1.0}),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, learn_regions=["east/1"]),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[0], total_rounds=3),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, caps={"agx": 1.0}),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, best_importance=math.inf),
    lambda: RegionPlanQuery(run_id="r", round=1, target_sparsity=0.3, rank=8, local_steps=2, stage="choose",
                            ranks=[8], total_rounds=3, reward={"loss": -1.0}),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", best_loss=-0.1),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", lowest_energy=math.nan),
    lambda: RegionReport(run_id="r", round=1, region_id="east", status="ok", slowest={"a": -1.0}),
    lambda: RegionPlan(run_id="r", round=1, region_id="east", slowest_at_tau={"a": 1.0, "b": 1.0, "c": 1.0}),
], ids=["region_id", "state", "sent_rank", "accepted", "export_counts", "paced_final_sync", "next_rank_alone",
        "next_rank_zero", "negative_finish", "infinite_next_finish", "tier_rank_zero", "tier_rank_fraction",
        "tier_empty", "zero_pad_below_a_tier", "round_base_model", "round_labels", "report_base_model",
        "report_labels", "query_final_sync", "query_sparsity", "query_rank", "query_tier_rank", "query_attempt",
        "plan_region_id", "plan_negative_finish", "plan_nan_finish", "query_per_node_without_settings",
        "query_stage", "query_three_slowest", "query_slowest_node_id", "query_learn_region_id", "query_rank_arm",
        "query_cap", "query_infinite_importance", "query_negative_weight", "report_negative_best_loss",
        "report_nan_energy", "report_negative_slowest", "plan_three_slowest"])
def test_invalid_region_messages_are_refused(build) -> None:
    with pytest.raises(ProtocolError):
        build()


def test_region_messages_of_an_older_peer_decode_unpaced() -> None:
    """A RegionRound from a root without pacing, or a RegionReport from such a region, lacks the pacing fields: they
    decode with their defaults (no finish: every node runs τ steps; no next round asked about, none reported)."""
    rr, rep = SAMPLES[-2], SAMPLES[-1]
    assert isinstance(rr, RegionRound) and isinstance(rep, RegionReport)
    old_rr = decode(msgpack.packb(_wire(rr, finish_s=_DROP, next_target_sparsity=_DROP, next_rank=_DROP)), RegionRound)
    assert (old_rr.finish_s, old_rr.next_target_sparsity, old_rr.next_rank) == (None, None, None)
    assert decode(msgpack.packb(_wire(rep, next_finish_s=_DROP)), RegionReport).next_finish_s is None


def test_the_identity_fields_of_region_messages_are_optional() -> None:
    """A RegionRound or RegionReport without labels and base_model (a root or region before they were added, or one
    that knows none yet) decodes with none known."""
    for msg in (m for m in SAMPLES if isinstance(m, (RegionRound, RegionReport)) and m.labels):
        old = decode(msgpack.packb(_wire(msg, labels=_DROP, base_model=_DROP)), type(msg))
        assert (old.labels, old.base_model) == ([], None)


def test_the_per_node_fields_of_region_messages_are_optional() -> None:
    """Messages of a root or region before FedSpine ran under regions lack its fields: a query decodes as a finish
    query, a round as a fleet-wide one, a report with no statistics."""
    per_node = [m for m in SAMPLES if getattr(m, "stage", "finish") != "finish" or getattr(m, "per_node", False)
                or getattr(m, "slowest", None) or getattr(m, "slowest_at_tau", None)]
    assert {type(m).__name__ for m in per_node} == {"RegionPlanQuery", "RegionPlan", "RegionReport", "RegionRound"}
    for msg in per_node:
        fields = {"RegionPlanQuery": ("stage", "caps", "ranks", "reward", "total_rounds", "seed", "cut", "slowest_at_tau",
                                      "learn_round", "learn_regions", "best_loss", "best_importance", "lowest_energy",
                                      "slowest"),
                  "RegionPlan": ("slowest_at_tau",), "RegionRound": ("per_node",),
                  "RegionReport": ("best_loss", "best_importance", "lowest_energy", "slowest")}[type(msg).__name__]
        old = decode(msgpack.packb(_wire(msg, **dict.fromkeys(fields, _DROP))), type(msg))
        assert old == type(msg)(**{k: v for k, v in vars(msg).items() if k not in fields}), type(msg).__name__
        assert getattr(old, "stage", "finish") == "finish" and not getattr(old, "per_node", False)


def test_hetlora_fields_of_a_region_round_are_optional() -> None:
    """A RegionRound without tier_ranks and zero_pad_rank decodes with one rank for every node and the mask-aware
    average."""
    het = next(m for m in SAMPLES if isinstance(m, RegionRound) and m.tier_ranks)
    assert [het.rank_for(t) for t in ("agx", "nx", "tx2", "orin")] == [16, 8, 4, 8]
    assert het.rank_for("orin", het.next_rank) == 8 and het.rank_for("agx", 2) == 16
    old = decode(msgpack.packb(_wire(het, tier_ranks=_DROP, zero_pad_rank=_DROP)), RegionRound)
    assert (old.tier_ranks, old.zero_pad_rank, old.rank_for("agx")) == ({}, None, 8)


def test_a_round_config_says_which_step_counts_answer_it() -> None:
    paced, fixed = SAMPLES[15], SAMPLES[5]
    assert isinstance(paced, RoundConfig) and paced.finish_s is not None and fixed.finish_s is None
    assert [paced.steps_error(k) for k in (20, 55, 100)] == ["", "", ""]
    assert paced.steps_error(19) == "ran 19 local steps, not the assigned 20-100" and paced.steps_error(101)
    assert fixed.steps_error(20) == "" and fixed.steps_error(21) == "ran 21 local steps, not the assigned 20"


def test_every_message_type_has_a_sample() -> None:
    assert {type(m).TYPE for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    wire = encode(msg)
    back = decode(wire, type(msg))
    assert back == msg
    assert type(back) is type(msg)
    plain = json.loads(wire) if msg.WIRE == "json" else msgpack.unpackb(wire)
    assert plain["type"] == msg.TYPE and plain["v"] == SCHEMA_VERSION
    if msg.WIRE == "json":  # readable with mosquitto_sub: plain UTF-8 JSON
        wire.decode("utf-8")


def test_decode_picks_among_expected_types() -> None:
    report, export = SAMPLES[7], SAMPLES[9]
    assert decode(encode(report), (RoundReport, ExportReport)) == report
    assert decode(encode(export), (RoundReport, ExportReport)) == export
    status, cmd = SAMPLES[0], SAMPLES[10]
    assert decode(encode(status), (NodeStatus, Command)) == status  # mixed wires: sniffed
    assert decode(encode(cmd), (NodeStatus, Command)) == cmd


def test_chunk_data_travels_as_msgpack_bin_without_base64() -> None:
    chunk = SAMPLES[12]
    assert isinstance(chunk, Chunk)
    wire = encode(chunk)
    assert len(wire) < len(chunk.data) + 200
    assert DATA in wire


def _wire(msg: Message, **changes: object) -> dict:
    w = msg.to_wire()
    for k, v in changes.items():
        if v is _DROP:
            w.pop(k)
        else:
            w[k] = v
    return w


_DROP = object()
CMD = Command(command="stop", run_id="r1")
CFG = SAMPLES[5]
REPORT = SAMPLES[7]
CHUNK = SAMPLES[12]
STATUS = SAMPLES[0]
TELEMETRY = SAMPLES[2]


def _mp(w: dict) -> bytes:
    return msgpack.packb(w, use_bin_type=True)


def _js(w: dict) -> bytes:
    return json.dumps(w).encode()


# (case id, payload, expected type(s), a fragment the error must contain)
REJECTIONS = [
    ("malformed-msgpack", b"\xc1\x00\x01", Command, "malformed msgpack"),
    ("truncated-msgpack", encode(CMD)[:-3], Command, "malformed msgpack"),
    ("trailing-bytes", encode(CMD) + b"\x00", Command, "malformed msgpack"),
    ("malformed-json", b'{"type": "node_status", ', NodeStatus, "malformed JSON"),
    ("invalid-utf8-json", b'{"type": "\xff"}', NodeStatus, "malformed JSON"),
    ("empty", b"", Command, "empty payload"),
    ("not-bytes", "text", Command, "must be bytes"),
    ("not-a-map-msgpack", _mp([1, 2, 3]), Command, "must be a map"),  # type: ignore[arg-type]
    ("not-a-map-json", b"[1, 2]", NodeStatus, "must be a map"),
    ("missing-type", _mp(_wire(CMD, type=_DROP)), Command, "message type None"),
    ("wrong-type", encode(CMD), RoundConfig, "'command' is not one of ['round_config']"),
    ("wrong-version", _mp(_wire(CMD, v=SCHEMA_VERSION + 1)), Command, "Command.v"),
    ("version-as-string", _mp(_wire(CMD, v="1")), Command, "Command.v"),
    ("missing-version", _mp(_wire(CMD, v=_DROP)), Command, "Command.v: missing"),
    ("json-wrong-version", _js(_wire(STATUS, v=0)), NodeStatus, "NodeStatus.v"),
    ("unknown-field", _mp(_wire(CMD, evil=1)), Command, "unknown field(s) ['evil']"),
    ("missing-field", _mp(_wire(CFG, rank=_DROP)), RoundConfig, "missing field(s) ['rank']"),
    ("wrong-field-type", _mp(_wire(CMD, round="3")), Command, "Command.round: must be an integer"),
    ("bool-as-int", _mp(_wire(CFG, rank=True)), RoundConfig, "RoundConfig.rank: must be an integer"),
    ("float-as-int", _mp(_wire(CHUNK, index=1.0)), Chunk, "Chunk.index: must be an integer"),
    ("bad-choice", _mp(_wire(CMD, command="rm -rf")), Command, "Command.command: must be one of"),
    ("out-of-range", _mp(_wire(CFG, target_sparsity=1.5)), RoundConfig, "RoundConfig.target_sparsity: outside"),
    ("negative-count", _mp(_wire(REPORT, upload_bytes=-1)), RoundReport, "RoundReport.upload_bytes: outside"),
    ("nan-msgpack", _mp(_wire(REPORT, loss_end=math.nan)), RoundReport, "RoundReport.loss_end: must be finite"),
    ("inf-msgpack", _mp(_wire(CFG, deadline_ts=math.inf)), RoundConfig, "RoundConfig.deadline_ts: must be finite"),
    ("nan-in-map", _mp(_wire(REPORT, metrics={"acc": math.nan})), RoundReport, "metrics['acc']: must be finite"),
    ("nan-json", _js(_wire(TELEMETRY, cpu_percent=math.nan)), Telemetry, "NaN is not allowed"),
    ("infinity-json", _js(_wire(TELEMETRY, power_w=math.inf)), Telemetry, "Infinity is not allowed"),
    ("oversize", _mp(_wire(CMD, run_id="x" * 300)), Command, "exceeds the limit of 100"),
    ("long-string", _mp(_wire(CMD, run_id="x" * 300)), Command, "Command.run_id: longer than 64"),
    ("long-error", _mp(_wire(REPORT, error="e" * 5000)), RoundReport, "RoundReport.error: longer than 2048"),
    ("long-list", _mp(_wire(ResendRequest("t", "node-a", []), missing=list(range(65537)))), ResendRequest,
     "ResendRequest.missing: more than 65536 items"),
    ("huge-list", _mp({"type": "resend_request", "v": 1, "missing": [0] * 200_000}), ResendRequest,
     "max_array_len"),
    ("big-map", _mp(_wire(REPORT, metrics={f"m{i}": 1.0 for i in range(65)})), RoundReport,
     "RoundReport.metrics: more than 64 items"),
    ("map-of-strings", _mp(_wire(REPORT, metrics={"acc": "high"})), RoundReport, "must be a number"),
    ("bad-node-id", _js(_wire(STATUS, node_id="node/a/#")), NodeStatus, "NodeStatus.node_id: invalid node id"),
    ("bad-transfer-id", _mp(_wire(CHUNK, transfer_id="a/b")), Chunk, "Chunk.transfer_id"),
    ("bad-digest", _mp(_wire(CHUNK, digest="abc")), Chunk, "Chunk.digest: must be a sha256"),
    ("index-out-of-range", _mp(_wire(CHUNK, index=3)), Chunk, "Chunk.index: must be < count 3"),
    ("data-not-bytes", _mp(_wire(CHUNK, data="text")), Chunk, "Chunk.data: must be bytes"),
    ("data-over-total", _mp(_wire(CHUNK, total_size=10)), Chunk, "Chunk.data"),
    ("json-null-required", _js(_wire(STATUS, ts=None)), NodeStatus, "NodeStatus.ts: must be a number"),
    ("bool-field-int", _js(_wire(TELEMETRY, power_estimated=1)), Telemetry, "power_estimated: must be true or false"),
]


@pytest.mark.parametrize(("payload", "expected", "fragment"), [r[1:] for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
def test_rejections(payload: bytes, expected: type, fragment: str) -> None:
    max_bytes = 100 if fragment.startswith("exceeds the limit of 100") else 1 << 24
    with pytest.raises(ProtocolError) as err:
        decode(payload, expected, max_bytes=max_bytes)
    assert fragment in str(err.value)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize(("build", "fragment"), [
    (lambda: Command(command="reboot", run_id="r"), "Command.command"),
    (lambda: RoundConfig(run_id="r", round=0, target_sparsity=1.0, rank=8, local_steps=1, deadline_ts=0.0,
                         upload_transfer_id="u", download_transfer_id=None), "target_sparsity"),
    (lambda: RoundConfig(run_id="r", round=1, target_sparsity=0.1, rank=8, local_steps=120, deadline_ts=0.0,
                         upload_transfer_id="u", download_transfer_id=None, finish_s=60.0, min_steps=20, max_steps=100),
     "a paced round needs"),
    (lambda: RoundConfig(run_id="r", round=1, target_sparsity=0.1, rank=8, local_steps=20, deadline_ts=0.0,
                         upload_transfer_id="u", download_transfer_id=None, max_steps=100), "need finish_s"),
    (lambda: NodeStatus(node_id="", state="online", ts=0.0), "node_id"),
    (lambda: NodeStatus(node_id="a", state="online", ts=0.0, base_model="ABC"), "base_model: must be a sha256"),
    (lambda: RoundReport(run_id="r", round=0, node_id="a", status="ok", energy_j=-1.0), "energy_j"),
    (lambda: Chunk(transfer_id="t", sender="a", index=0, count=1, total_size=1, digest="0" * 64, data=b"ab"),
     "Chunk.data"),
    (lambda: Command(command="stop", run_id="r", v=2), "Command.v"),
], ids=["choice", "sparsity-one", "paced-steps-out-of-range", "range-without-finish", "empty-node", "base-model-digest",
        "negative-energy",
        "data-over-total", "version"])
def test_invalid_messages_cannot_be_built_locally(build, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(")):
        build()


def test_numbers_are_normalised() -> None:
    msg = decode(_js(_wire(TELEMETRY, cpu_percent=3, ts=17)), Telemetry)
    assert isinstance(msg.cpu_percent, float) and msg.cpu_percent == 3.0
    assert isinstance(msg.ts, float)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(ProtocolError):
        encode({"type": "command"})  # type: ignore[arg-type]


def test_region_topics_parse_apart_from_node_topics() -> None:
    from shared.topics import TopicError, Topics

    t = Topics("fedspine/v1")
    p = t.parse(t.region("east", "upload"))
    assert (p.kind, p.node_id, p.region) == ("upload", None, "east")  # never taken for a node's upload
    assert t.parse(t.node("east", "upload")).region is None
    sub = t.region_root("east")
    assert sub.node("n1", "status") == "fedspine/v1/region/east/node/n1/status"
    with pytest.raises(TopicError):  # a sub-fleet's node topic is not part of the root's tree
        t.parse(sub.node("n1", "upload"))
    with pytest.raises(TopicError):
        t.region("east", "telemetry")
    with pytest.raises(TopicError):
        t.region("../x", "status")
