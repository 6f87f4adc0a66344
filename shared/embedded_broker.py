"""A pure-Python MQTT 3.1.1 broker (amqtt) in a background thread, for the one-command local demo only.

Production and the tests use mosquitto with ``broker_config/``.  The embedded broker listens on loopback
only and accepts anonymous clients: it is for a fleet simulated on one machine, never for a network.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _SnapshotDict(dict):
    """amqtt 0.12.1's subscription table, iterated over a copy.  The broker loops over it with awaits inside (each
    new session is sent the retained messages of every subscription), so clients subscribing meanwhile raise
    "dictionary changed size during iteration" and the new session dies before its message loop starts: seen
    with nine nodes connecting at once."""

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):  # type: ignore[override]
        return list(dict.items(self))


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.url`` -- an amqtt broker on 127.0.0.1 in its own event loop."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"embedded broker did not start on {self.url} within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"embedded broker failed to start on {self.url}: {self._error}") from self._error
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def _start() -> None:
            self._broker = Broker(config)
            self._broker._subscriptions = _SnapshotDict()
            await self._broker.start()

        try:
            self._loop.run_until_complete(_start())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
