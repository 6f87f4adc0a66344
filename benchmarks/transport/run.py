"""Chunked-transfer throughput against raw mosquitto throughput, in one run on one local broker.

    python -m benchmarks.transport.run [--sizes 1,16,64] [--repeats 3] [--out results/transport.json]

Raw: one QoS 1 message of the whole payload, paho publisher -> mosquitto -> paho subscriber (the broker's
max_packet_size raised to fit).  Chunked: ``MqttTransport.send_transfer`` (sha256, 256 KiB chunks, flow
control) -> mosquitto -> subscriber decoding every chunk and feeding a ``Reassembler`` that verifies the
digest.  A third column, raw stream, publishes bare chunk-sized QoS 1 messages (no envelope, digest or
reassembly): the floor any chunking protocol could reach.  All clock from the publish call until the receiver holds the verified payload; the median of
``--repeats`` runs is reported.  Results go to the JSON file and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker_config.local import LocalMosquitto
from shared.chunking import Reassembler
from shared.logs import configure_logging
from shared.messages import Chunk, decode
from shared.transport import MqttTransport

MB = 1024 * 1024


def _raw_client(broker: LocalMosquitto, user: str, cid: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, broker.users[user])
    c.max_inflight_messages_set(20)
    return c


def _connect(c: mqtt.Client, broker: LocalMosquitto) -> None:
    connected = queue.Queue()
    c.on_connect = lambda *a: connected.put(a[3])
    c.connect(broker.host, broker.port, keepalive=60)
    c.loop_start()
    rc = connected.get(timeout=10)
    if rc.is_failure:
        raise RuntimeError(f"raw client refused: {rc}")


def measure_raw(broker: LocalMosquitto, payload: bytes, repeats: int) -> list[float]:
    topic = f"{broker.root}/bench/raw"
    got: queue.Queue[float] = queue.Queue()
    sub = _raw_client(broker, "coordinator", "bench-raw-sub")
    sub.on_message = lambda _c, _u, msg: got.put(time.perf_counter()) if len(msg.payload) == len(payload) else None
    subscribed = queue.Queue()
    sub.on_subscribe = lambda *a: subscribed.put(True)
    _connect(sub, broker)
    sub.subscribe(topic, qos=1)
    subscribed.get(timeout=10)
    pub = _raw_client(broker, "coordinator", "bench-raw-pub")
    _connect(pub, broker)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            pub.publish(topic, payload, qos=1)
            t1 = got.get(timeout=300)
            times.append(t1 - t0)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return times


def measure_raw_stream(broker: LocalMosquitto, payload: bytes, repeats: int, chunk_size: int) -> list[float]:
    """The floor of any chunking protocol: bare chunk-sized QoS 1 messages, no envelope, hash or reassembly."""
    topic = f"{broker.root}/bench/stream"
    got: queue.Queue[float] = queue.Queue()
    state = {"bytes": 0}

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        state["bytes"] += len(msg.payload)
        if state["bytes"] >= len(payload):
            state["bytes"] = 0
            got.put(time.perf_counter())

    sub = _raw_client(broker, "coordinator", "bench-stream-sub")
    sub.on_message = on_message
    subscribed = queue.Queue()
    sub.on_subscribe = lambda *a: subscribed.put(True)
    _connect(sub, broker)
    sub.subscribe(topic, qos=1)
    subscribed.get(timeout=10)
    pub = _raw_client(broker, "coordinator", "bench-stream-pub")
    _connect(pub, broker)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for off in range(0, len(payload), chunk_size):
                pub.publish(topic, payload[off:off + chunk_size], qos=1)
            times.append(got.get(timeout=300) - t0)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return times


def measure_chunked(broker: LocalMosquitto, payload: bytes, repeats: int, chunk_size: int) -> list[float]:
    done: queue.Queue[tuple[float, int]] = queue.Queue()
    reasm = Reassembler(max_bytes=len(payload) + 1, timeout_s=600)

    def on_chunk(topic: str, data: bytes) -> None:
        chunk = decode(data, Chunk)
        whole = reasm.feed(chunk, topic.split("/")[-2])
        if whole is not None:
            done.put((time.perf_counter(), len(whole)))

    recv = MqttTransport(broker.broker_config("coordinator"), "bench-chunk-recv")
    topic = recv.topics.node("node-a", "upload")
    recv.subscribe(topic, on_chunk)
    recv.start()
    send = MqttTransport(broker.broker_config("node-a", chunk_size=chunk_size), "bench-chunk-send")
    send.start()
    time.sleep(0.2)  # let the subscription settle
    times = []
    try:
        for i in range(repeats):
            tid = f"bench.{len(payload)}.{i}"
            reasm.expect(tid, "node-a")
            t0 = time.perf_counter()
            send.send_transfer(topic, payload, tid, "node-a")
            t1, n = done.get(timeout=300)
            if n != len(payload):
                raise RuntimeError(f"reassembled {n} bytes, sent {len(payload)}")
            times.append(t1 - t0)
    finally:
        send.stop()
        recv.stop()
    return times


def run(sizes_mb: list[int], repeats: int, chunk_size: int) -> dict[str, Any]:
    rows = []
    biggest = max(sizes_mb) * MB
    with LocalMosquitto(max_packet_size=biggest + MB, log_types=["error", "warning"]) as broker:
        for size in sizes_mb:
            payload = os.urandom(size * MB)
            raw = measure_raw(broker, payload, repeats)
            stream = measure_raw_stream(broker, payload, repeats, chunk_size)
            chunked = measure_chunked(broker, payload, repeats, chunk_size)
            raw_s, stream_s, chunk_s = (statistics.median(x) for x in (raw, stream, chunked))
            rows.append({
                "size_mb": size, "raw_s": raw, "raw_stream_s": stream, "chunked_s": chunked,
                "raw_median_s": raw_s, "raw_stream_median_s": stream_s, "chunked_median_s": chunk_s,
                "raw_mb_s": size / raw_s, "raw_stream_mb_s": size / stream_s, "chunked_mb_s": size / chunk_s,
                "ratio": raw_s / chunk_s, "ratio_vs_stream": stream_s / chunk_s, "chunks": -(-size * MB // chunk_size),
            })
    return {"benchmark": "transport", "chunk_size": chunk_size, "repeats": repeats,
            "mosquitto": "local, 127.0.0.1, project config (auth + ACL)", "python": platform.python_version(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [f"Transport throughput (median of {result['repeats']}, chunk {result['chunk_size'] // 1024} KiB)", "",
             "| size (MB) | raw 1 msg (MB/s) | raw stream (MB/s) | chunked (MB/s) | chunked / raw | "
             "chunked / raw stream | chunks |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['size_mb']} | {r['raw_mb_s']:.1f} | {r['raw_stream_mb_s']:.1f} | {r['chunked_mb_s']:.1f} | "
                     f"{100 * r['ratio']:.0f} % | {100 * r['ratio_vs_stream']:.0f} % | {r['chunks']} |")
    lines += ["", "raw 1 msg: the whole payload as one QoS 1 message (the bar's baseline); raw stream: bare "
              "chunk-sized QoS 1 messages without envelope, digest or reassembly (the floor of any chunking)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,16,64", help="payload sizes in MB, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=256 * 1024)
    p.add_argument("--out", default="results/transport.json")
    args = p.parse_args(argv)
    configure_logging(json=False, level="WARNING")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    result = run(sizes, args.repeats, args.chunk_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    out.with_suffix(".md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
