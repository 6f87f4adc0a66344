"""Shared pytest fixtures: a real mosquitto with the project's config (auth, ACL, TLS) and an in-memory bus."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `tests.broker`, `benchmarks` and `broker_config` import from the checkout
    sys.path.insert(0, _ROOT)

from shared.transport import MemoryBus  # noqa: E402
from tests.broker import LocalMosquitto, TransportFactory, require_mosquitto  # noqa: E402


@pytest.fixture(scope="session")
def mosquitto_broker(request: pytest.FixtureRequest) -> Iterator[LocalMosquitto]:
    """A mosquitto on a free 127.0.0.1 port (plus a TLS port with a lab CA), users coordinator, node-a,
    node-b and monitor (``.users`` has their passwords); ``broker_config(user)`` builds a BrokerConfig;
    ``add_user(name, pw)`` adds a user and makes the broker reload.  Its log is printed if a test failed."""
    try:
        require_mosquitto()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    broker = LocalMosquitto(tls=True)
    failed_before = request.session.testsfailed
    try:
        broker.start()
    except RuntimeError as exc:
        broker.close()
        pytest.fail(f"could not start mosquitto: {exc}", pytrace=False)
    yield broker
    if request.session.testsfailed > failed_before:
        sys.stderr.write(f"\n--- mosquitto log ({broker.log_file}) ---\n{broker.log()[-20000:]}\n")
    broker.close()


@pytest.fixture
def mqtt_transport(mosquitto_broker: LocalMosquitto) -> Iterator[TransportFactory]:
    """``mqtt_transport("node-a", subscriptions={filter: handler})`` -> a started MqttTransport, stopped after."""
    factory = TransportFactory(mosquitto_broker)
    yield factory
    factory.close()


@pytest.fixture
def memory_bus() -> MemoryBus:
    return MemoryBus()
