"""Hierarchical rounds over the in-memory bus: a root, regional aggregators and real node agents (fake trainers).

A fleet-wide method's schedule (HetLoRA's rank per device tier included) reaches the nodes under regions exactly as
it reaches them in a flat run, with the same aligned and paced steps; a method whose policy is per node (FedSpine's
bandit) runs in each region for its own nodes and gives every node what a flat run gives it."""

from __future__ import annotations

import hashlib
import threading
import time
import types

import pytest
import structlog
import torch

from coordinator.config import CoordinatorConfig, RegionConfig
from coordinator.region import Region
from coordinator.server import Coordinator
from coordinator.state import CheckpointStore
from coordinator.strategies import STRATEGIES, make_strategy
from coordinator.strategies.base import NodeInfo
from edge_node.agent import DeviceProfile, NodeAgent
from edge_node.config import NodeConfig
from shared.messages import RegionStatus, RoundConfig, decode, encode
from shared.transport import MemoryBus, MemoryTransport
from tests.coordinator.test_rounds import BasedTrainer, FakeTrainer, LabelledTrainer, rows

REGIONS = {"east": ["agx-1", "nx-2"], "west": ["tx2-3"]}
NODES = [n for members in REGIONS.values() for n in members]
TIERS = {"agx-1": "agx", "nx-2": "nx", "tx2-3": "tx2"}  # device tiers (HetLoRA's default ranks: 16, 8, 4)


def _config(tmp_path, method: str, rounds: int = 3, pruning: dict | None = None, **coordinator) -> CoordinatorConfig:
    return CoordinatorConfig.from_dict({
        "coordinator": {"method": method, "rounds": rounds, "min_nodes": len(NODES), "local_steps": 2,
                        "deadline_s": 5.0, "state_dir": str(tmp_path / "coord"), "join_timeout_s": 10.0,
                        **coordinator},
        "pruning": {"target_sparsity": 0.3, **(pruning or {})}, "lora": {"rank": 4}})


def _agent(bus, tmp_path, nid: str, trainer, root: str | None, profile: DeviceProfile | None = None,
           delay_s: float = 0.0) -> NodeAgent:
    cfg = NodeConfig.from_dict({**({"broker": {"topic_root": root}} if root else {}),
                                "node": {"id": nid, "state_dir": str(tmp_path / nid),
                                         "device_type": TIERS.get(nid, "generic")}})
    a = NodeAgent(cfg, trainer=trainer, profile=profile)
    a.transport = MemoryTransport(bus, nid, on_connect=a._on_connect, will=(a.topics.node(nid, "status"), b""),
                                  log=a.log.bind(logger="transport"))
    threading.Thread(target=lambda: (time.sleep(delay_s), a.run()), daemon=True).start()
    return a


def _run(tmp_path, method: str, trainers: dict[str, FakeTrainer], *, regions: bool,
         profile: DeviceProfile | None = None, direct: dict[str, FakeTrainer] | None = None,
         coordinator: dict | None = None, late: frozenset = frozenset(), pruning: dict | None = None):
    """Run the fleet to the end (flat, or each node under its region of REGIONS; ``direct`` nodes connect to the
    root in either case; ``late`` nodes start half a second after the others): the root's run summary, the log lines,
    every RoundConfig each node was sent, in order, and the regional aggregators."""
    bus = MemoryBus()
    configs: dict[str, list[RoundConfig]] = {n: [] for n in NODES}
    spy = MemoryTransport(bus, "spy")
    spy.subscribe("fedspine/v1/region/+/node/+/config" if regions else "fedspine/v1/node/+/config",
                  lambda t, p: configs[t.split("/")[-2]].append(decode(p, RoundConfig)))
    spy.start()
    started = []
    for rid, members in REGIONS.items():
        if regions:
            cfg = RegionConfig.from_dict({"broker": {"url": "mqtt://localhost:1883"},
                                          "region": {"region_id": rid, "deadline_s": 5.0}})
            region = Region(cfg, transport=MemoryTransport(bus, f"region-{rid}"))
            region.transport.on_connect = lambda r=region: r._announce(force=True)
            threading.Thread(target=region.run, daemon=True).start()
            started.append(region)
        root = f"fedspine/v1/region/{rid}" if regions else None
        started += [_agent(bus, tmp_path, n, trainers[n], root, profile, 0.5 if n in late else 0.0) for n in members]
    started += [_agent(bus, tmp_path, n, trainer, None, profile) for n, trainer in (direct or {}).items()]
    coord = Coordinator(_config(tmp_path, method, pruning=pruning, **(coordinator or {})),
                        transport=MemoryTransport(bus, "coordinator"))
    out: dict = {}
    with structlog.testing.capture_logs() as lines:
        t = threading.Thread(target=lambda: out.setdefault("summary", coord.run()), daemon=True)
        t.start()
        t.join(90)
    for s in started:
        s.stop()
    spy.stop()
    return types.SimpleNamespace(summary=out["summary"], lines=lines, configs=configs,
                                 regions=[r for r in started if isinstance(r, Region)])


@pytest.mark.parametrize("method", ["uniform", "ft_prune"])
def test_a_fleet_wide_schedule_reaches_nodes_under_regions_as_it_reaches_a_flat_fleet(tmp_path, method):
    flat = {n: FakeTrainer(n) for n in NODES}
    hier = {n: FakeTrainer(n) for n in NODES}
    flat_summary = _run(tmp_path / "flat", method, flat, regions=False).summary
    summary = _run(tmp_path / "hier", method, hier, regions=True).summary
    assert flat_summary.rounds_done == summary.rounds_done == 3, summary.stopped_early
    assert not summary.exports and set(summary.region_exports) == set(REGIONS)  # the run ended through the regions
    # Each node was asked the same (target sparsity, rank, local steps) every round, the final sync included.
    for n in NODES:
        assert hier[n].calls == flat[n].calls, (n, hier[n].calls, flat[n].calls)
        assert hier[n].calls[-1][2] == 0 and hier[n].sparsity >= 0.3 - 1e-9  # pruned to s*, then the final sync
    assert max(c[0] for c in hier[NODES[0]].calls) >= 0.3 - 1e-9  # not a vacuous equality: there was a cut
    got = [(r["round"], r["regions"], r["accepted"], round(r["target_sparsity"], 4))
           for r in rows(tmp_path / "hier", "round")]
    assert [g[:3] for g in got] == [(1, 2, 3), (2, 2, 3), (3, 2, 3)]
    # The exports: every node was asked and held the run's final model (the fake trainer has no model to merge,
    # so its export fails there: attempted, not skipped).
    assert {rid: (e.nodes, e.skipped, e.missing) for rid, e in summary.region_exports.items()} == \
        {rid: (len(m), 0, 0) for rid, m in REGIONS.items()}


