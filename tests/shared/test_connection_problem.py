"""A service that cannot reach its broker at start-up says why (paho keeps the cause to itself): nothing listening,
a certificate its ca_file does not verify, a plain client on a TLS port; quick, without a broker."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_config.kit import make_lab_ca
from shared.config import BrokerConfig
from shared.transport import MqttTransport, TransportError, connection_problem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory) -> Iterator[tuple[int, Path, Path]]:
    """A TLS listener with a lab CA's certificate for 127.0.0.1 (it completes handshakes and closes, speaking no
    MQTT); yields (port, that CA, another lab CA)."""
    root = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_lab_ca(root / "right")
    other, _, _ = make_lab_ca(root / "other")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], ca, other
    stop.set()
    thread.join(2)
    server.close()


def test_nothing_listening_is_named_with_what_to_check() -> None:
    port = _free_port()
    t = MqttTransport(BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), "probe-refused")
    with pytest.raises(TransportError) as err:
        t.start(timeout_s=1)
    assert f"no connection to mqtt://127.0.0.1:{port} within 1 s: nothing listens on 127.0.0.1:{port}" \
           in str(err.value) and "broker started" in str(err.value)


def test_a_certificate_the_ca_file_does_not_verify_is_named_not_reported_as_no_connection(tls_listener) -> None:
    """The kit's CA regenerated, or a ca.crt from another kit: the broker logs `unknown ca`, the node must say it."""
    port, _, other = tls_listener
    t = MqttTransport(BrokerConfig(url=f"mqtts://127.0.0.1:{port}", ca_file=str(other)), "probe-ca")
    with pytest.raises(TransportError) as err:
        t.start(timeout_s=1)
    assert "the broker's TLS certificate does not verify" in str(err.value) and str(other) in str(err.value)


def test_the_right_ca_verifies_and_a_plain_client_on_a_tls_port_is_told(tls_listener) -> None:
    port, ca, _ = tls_listener
    assert connection_problem("127.0.0.1", port, True, str(ca)) == ""
    assert "needs mqtts://" in connection_problem("127.0.0.1", port, False, None)
    assert "no TLS handshake" in connection_problem("127.0.0.1", _plain_listener_port(), True, str(ca))


def _plain_listener_port() -> int:
    """A listener that accepts and closes at once (a plain-MQTT port, to a TLS client)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize("content", [None, "not a certificate\n"], ids=["missing", "not-pem"])
def test_a_ca_file_that_cannot_be_read_is_a_configuration_error_naming_it(tmp_path, content) -> None:
    """A kit folder copied elsewhere (its paths are absolute) left ca_file pointing nowhere: paho raised a bare
    FileNotFoundError naming no file, a traceback and exit 1 that systemd restarts forever."""
    from shared.config import ConfigError

    ca = tmp_path / "ca.crt"
    if content is not None:
        ca.write_text(content)
    with pytest.raises(ConfigError, match=rf"\[broker\] cannot read ca_file {ca}"):
        MqttTransport(BrokerConfig(url="mqtts://127.0.0.1:8883", ca_file=str(ca)), "probe-ca-file")
