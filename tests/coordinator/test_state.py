"""Checkpoints: atomic against crashes, plain JSON + safetensors (no pickle), bandit resumes bit-for-bit."""

import json
import random

import pytest
import torch

import coordinator.state as state_mod
from coordinator.bandit import FleetBandit
from coordinator.state import CheckpointStore


def _ckpt(rnd: int) -> dict:
    return {"round": rnd, "run_id": "run-1", "registry": {"n1": {"device_type": "nx", "memory_mb": 4096}},
            "strategy": {"method": "fedspine", "tensors": {"g.m.dW": torch.full((3, 2), float(rnd)),
                                                           "s.rows": torch.arange(3, dtype=torch.int64)}}}


def test_roundtrip_keeps_values_dtypes_and_is_plain_json(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(_ckpt(3))
    raw = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())  # strict JSON, tensors elsewhere
    assert raw["round"] == 3 and "tensors" not in raw["strategy"] and raw["tensor_file"] == "global-000003.safetensors"
    st = CheckpointStore(tmp_path / "ckpt").load()
    assert st["registry"] == {"n1": {"device_type": "nx", "memory_mb": 4096}}
    t = st["strategy"]["tensors"]
    assert torch.equal(t["g.m.dW"], torch.full((3, 2), 3.0)) and t["s.rows"].dtype == torch.int64


def test_crash_while_writing_tensors_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_file", broken)
    with pytest.raises(OSError):
        store.save(_ckpt(2))
    st = store.load()
    assert st["round"] == 1 and torch.equal(st["strategy"]["tensors"]["g.m.dW"], torch.full((3, 2), 1.0))
    assert not (tmp_path / "global-000002.safetensors").exists()  # the partial file never got its final name


def test_crash_before_json_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(_ckpt(1))
    real_replace = state_mod.os.replace

    def replace(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(state_mod.os, "replace", replace)
    with pytest.raises(OSError):
        store.save(_ckpt(2))
    st = store.load()  # the JSON still names round 1's tensor file, which was not deleted
    assert st["round"] == 1 and torch.equal(st["strategy"]["tensors"]["g.m.dW"], torch.full((3, 2), 1.0))


def _play(b: FleetBandit, rounds: range, sparsity: dict, rng: random.Random) -> list:
    seen = []
    for rnd in rounds:
        for node, speed in (("fast", 2.0), ("slow", 0.5)):
            c = b.choose(node, rnd, sparsity[node], cap=0.6)
            sparsity[node] = max(sparsity[node], c.target_sparsity)
            if node == "slow" and rnd == 3:
                b.out_of_memory(node, c.target_sparsity, c.rank)
                continue
            b.update(node, c.arm, min(1.0, speed * (0.3 + c.arm[0]) / (1 + 0.05 * c.rank) + 0.1 * rng.random()))
            seen.append((rnd, node, c.arm, round(c.target_sparsity, 9), c.forced))
    return seen


def test_bandit_state_through_json_resumes_identically():
    kw = {"discount": 0.9, "exploration": 0.05, "target_sparsity": 0.3, "total_rounds": 12, "seed": 7}
    full = FleetBandit((0.0, 0.05, 0.1), (2, 4, 8), **kw)
    sp_full, rng_full = {"fast": 0.0, "slow": 0.0}, random.Random(1)
    seen_full = _play(full, range(1, 13), sp_full, rng_full)

    first = FleetBandit((0.0, 0.05, 0.1), (2, 4, 8), **kw)
    sp, rng = {"fast": 0.0, "slow": 0.0}, random.Random(1)
    seen = _play(first, range(1, 6), sp, rng)
    blob = json.dumps(first.state_dict())  # exactly what goes into checkpoint.json
    resumed = FleetBandit((0.0, 0.05, 0.1), (2, 4, 8), **kw)
    resumed.load_state_dict(json.loads(blob))
    seen += _play(resumed, range(6, 13), sp, rng)
    assert seen == seen_full
    assert resumed.state_dict() == full.state_dict() and resumed.oom == full.oom == {"slow": [resumed.oom["slow"][0]]}
    assert sp == sp_full and min(sp.values()) >= 0.3 - 1e-9