def test_nodes_on_the_root_sit_out_hierarchical_rounds_and_the_root_says_so_every_round(tmp_path):
    direct = {"orin-9": FakeTrainer("orin-9")}
    run = _run(tmp_path, "uniform", {n: FakeTrainer(n) for n in NODES}, regions=True, direct=direct)
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert direct["orin-9"].calls == []  # it trained in no round
    warned = [e for e in run.lines if e["event"] == "direct_nodes_sit_out"]
    assert [(e["round"], e["nodes"]) for e in warned] == [(1, 1), (2, 1), (3, 1)]
    assert [r["direct_nodes_idle"] for r in rows(tmp_path, "round")] == [1, 1, 1]


def test_fraction_is_flat_only_and_the_root_says_so_under_regions(tmp_path):
    trainers = {n: FakeTrainer(n) for n in NODES}
    run = _run(tmp_path, "uniform", trainers, regions=True, coordinator={"fraction": 0.5})
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert all(len(trainers[n].calls) == 4 for n in NODES)  # every node in every round (and the final sync)
    warned = [e for e in run.lines if e["event"] == "fraction_ignored_under_regions"]
    assert [(e["round"], e["fraction"]) for e in warned] == [(1, 0.5), (2, 0.5), (3, 0.5)]


class TimedTrainer(FakeTrainer):
    """A FakeTrainer whose round takes ``fixed_s`` plus ``step_s`` per local step of device time (it does not
    sleep): on a simulated device the agent reports them as virtual time, so both runs time each node alike.  Like
    LocalTrainer it times its steps before the node joins (``calibrate``), so round 1 is paced from those timings."""

    def __init__(self, name: str, step_s: float, fixed_s: float = 0.2) -> None:
        super().__init__(name)
        self.virtual_step_s, self.fixed_s = step_s, fixed_s

    def calibrate(self, steps):
        return {"step_s": self.virtual_step_s, "step_work_s": self.virtual_step_s, "fixed_s": self.fixed_s,
                "fixed_work_s": self.fixed_s}

    def run_round(self, **kw):
        res = super().run_round(**kw)
        res.train_s = self.virtual_step_s * res.steps
        res.compute_s = self.fixed_s + res.train_s
        return res


def _planned(cfg: RoundConfig) -> tuple:
    """What a config plans of the node's round (its ids and deadline aside; the final sync runs no step, so whether
    it would track importance is moot: a flat one leaves the flag at its default)."""
    return (cfg.round, round(cfg.target_sparsity, 9), cfg.rank, cfg.importance and cfg.local_steps > 0,
            cfg.local_steps, cfg.finish_s, cfg.min_steps, cfg.max_steps)


def test_nodes_under_regions_get_the_aligned_paced_steps_of_a_flat_round_and_the_same_global_state(tmp_path):
    """Nodes of different speeds: each region times its own nodes and reports its slowest completion for the next
    round (for round 1, answering the root's RegionPlanQuery from the nodes' startup timings), the root paces the
    round to the latest; every node is sent the steps, finish and step bounds a flat round sends it, round 1
    included, and the FedNova-weighted global state is the flat one."""
    step_s = {"agx-1": 0.01, "nx-2": 0.03, "tx2-3": 0.1}  # device seconds per local step
    profile = DeviceProfile(speed=1.0, uplink_mbps=100.0, latency_s=0.05)
    runs = {mode: _run(tmp_path / mode, "uniform", {n: TimedTrainer(n, step_s[n]) for n in NODES},
                       regions=mode == "hier", profile=profile) for mode in ("flat", "hier")}
    flat, hier = runs["flat"], runs["hier"]
    assert flat.summary.rounds_done == hier.summary.rounds_done == 3, hier.summary.stopped_early
    want = {n: [_planned(c) for c in flat.configs[n]] for n in NODES}
    assert {n: [_planned(c) for c in hier.configs[n]] for n in NODES} == want
    # Not vacuous: every round is paced to one finish, set by the TX2 at τ (round 1 from the startup timings), with
    # the faster nodes given more steps (AGX up to the cap 5τ); the final sync evaluates only.
    assert [c[0] for c in want["agx-1"]] == [1, 2, 3, 4]
    for n in NODES:
        assert want[n][3][4] == 0 and want[n][3][5] is None
    for r in (0, 1, 2):
        finish = {want[n][r][5] for n in NODES}
        assert len(finish) == 1 and None not in finish
        steps = [want[n][r][4] for n in ("agx-1", "nx-2", "tx2-3")]
        assert steps[0] > steps[1] > steps[2] == 2 and all(want[n][r][6:] == (1, 10) for n in NODES), steps
    # FedNova weighting with each node's real steps: the same global state as the flat run's
    got = CheckpointStore(tmp_path / "hier" / "coord").load()["strategy"]["tensors"]
    ref = CheckpointStore(tmp_path / "flat" / "coord").load()["strategy"]["tensors"]
    keys = {k for k in ref if k.split(".")[0] in ("delta", "dense", "importance")}
    assert keys and keys == {k for k in got if k.split(".")[0] in ("delta", "dense", "importance")}
    for k in sorted(keys):
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7), k
    assert [r["finish_s"] is not None for r in rows(tmp_path / "hier", "round")] == [True, True, True]
    # Round 1 asked both regions for their finish; later rounds had it from the regions' reports: no extra exchange.
    asked = [(e["round"], e["regions"]) for e in hier.lines if e["event"] == "region_plans_asked"]
    assert asked == [(1, sorted(REGIONS))], asked
    assert not [e for e in hier.lines if e["event"] == "region_plans_missing"]


