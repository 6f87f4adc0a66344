"""Broker administration: render mosquitto.conf and the ACL from the shared templates, manage node credentials.

CLI (``python -m broker_config.fedspine_broker ...``)::

    add-node NAME [--password-file F] [--password P] [--secret-out FILE] [--allow-reserved] [--run-user U]
             [--sighup PID]
    remove-node NAME [--password-file F] [--sighup PID]
    render-acl [--topic-root R] [--coordinator U ...] [--monitor U ...] [--region R ...] [--out FILE]
    render-config [--set KEY=VALUE ...] [--out FILE]
    nats-passwd NAME [--passwords F] [--password P] [--secret-out FILE] [--cost N]
    render-nats-auth [--passwords F] [--topic-root R] [--coordinator U ...] [--monitor U ...] [--region R ...]
                     [--out FILE]
    render-nats --server-name NAME --route HOST:PORT ... [--set KEY=VALUE ...] [--out FILE]

Without ``--password`` a random password is generated and printed once (or written, mode 0600, to
``--secret-out`` for the node's ``password_file``).  Mosquitto re-reads password and ACL files on SIGHUP.
Exit status: 0 done; 2 nothing changed (a refused name, a mosquitto_passwd error, a bad option); 3 the file was
changed but the ``--sighup`` signal failed (reload mosquitto yourself).  ``fedspine kit`` writes a whole fleet's
files at once (broker_config/kit.py).
The ``nats-*``/``render-nats*`` commands do the same for a NATS cluster (broker_config/nats.py): bcrypt
hashes in a ``user:hash`` file, the users-and-permissions file every member includes (reloaded with
``nats-server --signal reload``), and one member's configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2

from shared.topics import DEFAULT_ROOT, TopicError, Topics, check_node_id

TEMPLATE_DIR = Path(__file__).resolve().parent
DEFAULT_PASSWORD_FILE = "/etc/mosquitto/fedspine.passwd"
DEFAULT_NATS_PASSWORDS = "/etc/nats/passwd"
DEFAULT_COORDINATORS = ("coordinator",)
RESERVED_USERS = ("coordinator", "monitor")


class BrokerToolError(RuntimeError):
    """A failed broker administration step (bad name, mosquitto_passwd error)."""


class ReloadFailed(BrokerToolError):
    """The change was written but the running broker could not be told (exit status 3)."""


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def render_config(**variables: Any) -> str:
    """Render ``mosquitto.conf.j2``; unset variables take the template's documented defaults."""
    return _env().get_template("mosquitto.conf.j2").render(**variables)


def render_acl(topic_root: str = DEFAULT_ROOT, coordinator_users: Iterable[str] = DEFAULT_COORDINATORS,
               monitor_users: Iterable[str] = (), region_users: Iterable[str] = ()) -> str:
    """Render ``acl.j2`` for one topic root, the coordinator users, the read-only monitor users and the regional
    aggregators' users (user name == region id)."""
    Topics(topic_root)  # validates the root
    coordinators, monitors, regions = list(coordinator_users), list(monitor_users), list(region_users)
    for u in coordinators + monitors + regions:
        _check_username(u)
    if not coordinators:
        raise BrokerToolError("at least one coordinator user is needed")
    users = coordinators + monitors + regions
    if len(set(users)) != len(users):
        raise BrokerToolError(f"a user has two roles: {sorted(u for u in set(users) if users.count(u) > 1)}")
    return _env().get_template("acl.j2").render(topic_root=topic_root, coordinator_users=coordinators,
                                                monitor_users=monitors, region_users=regions)


def _check_username(name: str) -> str:
    try:
        return check_node_id(name)
    except TopicError as exc:
        raise BrokerToolError(f"invalid user name {name!r}: {exc}") from None


def _passwd_bin() -> str:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        raise BrokerToolError("mosquitto_passwd not found: install the mosquitto package")
    return exe


