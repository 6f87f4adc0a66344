"""The broker admin tool: rendered config and ACL, credentials via mosquitto_passwd, the CLI."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker_config.fedspine_broker import (
    BrokerToolError,
    add_user,
    main,
    remove_user,
    render_acl,
    render_config,
    users_in,
)

REPO = Path(__file__).resolve().parents[2]


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_production_defaults() -> None:
    conf = _lines(render_config())
    for line in ("per_listener_settings false", "allow_anonymous false", "persistence true",
                 "password_file /etc/mosquitto/fedspine.passwd", "acl_file /etc/mosquitto/fedspine.acl",
                 "max_packet_size 1048576", "listener 1883 127.0.0.1", "user mosquitto"):
        assert line in conf
    assert not any(ln.startswith("message_size_limit") for ln in conf)
    assert not any(ln.startswith("certfile") for ln in conf)  # no TLS without certificate paths


def test_tls_listener_when_certificates_are_set() -> None:
    conf = _lines(render_config(tls_cafile="/etc/ssl/ca.crt", tls_certfile="/etc/ssl/b.crt",
                                tls_keyfile="/etc/ssl/b.key", port=0, log_dest=["stderr"]))
    assert "listener 8883 0.0.0.0" in conf and "cafile /etc/ssl/ca.crt" in conf and "keyfile /etc/ssl/b.key" in conf
    assert not any(ln.startswith("listener 1883") for ln in conf)  # port 0 disables the plain listener
    assert "log_dest stderr" in conf


def test_committed_example_config_matches_the_template() -> None:
    example = (REPO / "broker_config" / "mosquitto.conf").read_text()
    assert example == render_config(tls_cafile="/etc/mosquitto/certs/ca.crt",
                                    tls_certfile="/etc/mosquitto/certs/broker.crt",
                                    tls_keyfile="/etc/mosquitto/certs/broker.key")


def test_acl_patterns_pin_nodes_to_their_subtree() -> None:
    acl = _lines(render_acl("fleet/v1", ["coordinator", "coord2"], ["grafana"]))
    assert acl.count("topic readwrite fleet/v1/#") == 2
    writes = {ln.split()[-1] for ln in acl if ln.startswith("pattern write")}
    reads = {ln.split()[-1] for ln in acl if ln.startswith("pattern read")}
    for tree in ("fleet/v1", "fleet/v1/region/+"):  # the root's nodes, and those under a regional aggregator
        assert {w for w in writes if w.startswith(f"{tree}/node/")} == {f"{tree}/node/%u/{k}" for k in
                                                                         ("status", "telemetry", "telemetry/round",
                                                                          "report", "upload", "missing")}
        assert {x for x in reads if x.startswith(f"{tree}/") and x.count("/") - tree.count("/") <= 4} >= {
            f"{tree}/node/%u/config", f"{tree}/node/%u/download", f"{tree}/node/%u/resend",
            f"{tree}/node/%u/status", f"{tree}/broadcast/#", f"{tree}/coordinator/status"}
    assert len(writes) == 12 and len(reads) == 12
    i = acl.index("user grafana")
    assert all(ln.startswith("topic read ") for ln in acl[i + 1:i + 5])
    assert not any(ln.startswith("user ") and ln != "user coordinator" and ln != "user coord2"
                   and ln != "user grafana" for ln in acl)  # no region users unless asked for


def test_acl_region_user_is_coordinator_of_its_subtree_and_participant_upward() -> None:
    acl = _lines(render_acl("fleet/v1", ["coordinator"], [], ["east"]))
    i = acl.index("user east")
    end = next((j for j in range(i + 1, len(acl)) if not acl[j].startswith("topic ")), len(acl))
    assert acl[i + 1:end] == [
        "topic deny fleet/v1/node/east/#", "topic deny fleet/v1/region/+/node/east/#",
        *(f"topic write fleet/v1/region/east/{k}" for k in ("status", "report", "upload", "missing")),
        *(f"topic read fleet/v1/region/east/{k}" for k in ("config", "download", "resend")),
        "topic readwrite fleet/v1/region/east/node/#", "topic readwrite fleet/v1/region/east/broadcast/#",
        "topic readwrite fleet/v1/region/east/coordinator/status"]
    with pytest.raises(BrokerToolError, match="two roles"):
        render_acl("fleet/v1", ["coordinator"], [], ["coordinator"])


@pytest.mark.parametrize("bad", ["a/b", "#", "", "x" * 80])
def test_acl_refuses_bad_user_names(bad: str) -> None:
    with pytest.raises(BrokerToolError):
        render_acl("fedspine/v1", [bad])


def test_add_and_remove_users(tmp_path: Path) -> None:
    pw = tmp_path / "sub" / "passwd"
    add_user(pw, "node-a", "first-secret-1")
    add_user(pw, "node-b", "second-secret-2")
    add_user(pw, "node-a", "third-secret-3")  # update, not duplicate
    assert users_in(pw) == ["node-a", "node-b"]
    text = pw.read_text()
    assert "secret" not in text and text.count("$7$") == 2  # hashed: no plain password in the file
    assert stat.S_IMODE(pw.stat().st_mode) == 0o640
    remove_user(pw, "node-a")
    assert users_in(pw) == ["node-b"]
    with pytest.raises(BrokerToolError):
        add_user(pw, "bad/name", "x")
    with pytest.raises(BrokerToolError):
        remove_user(tmp_path / "missing", "node-b")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw, secret = tmp_path / "passwd", tmp_path / "node-a.secret"
    assert main(["add-node", "node-a", "--password-file", str(pw), "--secret-out", str(secret)]) == 0
    assert len(secret.read_text().strip()) >= 32 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert main(["add-node", "node-b", "--password-file", str(pw)]) == 0
    generated = capsys.readouterr().out.strip()
    assert len(generated) >= 32
    assert main(["add-node", "coordinator", "--password-file", str(pw)]) == 2  # reserved name
    assert "--allow-reserved" in capsys.readouterr().err  # the message names the option that solves it
    assert users_in(pw) == ["node-a", "node-b"]
    # several brokers' PIDs ($(pidof mosquitto)): refused before anything is written
    assert main(["add-node", "node-c", "--password-file", str(pw), "--password", "x", "--sighup", "12 34"]) == 2
    assert "several PIDs" in capsys.readouterr().err and users_in(pw) == ["node-a", "node-b"]
    # the user is written but the signal fails: exit 3 and a message that says the user was added
    dead = 2**22 + 7  # above the default pid_max: no such process
    assert main(["add-node", "node-c", "--password-file", str(pw), "--password", "x", "--sighup", str(dead)]) == 3
    assert "'node-c' was written" in capsys.readouterr().err and users_in(pw) == ["node-a", "node-b", "node-c"]
    assert stat.S_IMODE(pw.stat().st_mode) == 0o640
    assert main(["add-node", "coordinator", "--allow-reserved", "--password-file", str(pw), "--password", "c"]) == 0
    assert main(["remove-node", "coordinator", "--password-file", str(pw)]) == 0
    assert main(["remove-node", "node-c", "--password-file", str(pw)]) == 0
    assert main(["render-acl", "--monitor", "monitor", "--out", str(tmp_path / "acl")]) == 0
    assert "user monitor" in (tmp_path / "acl").read_text()
    assert main(["render-config", "--set", "port=1884", "--set", 'log_dest=["stderr"]',
                 "--out", str(tmp_path / "m.conf")]) == 0
    assert "listener 1884 127.0.0.1" in (tmp_path / "m.conf").read_text()
    assert main(["render-config", "--set", "oops"]) == 2
    assert main(["remove-node", "node-a", "--password-file", str(pw)]) == 0
    assert users_in(pw) == ["node-b"]


def test_ansible_style_values_strings_and_zero_port() -> None:
    conf = _lines(render_config(log_dest="file /var/log/mosquitto/mosquitto.log", log_types="all", port="0",
                                max_packet_size="2097152"))
    assert "log_dest file /var/log/mosquitto/mosquitto.log" in conf and "log_type all" in conf
    assert not any(ln.startswith("listener") for ln in conf) and "max_packet_size 2097152" in conf


def test_a_test_broker_never_gets_one_port_for_both_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls of free_port may return the same port (it was free both times); mosquitto then failed with "Address
    already in use" on its second listener and every test of the module errored at its fixture."""
    import shutil

    from broker_config import local

    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto binary not found")
    ports = iter([20001, 20001, 20001, 20002])
    monkeypatch.setattr(local, "free_port", lambda host="127.0.0.1": next(ports))
    broker = local.LocalMosquitto(tls=True)
    assert (broker.port, broker.tls_port) == (20001, 20002)