def test_hetlora_under_regions_trains_each_tier_at_its_rank_as_flat_and_reaches_the_flat_global_state(tmp_path):
    """HetLoRA's tier ranks reach the regions with each round (RegionRound.tier_ranks): every node is sent the rank of
    its tier, the steps (paced with its own rank's timing), finish and step bounds that a flat run sends it, final sync
    included; the regions' zero-padded partial sums, padded to the largest tier rank, give the flat global state."""
    step_s = {"agx-1": 0.01, "nx-2": 0.03, "tx2-3": 0.1}
    profile = DeviceProfile(speed=1.0, uplink_mbps=1.0, latency_s=0.05)  # a slow uplink: upload time grows with rank
    runs = {mode: _run(tmp_path / mode, "hetlora", {n: TimedTrainer(n, step_s[n]) for n in NODES},
                       regions=mode == "hier", profile=profile) for mode in ("flat", "hier")}
    flat, hier = runs["flat"], runs["hier"]
    assert flat.summary.rounds_done == hier.summary.rounds_done == 3, hier.summary.stopped_early
    assert not hier.summary.exports and set(hier.summary.region_exports) == set(REGIONS)
    want = {n: [_planned(c) for c in flat.configs[n]] for n in NODES}
    assert {n: [_planned(c) for c in hier.configs[n]] for n in NODES} == want
    # Not vacuous: each tier at its own rank (the final sync at the deployed rank, 16), no cut; rounds 2 and 3 paced
    ranks = {n: [c[2] for c in want[n]] for n in NODES}
    assert ranks == {"agx-1": [16, 16, 16, 16], "nx-2": [8, 8, 8, 16], "tx2-3": [4, 4, 4, 16]}, ranks
    assert all(c[1] == 0.0 for n in NODES for c in want[n])
    assert all(len({want[n][r][5] for n in NODES} - {None}) == 1 for r in (0, 1, 2))
    assert {n: hier.configs[n][-1].local_steps for n in NODES} == dict.fromkeys(NODES, 0)
    got = CheckpointStore(tmp_path / "hier" / "coord").load()["strategy"]["tensors"]
    ref = CheckpointStore(tmp_path / "flat" / "coord").load()["strategy"]["tensors"]
    keys = {k for k in ref if k.split(".")[0] in ("zpB", "zpA", "dense", "velocity")}
    assert {k.split(".")[0] for k in keys} == {"zpB", "zpA", "dense", "velocity"}
    assert keys == {k for k in got if k.split(".")[0] in ("zpB", "zpA", "dense", "velocity")}
    assert ref["zpB.layer.q"].shape == (8, 16)  # padded to the largest tier rank
    for k in sorted(keys):
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7), k
    assert [r["finish_s"] is not None for r in rows(tmp_path / "hier", "round")] == [True, True, True]


class OomOnceTrainer(TimedTrainer):
    """A TimedTrainer that runs out of memory in its ``oom_call``-th round (1-based)."""

    def __init__(self, name: str, step_s: float, oom_call: int) -> None:
        super().__init__(name, step_s)
        self.oom_call = oom_call

    def run_round(self, **kw):
        if len(self.calls) + 1 == self.oom_call:
            self.calls.append((kw["target_sparsity"], kw["rank"], kw["local_steps"]))
            raise MemoryError("CUDA out of memory (simulated)")
        return super().run_round(**kw)


def _fedspine_trainers(oom_call: int = 0) -> dict[str, TimedTrainer]:
    """Nodes of three speeds; nx-2 runs out of memory in its ``oom_call``-th round (0: never)."""
    step_s = {"agx-1": 0.01, "nx-2": 0.03, "tx2-3": 0.1}
    return {n: OomOnceTrainer(n, step_s[n], oom_call=oom_call) if n == "nx-2" else TimedTrainer(n, step_s[n])
            for n in NODES}