def add_user(password_file: str | Path, username: str, password: str) -> None:
    """Add or update ``username`` in ``password_file`` (created, mode 0640, if missing) via mosquitto_passwd -b."""
    _check_username(username)
    if not password or any(c in password for c in "\n\r\0"):
        raise BrokerToolError("password must be non-empty and on one line")
    path = Path(password_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [_passwd_bin(), "-b", str(path), username, password]
    if not path.exists():
        args.insert(1, "-c")
    res = subprocess.run(args, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BrokerToolError(f"mosquitto_passwd failed for {username!r}: {(res.stderr or res.stdout).strip()}")
    os.chmod(path, 0o640)


def remove_user(password_file: str | Path, username: str) -> None:
    """Remove ``username`` from ``password_file`` (an error if the file does not exist)."""
    _check_username(username)
    path = Path(password_file)
    if not path.exists():
        raise BrokerToolError(f"password file {path} does not exist")
    res = subprocess.run([_passwd_bin(), "-D", str(path), username], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BrokerToolError(f"mosquitto_passwd -D failed for {username!r}: {(res.stderr or res.stdout).strip()}")


def users_in(password_file: str | Path) -> list[str]:
    """User names present in a mosquitto password file."""
    path = Path(password_file)
    if not path.exists():
        return []
    return [line.split(":", 1)[0] for line in path.read_text().splitlines() if ":" in line]


def _write(text: str, out: str | None, mode: int = 0o644) -> None:
    if out is None or out == "-":
        sys.stdout.write(text)
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def readable_by(path: str | Path, run_user: str, mode: int = 0o640) -> None:
    """Mode ``mode`` and, when run as root, the group of ``run_user``: mosquitto started as root drops to its
    ``run_user`` (mosquitto.conf.j2 ``user``) and must still read the password, ACL and key files."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        import pwd

        try:
            gid = pwd.getpwnam(run_user).pw_gid
        except KeyError:
            return
        os.chown(path, 0, gid)


def _one_pid(raw: str | None) -> int | None:
    """``--sighup`` takes one PID; ``$(pidof mosquitto)`` with several brokers running gives several."""
    if raw is None or not raw.strip():
        return None
    parts = raw.split()
    if len(parts) > 1:
        raise BrokerToolError(f"--sighup got several PIDs ({raw.strip()}): more than one mosquitto runs; name the "
                              "broker's own PID (e.g. `systemctl show -p MainPID --value mosquitto`) and try again")
    if not parts[0].isdigit():
        raise BrokerToolError(f"--sighup expects a PID, got {raw!r}")
    return int(parts[0])


def _sighup(pid: int | None, done: str) -> None:
    """Make mosquitto re-read its files.  ``done`` says what was already written: a failed signal must not read
    as if nothing had happened."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ReloadFailed(f"{done}, but mosquitto was not told to reload: SIGHUP to PID {pid} failed ({exc}); "
                           "reload it yourself (`systemctl reload mosquitto` or `kill -HUP <pid>`)") from None


def _add_nats_commands(sub: Any) -> None:
    pw = sub.add_parser("nats-passwd", help="add (or change) a NATS user's bcrypt hash; user name == node id")
    pw.add_argument("name")
    pw.add_argument("--passwords", default=DEFAULT_NATS_PASSWORDS, help="the user:bcrypt-hash file")
    pw.add_argument("--password", help="default: a generated 32-character secret")
    pw.add_argument("--secret-out", help="write the password to this file (mode 0600) instead of printing it")
    pw.add_argument("--cost", type=int, default=11, help="bcrypt cost (every connect verifies one hash)")
    auth = sub.add_parser("render-nats-auth", help="render the NATS users and per-node permissions (nats-auth.conf)")
    auth.add_argument("--passwords", default=DEFAULT_NATS_PASSWORDS)
    auth.add_argument("--topic-root", default=DEFAULT_ROOT)
    auth.add_argument("--coordinator", action="append", help="coordinator user (repeatable)")
    auth.add_argument("--monitor", action="append", default=[], help="read-only monitor user (repeatable)")
    auth.add_argument("--region", action="append", default=[],
                      help="regional aggregator's user, user name == region id (repeatable)")
    auth.add_argument("--out")
    member = sub.add_parser("render-nats", help="render one NATS cluster member's configuration (nats.conf)")
    member.add_argument("--server-name", required=True)
    member.add_argument("--route", action="append", required=True, metavar="HOST:PORT",
                        help="every member's route address, this one included (repeatable)")
    member.add_argument("--store-dir", default="/var/lib/nats", help="JetStream storage (it adds jetstream/ below)")
    member.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="template variable of nats.conf.j2; VALUE parsed as JSON when possible")
    member.add_argument("--out")


def _run_nats_command(args: argparse.Namespace) -> None:
    from broker_config import nats

    if args.cmd == "nats-passwd":
        password = args.password or secrets.token_urlsafe(24)
        nats.set_password(args.passwords, args.name, password, args.cost)
        if args.secret_out:
            _write(password + "\n", args.secret_out, mode=0o600)
        elif not args.password:
            print(password)
    elif args.cmd == "render-nats-auth":
        hashes = nats.read_passwords(args.passwords)
        if not hashes:
            raise BrokerToolError(f"no users in {args.passwords}: add them with nats-passwd")
        coordinators = args.coordinator or list(DEFAULT_COORDINATORS)
        monitors = [u for u in args.monitor if u in hashes]
        missing = [r for r in args.region if r not in hashes]
        if missing:
            raise BrokerToolError(f"region user(s) {missing} have no password in {args.passwords}: add them with "
                                  "nats-passwd")
        _write(nats.render_nats_auth(hashes, args.topic_root, coordinators, monitors, region_users=args.region),
               args.out, mode=0o640)
    else:
        variables: dict[str, Any] = {"server_name": args.server_name, "routes": args.route, "store_dir": args.store_dir}
        for item in args.set:
            key, sep, raw = item.partition("=")
            if not sep or not key.isidentifier():
                raise BrokerToolError(f"--set expects KEY=VALUE, got {item!r}")
            variables[key] = _parse_value(raw)
        _write(nats.render_nats_config(**variables), args.out, mode=0o640)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedspine-broker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add-node", help="add (or change) a node's MQTT credentials; user name == node id")
    a.add_argument("name")
    a.add_argument("--password-file", default=DEFAULT_PASSWORD_FILE)
    a.add_argument("--password", help="default: a generated 32-character secret")
    a.add_argument("--secret-out", help="write the password to this file (mode 0600) instead of printing it")
    a.add_argument("--allow-reserved", action="store_true",
                   help="create the coordinator or monitor user (names reserved for their ACL entries)")
    a.add_argument("--run-user", default="mosquitto",
                   help="mosquitto's run_user: as root, the password file gets its group so the broker can read it")
    a.add_argument("--sighup", metavar="PID", help="make the running mosquitto reload (one PID)")
    r = sub.add_parser("remove-node", help="remove a node's credentials")
    r.add_argument("name")
    r.add_argument("--password-file", default=DEFAULT_PASSWORD_FILE)
    r.add_argument("--sighup", metavar="PID", help="make the running mosquitto reload (one PID)")
    acl = sub.add_parser("render-acl", help="render the ACL (node rules are patterns: no per-node lines)")
    acl.add_argument("--topic-root", default=DEFAULT_ROOT)
    acl.add_argument("--coordinator", action="append", help="coordinator user (repeatable)")
    acl.add_argument("--monitor", action="append", default=[], help="read-only monitor user (repeatable)")
    acl.add_argument("--region", action="append", default=[],
                     help="regional aggregator's user, user name == region id (repeatable)")
    acl.add_argument("--out")
    cfg = sub.add_parser("render-config", help="render mosquitto.conf")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="template variable; VALUE parsed as JSON when possible (e.g. '[\"stderr\"]')")
    cfg.add_argument("--out")
    _add_nats_commands(sub)
    args = p.parse_args(argv)
    try:
        if args.cmd in ("nats-passwd", "render-nats-auth", "render-nats"):
            _run_nats_command(args)
        elif args.cmd == "add-node":
            if args.name in RESERVED_USERS and not args.allow_reserved:
                raise BrokerToolError(f"{args.name!r} is reserved for the coordinator/monitor ACL entries; to create "
                                      f"the {args.name} user itself, add --allow-reserved")
            pid = _one_pid(args.sighup)  # checked before anything is written
            password = args.password or secrets.token_urlsafe(24)
            add_user(args.password_file, args.name, password)
            readable_by(args.password_file, args.run_user)
            if args.secret_out:
                _write(password + "\n", args.secret_out, mode=0o600)
            elif not args.password:
                print(password)
            _sighup(pid, f"user {args.name!r} was written to {args.password_file}")
        elif args.cmd == "remove-node":
            pid = _one_pid(args.sighup)
            remove_user(args.password_file, args.name)
            _sighup(pid, f"user {args.name!r} was removed from {args.password_file}")
        elif args.cmd == "render-acl":
            _write(render_acl(args.topic_root, args.coordinator or DEFAULT_COORDINATORS, args.monitor, args.region),
                   args.out)
        else:
            variables = {}
            for item in args.set:
                key, sep, raw = item.partition("=")
                if not sep or not key.isidentifier():
                    raise BrokerToolError(f"--set expects KEY=VALUE, got {item!r}")
                variables[key] = _parse_value(raw)
            _write(render_config(**variables), args.out)
    except ReloadFailed as exc:
        print(f"fedspine-broker: {exc}", file=sys.stderr)
        return 3
    except (BrokerToolError, TopicError, OSError, jinja2.TemplateError, RuntimeError) as exc:
        print(f"fedspine-broker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
