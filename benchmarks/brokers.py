"""Throw-away mosquitto brokers for benchmarks: anonymous, loopback only, limits raised for large fleets."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from shared.embedded_broker import free_port


@contextlib.contextmanager
def mosquitto(workdir: Path, max_packet_size: int = 256 * 1024 * 1024):
    """Yield (host, port) of a fresh mosquitto; never the machine's own broker on 1883."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false", f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
        f"max_packet_size {max_packet_size}", "max_queued_messages 100000", "max_queued_bytes 0",
        "max_inflight_messages 20", "log_dest stderr", "log_type error", "log_type warning", "user root", "",
    ]))
    log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text()[-1000:]}")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