def test_fedspines_bandit_runs_in_the_regions_and_gives_every_node_what_a_flat_run_gives_it(tmp_path):
    """FedSpine under regions: each region runs the bandit of its own nodes with the fleet's statistics that the root
    merges from the regions' (the two slowest at τ before a round, the round's reward normalisers after it).  Nodes
    of three speeds and tiers, past s* (so that only the node holding the round back prunes further, up to its
    tier's cap), one out of memory once: every node is sent each round what a flat run sends it (target sparsity,
    rank, steps, finish, step bounds; the final sync included), its bandit ends in the flat run's state (arms
    played, discounted rewards, out-of-memory exclusions) and the global state is the flat one."""
    profile = DeviceProfile(speed=1.0, uplink_mbps=10.0, latency_s=0.05, busy_w=10.0, idle_w=2.0)
    caps = {"max_sparsity": {"agx": 0.4, "nx": 0.45, "tx2": 0.6, "default": 0.5}}
    runs = {mode: _run(tmp_path / mode, "fedspine", _fedspine_trainers(oom_call=4), regions=mode == "hier",
                       profile=profile,
                       coordinator={"rounds": 7}, pruning=caps) for mode in ("flat", "hier")}
    flat, hier = runs["flat"], runs["hier"]
    assert flat.summary.rounds_done == hier.summary.rounds_done == 7, hier.summary.stopped_early
    assert not hier.summary.exports and set(hier.summary.region_exports) == set(REGIONS)
    want = {n: [_planned(c) for c in flat.configs[n]] for n in NODES}
    assert {n: [_planned(c) for c in hier.configs[n]] for n in NODES} == want
    # Not vacuous: ranks vary, every node ends at or above s*, one beyond it (the round's bottleneck), the rounds
    # are paced, and nx-2 ran out of memory in round 4 (its bandit excludes that configuration and heavier ones).
    assert len({c[2] for n in NODES for c in want[n][:-1]}) > 1
    final = {n: want[n][-1][1] for n in NODES}
    assert all(t >= 0.3 - 1e-9 for t in final.values()) and max(final.values()) > 0.3 + 1e-9, final
    assert all(want[n][-1][4] == 0 for n in NODES) and all(want[n][r][5] is not None for n in NODES for r in (1, 5))
    ref = CheckpointStore(tmp_path / "flat" / "coord").load()
    flat_bandit = ref["strategy"]["policy"]["bandit"]
    assert list(flat_bandit["oom"]) == ["nx-2"]
    hier_bandit = {"bandits": {}, "oom": {}}
    for region in hier.regions:
        st = region.policy.bandit.state_dict()
        hier_bandit["bandits"].update(st["bandits"])
        hier_bandit["oom"].update(st["oom"])
    assert hier_bandit["oom"] == flat_bandit["oom"]
    assert sorted(hier_bandit["bandits"]) == sorted(flat_bandit["bandits"]) == NODES
    for n in NODES:
        for arm in ("dp", "rank"):
            got, exp = hier_bandit["bandits"][n][arm], flat_bandit["bandits"][n][arm]
            assert got["plays"] == exp["plays"] and got["draws"] == exp["draws"], (n, arm)
            assert got["counts"] == pytest.approx(exp["counts"]) and got["sums"] == pytest.approx(exp["sums"]), (n, arm)
        assert sum(flat_bandit["bandits"][n]["dp"]["sums"]) > 0  # rewards were credited
    got = CheckpointStore(tmp_path / "hier" / "coord").load()["strategy"]["tensors"]
    keys = {k for k in ref["strategy"]["tensors"] if k.split(".")[0] in ("delta", "dense", "importance")}
    assert keys and keys == {k for k in got if k.split(".")[0] in ("delta", "dense", "importance")}
    for k in sorted(keys):
        assert torch.allclose(got[k], ref["strategy"]["tensors"][k], rtol=1e-5, atol=1e-7), k
    # Each round the root asked twice (the fleet's timing, then the regions' choice), and after the last round once
    # more for the regions to learn from it (as the flat strategy did); every region answered, learning every round.
    asked = [(e["round"], e["stage"]) for e in hier.lines if e["event"] == "region_plans_asked"]
    assert asked == [(r, s) for r in range(1, 8) for s in ("timing", "choose")] + [(7, "learn")], asked
    assert not [e for e in hier.lines if e["event"] in ("region_plans_missing", "region_results_not_learned")]
    learned = sorted((e["node_id"], e["learn_round"]) for e in hier.lines if e["event"] == "region_learned")
    assert learned == sorted((rid, r) for rid in REGIONS for r in range(1, 8))
    # The root checkpoints the last round's merged statistics: a restarted root still lets the regions learn from it.
    saved = CheckpointStore(tmp_path / "hier" / "coord").load()["fleet_stats"]
    assert (saved["round"], saved["regions"], len(saved["slowest"])) == (7, sorted(REGIONS), 2)


def test_a_retried_per_node_round_asks_the_regions_again_and_they_choose_again(tmp_path, monkeypatch):
    """Round 1 fails at the root after the regions ran it: the retry asks both stages again for attempt 1, each
    region chooses again (as a flat retry configures again) and the run goes on, learning from each counted round."""
    _partials_disagree_once(monkeypatch)
    run = _run(tmp_path, "fedspine", _fedspine_trainers(), regions=True, profile=DeviceProfile(1.0, 10.0, 0.05))
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    asked = [(e["round"], e["attempt"], e["stage"]) for e in run.lines if e["event"] == "region_plans_asked"
             and e["round"] == 1 and not e.get("final")]
    assert asked == [(1, a, s) for a in (0, 1) for s in ("timing", "choose")], asked
    chosen = sorted((e["node_id"], e["attempt"]) for e in run.lines if e["event"] == "region_configs_chosen"
                    and e["round_asked"] == 1)
    assert chosen == sorted((rid, a) for rid in REGIONS for a in (0, 1))
    for n in NODES:  # the retry's configuration came with it, under its own transfers
        assert [".a1." in c.upload_transfer_id for c in run.configs[n] if c.round == 1] == [False, True]
    # Round 1's first try was not counted: its results are dropped, not learned; the retry's are.
    dropped = [(e["node_id"], e["results_round"], e["learn_round"]) for e in run.lines
               if e["event"] == "region_results_not_learned"]
    assert dropped == [] or all(r == 1 and lr == 0 for _, r, lr in dropped), dropped
    learned = sorted((e["node_id"], e["learn_round"]) for e in run.lines if e["event"] == "region_learned")
    assert learned == sorted((rid, r) for rid in REGIONS for r in (1, 2, 3))


def test_a_region_that_does_not_choose_fails_its_per_node_round_and_the_root_names_it(tmp_path, monkeypatch):
    """West never answers the per-node plan query: the root waits PLAN_QUERY_S, names it, runs the round unpaced; west,
    holding no configurations for the round, fails it rather than guess, and east's nodes carry the rounds."""
    import coordinator.server as server

    monkeypatch.setattr(server, "PLAN_QUERY_S", 0.5)
    real = Region._answer_per_node
    monkeypatch.setattr(Region, "_answer_per_node", lambda self, q: None if self.rid == "west" else real(self, q))
    run = _run(tmp_path, "fedspine", _fedspine_trainers(), regions=True, profile=DeviceProfile(1.0, 10.0, 0.05))
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    missing = {(e["round"], tuple(e["regions"])) for e in run.lines if e["event"] == "region_plans_missing"}
    assert missing == {(r, ("west",)) for r in (1, 2, 3)}, missing
    failed = [(e["round"], e["region"]) for e in run.lines if e["event"] == "region_round_failed"]
    assert failed == [(r, "west") for r in (1, 2, 3)], failed
    assert [(r["regions"], r["accepted"], r["finish_s"]) for r in rows(tmp_path, "round")] == [(1, 2, None)] * 3
    assert run.configs["tx2-3"][:-1] == [] and all(c.finish_s is None for c in run.configs["agx-1"])


