"""``fedspine node`` at start-up: what an operator gets for a wrong path, bad data, a broker that refuses the
node, and resume state that no longer fits (exit status 2 stops the systemd unit, 1 lets it try again); with JSON
logs the reason is a JSON line like the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker_config.local import LocalMosquitto
from tests.edge_node.tiny import cached_model_folder, sentiment_rows, write_csv

pytestmark = pytest.mark.slow  # every test starts `fedspine node` processes
REPO = Path(__file__).resolve().parents[2]


def node_toml(tmp_path: Path, *, url: str = "mqtt://127.0.0.1:1", password: str = "x", **node: str) -> Path:
    settings = {"id": "node-a", "model_path": str(cached_model_folder("bert")),
                "data_path": str(write_csv(tmp_path / "train.csv", sentiment_rows(40))),
                "state_dir": str(tmp_path / "state"), **node}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path = tmp_path / "node.toml"
    path.write_text(f'[broker]\nurl = "{url}"\nusername = "node-a"\npassword = "{password}"\n\n[node]\n{body}\n')
    return path


def run_node(config: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "shared.cli", "--log-format", "json", "node", "--config",
                           str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def last_line(p: subprocess.CompletedProcess) -> str:
    """The message of the node's last line, which says why it stopped: like every line of a service that logs JSON
    (``jq`` on its log and the README's ``select(.level == "error")`` must not stop at a plain-text line), a JSON
    object at level error."""
    lines = p.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: not one plain-text line
    last = records[-1]
    assert last["event"] == "start_up_failed" and last["level"] == "error" and last["exit_status"] == p.returncode
    return last["error"]


def test_missing_data_file_is_a_configuration_error(tmp_path):
    p = run_node(node_toml(tmp_path, data_path=str(tmp_path / "nope.csv")))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last_line(p) == f"fedspine node: configuration error: [node] data_path '{tmp_path / 'nope.csv'}' " \
                           "does not exist"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_a_configuration_error(tmp_path):
    p = run_node(node_toml(tmp_path, device="cuda"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last_line(p).startswith("fedspine node: configuration error: [node] device 'cuda': CUDA is not available")


def test_data_without_a_label_column_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,lbl\nthe day was good,1\nthe food was bad,0\n")
    p = run_node(node_toml(tmp_path, data_path=str(bad)))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last_line(p).startswith(f"fedspine node: data error: {bad}: no label column")


def test_broker_refusing_the_node_exits_1_with_one_line(tmp_path, mosquitto_broker: LocalMosquitto):
    p = run_node(node_toml(tmp_path, url=mosquitto_broker.url(), password="wrong"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    line = last_line(p)
    assert line.startswith(f"fedspine node: broker {mosquitto_broker.url()} refused 'node-a': Not authorized; ")
    assert "password_file" in line  # what to check


@pytest.mark.parametrize("damage", ["labels", "garbage"])
def test_resume_state_that_no_longer_fits_is_discarded_once(tmp_path, damage):
    """Resume state from other data (other labels) or a damaged file: the node starts from the base model and
    says so, instead of failing at every restart."""
    from edge_node.agent import NodeAgent
    from edge_node.config import NodeConfig

    cfg = NodeConfig.load(node_toml(tmp_path))
    agent = NodeAgent(cfg)
    agent.trainer.run_round(target_sparsity=0.0, rank=4, local_steps=2, global_update=None)
    agent._save_resume()
    (tmp_path / "state" / "run_id").write_text("run-1")
    state = tmp_path / "state" / "trainer"
    if damage == "labels":
        meta = json.loads((state / "state.json").read_text())
        (state / "state.json").write_text(json.dumps({**meta, "labels": ["neg", "neutral", "pos"]}))
    else:
        (state / "state.safetensors").write_bytes(b"not safetensors")
    import structlog

    with structlog.testing.capture_logs() as lines:
        again = NodeAgent(cfg)
        assert again._run == "run-1"  # resume state of run-1, until it turns out not to fit
        trainer = again.trainer
    assert trainer.sparsity == 0.0 and trainer.rounds == 0 and not state.exists() and again._run is None
    discarded = [e for e in lines if e["event"] == "resume_state_discarded"]
    assert len(discarded) == 1 and ("labels" in discarded[0]["error"]) == (damage == "labels")
