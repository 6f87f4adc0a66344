"""Test helpers around a real mosquitto (broker_config.local) and started MQTT transports."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from broker_config.local import DEFAULT_TEST_USERS, LocalMosquitto
from shared.transport import MqttTransport

__all__ = ["DEFAULT_TEST_USERS", "LocalMosquitto", "Inbox", "require_mosquitto", "running_broker", "TransportFactory"]


def require_mosquitto() -> None:
    """Raise (never skip) when the mosquitto binaries are missing: the tests must run against a real broker."""
    missing = [b for b in ("mosquitto", "mosquitto_passwd") if shutil.which(b) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: install mosquitto (apt-get install mosquitto "
                           "mosquitto-clients) to run the tests marked 'mosquitto'")


@contextmanager
def running_broker(tls: bool = True, **kw: Any) -> Iterator[LocalMosquitto]:
    """Start the project's test broker; on error print its log to stderr."""
    require_mosquitto()
    broker = LocalMosquitto(tls=tls, **kw)
    try:
        broker.start()
        yield broker
    except BaseException:
        sys.stderr.write(f"\n--- mosquitto log ({broker.log_file}) ---\n{broker.log()}\n")
        raise
    finally:
        broker.close()


class Inbox:
    """A thread-safe list of (topic, payload) a handler appends to, with waiting helpers."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cv:
            self.items.append((topic, payload))
            self._cv.notify_all()

    def wait_for(self, n: int, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while len(self.items) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True


class TransportFactory:
    """Creates started MqttTransports for users of a LocalMosquitto and stops them all at the end."""

    def __init__(self, broker: LocalMosquitto) -> None:
        self.broker = broker
        self._made: list[MqttTransport] = []

    def __call__(self, username: str | None, client_id: str | None = None, *, tls: bool = False,
                 subscriptions: dict[str, Callable[[str, bytes], None]] | None = None, start: bool = True,
                 **kw: Any) -> MqttTransport:
        cfg = self.broker.broker_config(username, tls=tls)
        t = MqttTransport(cfg, client_id or f"test-{username}-{len(self._made)}", **kw)
        for topic_filter, handler in (subscriptions or {}).items():
            t.subscribe(topic_filter, handler)
        self._made.append(t)
        if start:
            t.start(timeout_s=10)
        return t

    def close(self) -> None:
        for t in self._made:
            try:
                t.stop(flush_s=1.0)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self._made.clear()