def test_a_region_announcing_itself_no_longer_stops_a_fedspine_root(tmp_path):
    """The root used to refuse a per-node method as soon as a region was online; now it waits for the region's nodes
    like any other method (and stops here only because none joins)."""
    bus = MemoryBus()
    announce = MemoryTransport(bus, "region-east")
    announce.start()
    announce.publish("fedspine/v1/region/east/status",
                     encode(RegionStatus(region_id="east", state="online", ts=1.7e9, nodes=0)), retain=True)
    coord = Coordinator(_config(tmp_path, "fedspine", join_timeout_s=1.0), transport=MemoryTransport(bus, "coordinator"))
    with structlog.testing.capture_logs() as lines:
        summary = coord.run()
    announce.stop()
    assert summary.stopped_early == f"fewer than {len(NODES)} nodes joined within 1 s", summary.stopped_early
    assert not [e for e in lines if e["log_level"] == "error"]


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_fleet_plan_is_the_flat_schedule_or_none(tmp_path, method):
    """Policy lives in the strategy: a fleet-wide method's plan is what ``configure_round`` gives a fresh node; a
    per-node one has no plan (its regions run the policy)."""
    s = make_strategy(_config(tmp_path, method, rounds=6), total_rounds=6)
    if s.per_node_policy:
        with pytest.raises(NotImplementedError):
            s.fleet_plan(1)
        return
    tiers = ["default", "agx", "nx", "tx2", "orin"]  # "orin": a tier the table does not name
    for importance in (False, True):
        if importance:
            s.global_.load_tensors({"importance.0.heads": torch.ones(2)})
        for rnd in range(1, 7):
            plan = s.fleet_plan(rnd)
            got = s.configure_round(rnd, [NodeInfo(node_id=f"n-{t}", device_type=t) for t in tiers])
            for tier, a in zip(tiers, got, strict=True):  # a region's rule for a node's rank: RegionRound.rank_for
                rank = (plan.tier_ranks or {}).get(tier, plan.rank)
                assert (plan.target_sparsity, rank, plan.local_steps, plan.importance) == \
                    (a.target_sparsity, a.rank, a.local_steps, a.importance), (method, rnd, importance, tier)


def test_a_region_sends_a_node_back_from_offline_its_round_again_and_gives_up_on_one_that_stays_away(
        tmp_path, monkeypatch):
    """The root's rules (a participant that comes back before it reported may have restarted: configuration and
    slice again; one offline for OFFLINE_GRACE_S has failed) hold for a region's own nodes too."""
    import time

    import coordinator.region as region_mod
    from coordinator.registry import Registry
    from shared.messages import NodeStatus, RegionRound, RoundConfig, decode

    monkeypatch.setattr(region_mod, "OFFLINE_GRACE_S", 0.3)
    bus = MemoryBus()
    cfg = RegionConfig.from_dict({"broker": {"url": "mqtt://localhost:1883"},
                                  "region": {"region_id": "east", "deadline_s": 5.0}})
    region = Region(cfg, transport=MemoryTransport(bus, "region-east"))
    region.transport.start()
    configs: list[tuple[str, RoundConfig]] = []
    spy = MemoryTransport(bus, "spy")
    spy.subscribe("fedspine/v1/region/east/node/+/config", lambda t, p: configs.append((t, decode(p, RoundConfig))))
    spy.start()
    region.registry = Registry()
    for nid in ("agx-1", "nx-2"):
        region.registry.apply(NodeStatus(node_id=nid, state="online", ts=1.0), 1.0, 0)
    rr = RegionRound(run_id="r1", round=2, rank=4, sent_rank=4, local_steps=2, target_sparsity=0.1, importance=False,
                     deadline_ts=time.time() + 5, download_transfer_id=None, upload_transfer_id="r1.r2.east.up")
    end = time.monotonic() + 3.0
    pending = region._send_configs(rr, region.registry.live(), end)
    time.sleep(0.2)
    assert sorted(t.split("/")[-2] for t, _ in configs) == ["agx-1", "nx-2"]
    for state, ts in (("offline", 2.0), ("online", 3.0)):  # agx-1 restarts
        region.events.put(("status", "agx-1", NodeStatus(node_id="agx-1", state=state, ts=ts)))
    region.events.put(("status", "nx-2", NodeStatus(node_id="nx-2", state="offline", ts=2.0)))  # nx-2 stays away
    with structlog.testing.capture_logs() as lines:
        accepted, failed = region._collect(rr, pending, end)
    time.sleep(0.2)
    assert [t.split("/")[-2] for t, _ in configs[2:]] == ["agx-1"]  # only the node that came back
    assert configs[2][1] == next(c for t, c in configs[:2] if "agx-1" in t)  # the same config, deadline included
    assert (accepted, [f.reason for f in failed]) == ({}, ["timeout", "offline"])
    gave_up = [(e["node"], e["status"]) for e in lines if e["event"] == "node_round_failed"]
    assert gave_up == [("nx-2", "offline")]  # after its grace; agx-1, back, was waited for to the end
    spy.stop()
    region.transport.stop()


