"""A real node agent process with a fake trainer, for fault injection: ``python -m tests.reliability.fake_node
--config node.toml [--send-delay S] [--kb N]``.

The production ``NodeAgent`` and ``MqttTransport`` run unchanged; only training is simulated (a LoRA update of
about ``--kb`` kB) and, with ``--send-delay``, every upload chunk is delayed (a slow uplink injected in the sends).
Each update it uploads is appended as ``round sha256`` to ``<state_dir>/sent.txt`` and kept as
``<state_dir>/sent/<sha256>.safetensors``, so tests can rebuild the global model from exactly what was sent.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
from pathlib import Path

import torch

from edge_node.agent import NodeAgent
from edge_node.config import NodeConfig
from shared.logs import configure_logging
from shared.updates import GroupScores, LoraUpdate, ModuleUpdate


class PayloadTrainer:
    """Answers a round with a deterministic update of ``kb`` kB at the assigned rank (no model)."""

    def __init__(self, node_id: str, kb: int, sent_log: Path) -> None:
        self.node_id, self.kb, self.sent_log = node_id, kb, sent_log
        self.rounds = 0
        self._resume = sent_log.parent / "sparsity.txt"  # like LocalTrainer's resume: pruning is monotone
        self.sparsity = float(self._resume.read_text()) if self._resume.exists() else 0.0

    def run_round(self, *, target_sparsity, rank, local_steps, global_update, importance=True,
                  should_stop=None):  # type: ignore[no-untyped-def]
        from edge_node.engine import RoundResult

        self.rounds += 1
        self.sparsity = max(self.sparsity, target_sparsity)
        self._resume.write_text(repr(self.sparsity))
        cols = max(4, self.kb * 1024 // (4 * 8))  # fixed input width: about kb kB at rank 8
        kept = max(1, round(8 * (1 - self.sparsity)))
        g = torch.Generator().manual_seed(hash((self.node_id, self.rounds)) % 2**31)
        m = ModuleUpdate(A=torch.randn(rank, cols, generator=g) * 0.01, B=torch.randn(kept, rank, generator=g) * 0.01,
                         rows=torch.arange(kept), cols=torch.arange(cols), shape=(8, cols), scale=16.0 / rank)
        scores = {"0.heads": GroupScores(idx=torch.arange(2), score=torch.ones(2), size=2)} if importance else {}
        u = LoraUpdate({"layer.q": m}, {"classifier.weight": torch.ones(2, 4)}, scores)
        payload = u.to_bytes()
        if local_steps > 0:
            digest = hashlib.sha256(payload).hexdigest()
            with open(self.sent_log, "a") as fh:
                fh.write(f"{self.rounds} {digest}\n")
            sent = self.sent_log.parent / "sent"
            sent.mkdir(exist_ok=True)
            (sent / f"{digest}.safetensors").write_bytes(payload)
        return RoundResult(update=u, payload=payload, loss_start=1.0, loss_end=0.9, samples=32, compute_s=0.01,
                          sparsity=self.sparsity, rank=rank, steps=local_steps, examples=64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--send-delay", type=float, default=0.0, help="seconds added before each upload chunk")
    p.add_argument("--kb", type=int, default=64)
    args = p.parse_args(argv)
    configure_logging(json=True)
    cfg = NodeConfig.load(args.config)
    state = Path(cfg.node.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    agent = NodeAgent(cfg, trainer=PayloadTrainer(cfg.node.id, args.kb, state / "sent.txt"))
    if args.send_delay > 0:
        flow = agent.transport._publish_flow

        def slow_flow(topic: str, payload: bytes) -> None:
            # Not in the network thread (resends are answered there): sleeping there would stall the whole
            # connection, reads, writes and keepalive, which no slow link does; a resend's chunks just queue.
            if topic.endswith("/upload") and threading.get_ident() != agent.transport._net_thread:
                time.sleep(args.send_delay)
            flow(topic, payload)

        agent.transport._publish_flow = slow_flow  # type: ignore[method-assign]
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
