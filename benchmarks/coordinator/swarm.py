"""A swarm of lightweight fleet nodes: real MQTT clients (one connection and client id each) that answer
every round configuration with a small synthetic LoRA update, no training.

Many paho clients share one thread per process through a selector, so thousands of nodes fit on two cores.
Run as ``python -m benchmarks.coordinator.swarm --host H --port P --root R --first 0 --count 1000``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import selectors
import signal
import threading
import time
import zlib

import paho.mqtt.client as mqtt
import torch

from shared.messages import (
    Chunk,
    Command,
    ExportReport,
    NodeStatus,
    ProtocolError,
    RoundConfig,
    RoundReport,
    decode,
    encode,
)
from shared.topics import Topics
from shared.updates import LoraUpdate, ModuleUpdate

MODULES = {"layer.0.query": (64, 64), "layer.0.ffn": (128, 64)}


def synthetic_update(rank: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    mods = {
        name: ModuleUpdate(A=torch.randn(rank, d_in, generator=g) * 0.01, B=torch.randn(d_out, rank, generator=g) * 0.01,
                           rows=torch.arange(d_out), cols=torch.arange(d_in), shape=(d_out, d_in), scale=2.0)
        for name, (d_out, d_in) in MODULES.items()
    }
    return LoraUpdate(mods, {"classifier.weight": torch.randn(3, 64, generator=g)}).to_bytes()


def update_seed(node_id: str, rnd: int) -> int:
    """The seed of a node's synthetic update in a round: stable across processes (tests replay the updates)."""
    return zlib.crc32(f"{node_id}:{rnd}".encode()) & 0xFFFF


class LiteNode:
    def __init__(self, node_id: str, topics: Topics, host: str, port: int, auth: tuple[str, str] | None = None,
                 qos: int = 1) -> None:
        self.node_id, self.topics, self.answered, self.qos = node_id, topics, 0, qos
        self.final: tuple[str, int] | None = None  # (run, round) of the last final sync it answered
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lite-{node_id}",
                                  protocol=mqtt.MQTTv311)
        if auth:
            self.client.username_pw_set(*auth)
        off = NodeStatus(node_id=node_id, state="offline", ts=time.time())
        self.client.will_set(topics.node(node_id, "status"), encode(off), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=120)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(self.topics.node(self.node_id, "config"), self.qos), (self.topics.broadcast_command, 0)])
        st = NodeStatus(node_id=self.node_id, state="online", ts=time.time(), device_type="lite", memory_mb=1024)
        client.publish(self.topics.node(self.node_id, "status"), encode(st), qos=1, retain=True)

    def _on_message(self, client, userdata, msg) -> None:
        try:
            cfg = decode(msg.payload, (RoundConfig, Command))
        except ProtocolError:
            return
        if isinstance(cfg, Command):
            # export: a lite node has no model to write; it answers at once, as a real node would (edge_node/agent.py):
            # "ok" if it took part in the run's final sync (it holds the final aggregate), else "skipped"
            if self.final is not None and self.final[0] == cfg.run_id and self.final[1] > cfg.round:
                rep = ExportReport(run_id=cfg.run_id, node_id=self.node_id, status="ok")
            else:
                rep = ExportReport(run_id=cfg.run_id, node_id=self.node_id, status="skipped",
                                   error=f"no final model of run {cfg.run_id} on this node")
            client.publish(self.topics.node(self.node_id, "report"), encode(rep), qos=1)
            return
        if cfg.local_steps == 0:
            self.final = (cfg.run_id, cfg.round)
        data = synthetic_update(cfg.rank, update_seed(self.node_id, cfg.round))
        chunk = Chunk(transfer_id=cfg.upload_transfer_id, sender=self.node_id, index=0, count=1,
                      total_size=len(data), digest=hashlib.sha256(data).hexdigest(), data=data)
        client.publish(self.topics.node(self.node_id, "upload"), encode(chunk), qos=1)
        rep = RoundReport(run_id=cfg.run_id, round=cfg.round, node_id=self.node_id, status="ok",
                          transfer_id=cfg.upload_transfer_id, upload_bytes=len(data), loss_start=1.0,
                          loss_end=0.9, samples=32, compute_s=0.01, sparsity=cfg.target_sparsity, rank=cfg.rank)
        client.publish(self.topics.node(self.node_id, "report"), encode(rep), qos=1)
        self.answered += 1


def run(host: str, port: int, root: str, first: int, count: int, duration_s: float,
        stop: threading.Event | None = None, auth: tuple[str, str] | None = None, qos: int = 1,
        connect_rate: float = 0.0) -> None:
    """Serve ``count`` nodes lite-<first>... until ``duration_s`` passed, SIGTERM (main thread) or ``stop`` is set.

    ``connect_rate`` (> 0) paces the first connects (per second): a clustered engine writes a replicated session
    record per connect and refuses sessions beyond what it can store.  A node whose connection is refused or lost
    connects again (every 5 s), as a real node's transport does."""
    topics = Topics(root)
    sel = selectors.DefaultSelector()
    nodes: list[LiteNode] = []
    socks: dict[LiteNode, int | None] = {}
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch(n: LiteNode) -> None:
        """Keep the selector on the node's current socket, by fd number: paho closes a refused or lost socket
        itself, and the kernel hands its number to the next socket opened (another node's, possibly)."""
        old, sock = socks.get(n), n.client.socket()
        fd = sock.fileno() if sock is not None else None
        if old == fd:
            return
        if old is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(old)
        if fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(fd)  # a closed socket's stale entry under the same number
            sel.register(fd, selectors.EVENT_READ, n)
        socks[n] = fd

    def serve(timeout: float) -> None:
        for n in nodes:
            if n.client.want_write():
                n.client.loop_write()
        for key, _ in sel.select(timeout=timeout):
            key.data.client.loop_read()
            watch(key.data)

    t0 = time.monotonic()
    for j, i in enumerate(range(first, first + count)):
        try:
            n = LiteNode(f"lite-{i:05d}", topics, host, port, auth, qos)
        except OSError:
            continue
        nodes.append(n)
        watch(n)
        if connect_rate > 0:
            while time.monotonic() - t0 < (j + 1) / connect_rate:
                serve(0.005)
    end, last_misc, retried = time.monotonic() + duration_s, 0.0, {}
    while not stop.is_set() and time.monotonic() < end:
        serve(0.05)
        now = time.monotonic()
        if now - last_misc > 1.0:
            last_misc = now
            for n in nodes:
                n.client.loop_misc()
                # closed (refused or lost; paho drops the socket), not merely waiting for its CONNACK
                if n.client.socket() is None and now - retried.get(n, 0.0) > 5.0:
                    retried[n] = now
                    with contextlib.suppress(OSError, ValueError):
                        n.client.reconnect()
                    watch(n)
    for n in nodes:
        n.client.disconnect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--duration-s", type=float, default=3600)
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1), help="QoS of the config subscription")
    ap.add_argument("--username", help="MQTT user (password from $SWARM_PASSWORD)")
    ap.add_argument("--connect-rate", type=float, default=0.0, help="first connects per second (0: at once)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    auth = (a.username, os.environ.get("SWARM_PASSWORD", "")) if a.username else None
    run(a.host, a.port, a.root, a.first, a.count, a.duration_s, auth=auth, qos=a.qos, connect_rate=a.connect_rate)


if __name__ == "__main__":
    main()