def _lone_region(nodes: tuple[str, ...]):
    """A region on its own with ``nodes`` live and round 2 sent to them: (region, its RegionRound, what it sent each
    node, the round's end, one valid update's bytes) for tests that feed ``_collect`` events by hand."""
    from coordinator.registry import Registry
    from shared.messages import NodeStatus, RegionRound
    from shared.updates import LoraUpdate, ModuleUpdate

    cfg = RegionConfig.from_dict({"broker": {"url": "mqtt://localhost:1883"},
                                  "region": {"region_id": "east", "deadline_s": 5.0}})
    region = Region(cfg, transport=MemoryTransport(MemoryBus(), "region-east"))
    region.transport.start()
    region.registry = Registry()
    for nid in nodes:
        region.registry.apply(NodeStatus(node_id=nid, state="online", ts=1.0), 1.0, 0)
    rr = RegionRound(run_id="r1", round=2, rank=4, sent_rank=4, local_steps=2, target_sparsity=0.0, importance=False,
                     deadline_ts=time.time() + 5, download_transfer_id=None, upload_transfer_id="r1.r2.east.up")
    end = time.monotonic() + 3.0
    pending = region._send_configs(rr, region.registry.live(), end)
    g = torch.Generator().manual_seed(0)
    data = LoraUpdate({"layer.q": ModuleUpdate(A=torch.randn(4, 4, generator=g), B=torch.randn(8, 4, generator=g),
                                               rows=torch.arange(8), cols=torch.arange(4), shape=(8, 4),
                                               scale=4.0)}).to_bytes()
    return region, rr, pending, end, data


def test_a_region_waits_past_a_report_of_another_transfer_as_the_root_does_and_fails_a_node_that_reports_failure():
    """The root's rules for a node's report (coordinator/collect.py): one naming another transfer (a stale one) is
    logged and waited past, so the node's real answer still counts; a failed status fails the node."""
    from shared.messages import RoundReport

    region, rr, pending, end, data = _lone_region(("agx-1", "nx-2"))
    up = pending["agx-1"].config.upload_transfer_id

    def report(nid: str, **kw) -> RoundReport:
        return RoundReport(**{"run_id": "r1", "round": 2, "node_id": nid, "status": "ok", "transfer_id": up,
                              "upload_bytes": len(data), "samples": 8, "steps": 2, "rank": 4, **kw})

    region.events.put(("report", "agx-1", report("agx-1", transfer_id="r1.r2.east.agx-1.up.old")))
    region.events.put(("report", "agx-1", report("agx-1")))
    region.events.put(("upload", "agx-1", (up, data)))
    region.events.put(("report", "nx-2", report("nx-2", status="oom", error="CUDA out of memory",
                                               transfer_id=pending["nx-2"].config.upload_transfer_id)))
    with structlog.testing.capture_logs() as lines:
        accepted, failed = region._collect(rr, pending, end)
    assert sorted(accepted) == ["agx-1"] and [(f.node_id, f.reason) for f in failed] == [("nx-2", "oom")], failed
    assert accepted["agx-1"].steps == 2 and accepted["agx-1"].upload_bytes == len(data)
    assert [(e["event"], e["node"]) for e in lines if e["log_level"] == "warning"] == \
        [("report_rejected", "agx-1"), ("node_round_failed", "nx-2")]
    assert time.monotonic() < end  # every node answered: the region did not wait to its deadline
    region.transport.stop()


def test_a_region_waits_for_a_node_that_reported_left_and_came_back_as_the_root_does(monkeypatch):
    """A node whose presence went offline, that reported and came back (its report can overtake its new presence)
    is back: its upload still counts after the grace, as at the root (coordinator/collect.py)."""
    import coordinator.region as region_mod
    from shared.messages import NodeStatus, RoundReport

    monkeypatch.setattr(region_mod, "OFFLINE_GRACE_S", 0.3)
    region, rr, pending, end, data = _lone_region(("agx-1",))
    up = pending["agx-1"].config.upload_transfer_id
    region.events.put(("status", "agx-1", NodeStatus(node_id="agx-1", state="offline", ts=2.0)))
    region.events.put(("report", "agx-1", RoundReport(run_id="r1", round=2, node_id="agx-1", status="ok",
                                                      transfer_id=up, upload_bytes=len(data), samples=8, steps=2,
                                                      rank=4)))
    region.events.put(("status", "agx-1", NodeStatus(node_id="agx-1", state="online", ts=3.0)))
    later = threading.Timer(0.8, lambda: region.events.put(("upload", "agx-1", (up, data))))  # past the grace
    later.start()
    with structlog.testing.capture_logs() as lines:
        accepted, failed = region._collect(rr, pending, end)
    later.join()
    assert sorted(accepted) == ["agx-1"] and failed == [], (accepted, failed, lines)
    assert not [e for e in lines if e["event"] == "node_round_failed"]
    region.transport.stop()


def _partials_disagree_once(monkeypatch) -> None:
    """The root's first ``apply`` of the regions' partials fails as partials that disagree do; later ones run."""
    from coordinator.aggregation import GlobalLora
    from shared.updates import UpdateError

    real, calls = GlobalLora.apply, []

    def disagree_once(self, partials, *a, **kw):
        calls.append(len(partials))
        if len(calls) == 1:
            raise UpdateError("partials disagree on lora.q's shape")
        return real(self, partials, *a, **kw)

    monkeypatch.setattr(GlobalLora, "apply", disagree_once)


def test_partials_that_disagree_fail_the_round_which_is_retried_instead_of_stopping_the_root(tmp_path, monkeypatch):
    _partials_disagree_once(monkeypatch)
    run = _run(tmp_path, "uniform", {n: FakeTrainer(n) for n in NODES}, regions=True)
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    refused = [e for e in run.lines if e["event"] == "region_partials_refused"]
    assert [(e["round"], e["log_level"]) for e in refused] == [(1, "error")]
    assert [r["round"] for r in rows(tmp_path, "round")] == [1, 2, 3]  # round 1 counted once, after its retry
    # The retry's transfers are new ones at every node: an upload left over from the first try cannot answer it.
    for n in NODES:
        first = [c.upload_transfer_id for c in run.configs[n] if c.round == 1]
        assert len(first) == 2 and first[0] != first[1] and ".a0." in first[0] and ".a1." in first[1], first


def test_a_retried_round_whose_plan_is_not_the_announced_one_asks_the_regions_and_is_paced(tmp_path, monkeypatch):
    """Round 1 fails at the root after the regions answered; they reported their finish for round 2's plan (another
    target sparsity), so the retry of round 1 lacks one for its own plan: the root asks again and paces the retry
    to their answers (the flat run's round 1 finish: nothing was recorded in between), instead of running it
    unpaced."""
    step_s = {"agx-1": 0.01, "nx-2": 0.03, "tx2-3": 0.1}
    profile = DeviceProfile(speed=1.0, uplink_mbps=100.0, latency_s=0.05)
    _partials_disagree_once(monkeypatch)
    run = _run(tmp_path, "uniform", {n: TimedTrainer(n, step_s[n]) for n in NODES}, regions=True, profile=profile)
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert [r["round"] for r in rows(tmp_path, "round")] == [1, 2, 3]
    first = {n: [c for c in run.configs[n] if c.round == 1] for n in NODES}
    assert all(len(first[n]) == 2 and ".a1." in first[n][1].upload_transfer_id for n in NODES)
    plans = {(c.target_sparsity, c.rank) for n in NODES for c in first[n]}
    second = {(c.target_sparsity, c.rank) for n in NODES for c in run.configs[n] if c.round == 2}
    assert len(plans) == 1 and plans != second  # not vacuous: the announced (round 2) plan is another
    # Both tries paced to one finish, the same (no node's round was recorded in between), aligned as before.
    finishes = {(i, c.finish_s) for n in NODES for i, c in enumerate(first[n])}
    assert {f for _, f in finishes} - {None} and None not in {f for _, f in finishes} and len(finishes) == 2
    assert [c.local_steps for c in first["agx-1"]] == [10, 10] and first["tx2-3"][1].local_steps == 2
    asked = [(e["round"], e["attempt"]) for e in run.lines if e["event"] == "region_plans_asked"]
    assert asked == [(1, 0), (1, 1)], asked


def test_a_region_that_does_not_answer_the_plan_query_leaves_the_round_unpaced_and_the_root_says_which(
        tmp_path, monkeypatch):
    """An older region (it refuses the RegionPlanQuery) or a silent one: the root waits PLAN_QUERY_S, runs round 1
    τ steps unpaced as before the exchange, names the regions; later rounds are paced from their reports."""
    import coordinator.server as server

    monkeypatch.setattr(server, "PLAN_QUERY_S", 0.5)
    monkeypatch.setattr(Region, "_answer_plan", lambda self, q: None)
    step_s = {"agx-1": 0.01, "nx-2": 0.03, "tx2-3": 0.1}
    profile = DeviceProfile(speed=1.0, uplink_mbps=100.0, latency_s=0.05)
    run = _run(tmp_path, "uniform", {n: TimedTrainer(n, step_s[n]) for n in NODES}, regions=True, profile=profile)
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    missing = [(e["round"], e["regions"], e["log_level"]) for e in run.lines if e["event"] == "region_plans_missing"]
    assert missing == [(1, sorted(REGIONS), "warning")], missing
    assert [r["finish_s"] is not None for r in rows(tmp_path, "round")] == [False, True, True]
    assert all(run.configs[n][0].finish_s is None and run.configs[n][0].local_steps == 2 for n in NODES)


THREE = ["negative", "neutral", "positive"]


def _refused(lines, event: str) -> list[tuple]:
    """The final (not provisional) refusals ``event``: (who logged it, whom, level)."""
    return [(e["node_id"], e.get("node") or e.get("region"), e["log_level"]) for e in lines
            if e["event"] == event and not e.get("provisional")]


def test_under_regions_a_node_with_the_fleets_labels_in_another_order_is_refused_at_its_region(tmp_path):
    """Same number of classes, another order: its head's shapes fit, so only its labels tell.  Its region refuses it
    with the root's line (node_refused_labels, under the region's node_id) and it never trains; the rest run on."""
    trainers = {n: LabelledTrainer(n, THREE[::-1] if n == "nx-2" else THREE) for n in NODES}
    run = _run(tmp_path, "uniform", trainers, regions=True, coordinator={"labels": THREE, "min_nodes": 2})
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert trainers["nx-2"].calls == [] and len(trainers["agx-1"].calls) == len(trainers["tx2-3"].calls) == 4
    assert _refused(run.lines, "node_refused_labels") == [("east", "nx-2", "error")]
    line = next(e for e in run.lines if e["event"] == "node_refused_labels" and not e.get("provisional"))
    assert line["labels"] == THREE[::-1] and line["fleet_labels"] == THREE and "edge_node_labels" in line["hint"]
    told = [e for e in run.lines if e["event"] == "refused_by_coordinator"]  # and the node says why, on its host
    assert told and {e["node_id"] for e in told} == {"nx-2"} and all(e["log_level"] == "error" for e in told)
    assert "labels" in told[0]["reason"] and "positive" in told[0]["reason"] and "edge_node_labels" in told[0]["hint"]
    assert [(r["regions"], r["accepted"]) for r in rows(tmp_path, "round")] == [(2, 2)] * 3
    assert CheckpointStore(tmp_path / "coord").load()["labels"] == THREE
    assert {rid: e.nodes for rid, e in run.summary.region_exports.items()} == {"east": 1, "west": 1}


@pytest.mark.parametrize("pinned", [False, True])
def test_under_regions_a_node_on_another_base_model_is_refused_at_its_region(tmp_path, pinned):
    """Pinned, the root's digest reaches the regions with round 1; unpinned, the region holds its first node's
    provisionally, the root adopts the first region's report and sends it back.  Either way the odd node never
    trains and its region says so once it holds the fleet's digest."""
    ours, other = hashlib.sha256(b"ours").hexdigest(), hashlib.sha256(b"other").hexdigest()
    trainers = {n: BasedTrainer(n, other if n == "nx-2" else ours) for n in NODES}
    run = _run(tmp_path, "uniform", trainers, regions=True, late=frozenset() if pinned else frozenset({"nx-2"}),
               coordinator={"min_nodes": 2, **({"base_model": ours} if pinned else {})})
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert trainers["nx-2"].calls == [] and len(trainers["agx-1"].calls) == len(trainers["tx2-3"].calls) == 4
    assert _refused(run.lines, "node_refused_base_model") == [("east", "nx-2", "error")]
    line = next(e for e in run.lines if e["event"] == "node_refused_base_model" and not e.get("provisional"))
    assert line["base_model"] == other and line["fleet_base_model"] == ours
    assert "[coordinator] base_model" in line["hint"]
    assert [(r["regions"], r["accepted"]) for r in rows(tmp_path, "round")] == [(2, 2)] * 3
    assert CheckpointStore(tmp_path / "coord").load()["base_model"] == ours


def test_two_regions_with_different_labels_and_no_pin_are_never_averaged_together(tmp_path):
    """No pin, no node on the root: each region holds its first node's labels provisionally and reports them.  The
    root adopts the first region's (in id order), refuses the other's partial by name, and from the next round on
    that region holds the fleet's labels and refuses its node.  The rounds run on with east alone."""
    trainers = {n: LabelledTrainer(n, THREE[::-1] if n == "tx2-3" else THREE) for n in NODES}
    run = _run(tmp_path, "uniform", trainers, regions=True)
    assert run.summary.rounds_done == 3, run.summary.stopped_early
    assert [(r["regions"], r["accepted"]) for r in rows(tmp_path, "round")] == [(1, 2)] * 3  # west's never applied
    refused = [e for e in run.lines if e["event"] == "region_refused_labels"]
    assert [(e["round"], e["region"], e["labels"], e["fleet_labels"], e["log_level"]) for e in refused] == \
        [(1, "west", THREE[::-1], THREE, "error")]
    adopted = [e for e in run.lines if e["event"] == "fleet_labels" and e["node_id"] == "coordinator"]
    assert [(e["first_region"], e["labels"]) for e in adopted] == [("east", THREE)]
    assert _refused(run.lines, "node_refused_labels") == [("west", "tx2-3", "error")]
    assert len(trainers["tx2-3"].calls) == 1  # round 1, under its region's provisional labels; refused at the root
    assert all(len(trainers[n].calls) == 4 for n in ("agx-1", "nx-2"))
    assert CheckpointStore(tmp_path / "coord").load()["labels"] == THREE


def test_fleet_identity_is_one_rule_pinned_adopted_or_provisional():
    """The rule the root and every region apply (coordinator.registry.FleetIdentity): None matches anything, the
    first known value is adopted, another is refused with one line per change; a region's adoptions are provisional
    until the root's identity settles them."""
    from coordinator.registry import FleetIdentity, identity_of

    log = structlog.get_logger()
    fleet = FleetIdentity(labels=tuple(THREE))  # pinned labels, no base model yet
    ours, other = "a" * 64, "b" * 64
    with structlog.testing.capture_logs() as lines:
        assert fleet.admit("agx-1", identity_of(THREE, ours), log) == []  # adopts its digest
        assert fleet.admit("nx-2", identity_of(THREE[::-1], other), log) == ["labels", "base_model"]
        assert fleet.admit("nx-2", identity_of(THREE[::-1], other), log) == ["labels", "base_model"]  # no new line
        assert fleet.admit("lm-4", identity_of([], None), log) == []  # a causal LM with an unknown digest
    assert [(e["event"], e.get("node") or e.get("first_node")) for e in lines] == \
        [("fleet_base_model", "agx-1"), ("node_refused_labels", "nx-2"), ("node_refused_base_model", "nx-2")]
    region = FleetIdentity(provisional=True)
    with structlog.testing.capture_logs() as lines:
        region.admit("agx-1", identity_of(THREE[::-1], None), log)
        region.admit("nx-2", identity_of(THREE, None), log)
        assert region.follow(identity_of(THREE, None)) and not region.follow(identity_of(THREE, None))
        assert region.admit("nx-2", identity_of(THREE, None), log) == []
        assert region.admit("agx-1", identity_of(THREE[::-1], None), log) == ["labels"]
    assert [(e["event"], e.get("provisional", False)) for e in lines] == \
        [("fleet_labels", True), ("node_refused_labels", True), ("node_refused_labels", False)]


def test_a_region_refuses_per_node_settings_that_are_no_valid_configuration_and_answers_valid_ones():
    """The policy's settings come from the root in each per-node query; checked as the root's own configuration is
    (caps at least s*, known reward terms): invalid ones are logged and not answered, without stopping the region."""
    from shared.messages import RegionPlan, RegionPlanQuery

    region, _, _, _, _ = _lone_region(("agx-1", "nx-2"))
    answers = []
    spy = MemoryTransport(region.transport.bus, "spy")
    spy.subscribe("fedspine/v1/region/east/report", lambda t, p: answers.append(decode(p, RegionPlan)))
    spy.start()
    base = {"run_id": "r1", "round": 1, "target_sparsity": 0.3, "rank": 16, "local_steps": 2, "stage": "choose",
            "ranks": [2, 16], "total_rounds": 3, "caps": {"default": 0.5}}
    with structlog.testing.capture_logs() as lines:
        region._answer_plan(RegionPlanQuery(**{**base, "caps": {"default": 0.2}}))  # a cap below s*
        region._answer_plan(RegionPlanQuery(**{**base, "reward": {"speed": 1.0}}))  # no such reward term
        assert region.policy is None and region._chosen is None
        region._answer_plan(RegionPlanQuery(**base))
    time.sleep(0.2)
    assert [e["event"] for e in lines if e["log_level"] == "error"] == ["region_policy_refused"] * 2
    assert len(answers) == 1 and answers[0].finish_s is not None and region._chosen[:2] == (1, 0)
    assert sorted(p[0].node_id for p in region._chosen[2]) == ["agx-1", "nx-2"]
    spy.stop()
    region.transport.stop()
