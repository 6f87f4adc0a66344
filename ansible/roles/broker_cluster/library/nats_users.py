#!/usr/bin/python
"""Ansible module: keep a NATS user:bcrypt-hash file in step with a user -> password map, idempotently."""

from __future__ import annotations

import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: nats_users
short_description: Manage the bcrypt password hashes of the NATS users of a FedSpine fleet
description:
  - Keeps a C(user:hash) file of bcrypt hashes. A user's hash is only recomputed when the user is new or the
    password no longer verifies against the stored hash, so repeated runs change nothing.
  - Returns the hashes, which the role renders into the NATS authorization file (nats-auth.conf.j2).
  - Needs the Python C(bcrypt) package on the target (Debian C(python3-bcrypt)).
  - With O(exclusive=true), users that are in the file but not in O(users) are removed.
options:
  path:
    description: The hash file.
    type: path
    required: true
  users:
    description: Map of user name to clear-text password.
    type: dict
    required: true
  exclusive:
    description: Remove users not listed in O(users).
    type: bool
    default: true
  cost:
    description: bcrypt cost of new hashes (every client connect verifies one).
    type: int
    default: 11
extends_documentation_fragment: [files]
"""

RETURN = r"""
hashes: {description: User name to bcrypt hash, for every user of O(users), type: dict, returned: always}
added: {description: Users created, type: list, returned: always}
updated: {description: Users whose password changed, type: list, returned: always}
removed: {description: Users removed, type: list, returned: always}
"""

USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a node id without '.', which NATS refuses in topics
MAX_PASSWORD = 72  # bcrypt uses the first 72 bytes only


def read_hashes(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#") and ":" in line:
                    user, hashed = line.split(":", 1)
                    out[user] = hashed
    return out


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {"type": "dict", "required": True, "no_log": True},
            "exclusive": {"type": "bool", "default": True},
            "cost": {"type": "int", "default": 11},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    try:
        import bcrypt
    except ImportError:
        module.fail_json(msg="the Python bcrypt package is missing on the target (apt-get install python3-bcrypt)")
    path: str = module.params["path"]
    users: dict = module.params["users"]
    for user, password in users.items():
        if not USER_RE.match(str(user)):
            module.fail_json(msg=f"invalid NATS user name {user!r}: 1-64 of [A-Za-z0-9_-] ('.' is refused by NATS)")
        if not isinstance(password, str) or not password or len(password.encode()) > MAX_PASSWORD or "\n" in password:
            module.fail_json(msg=f"password of user {user!r} must be a non-empty single-line string of at most "
                                 f"{MAX_PASSWORD} bytes")

    def matches(hashed: str, password: str) -> bool:
        try:
            return bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:
            return False

    existing = read_hashes(path)
    added = sorted(u for u in users if u not in existing)
    updated = sorted(u for u in users if u in existing and not matches(existing[u], users[u]))
    removed = sorted(u for u in existing if u not in users) if module.params["exclusive"] else []
    changed = bool(added or updated or removed)
    hashes = {u: existing[u] for u in users if u not in added + updated}
    for u in added + updated:
        hashes[u] = bcrypt.hashpw(users[u].encode(), bcrypt.gensalt(rounds=module.params["cost"])).decode()
    kept = hashes if module.params["exclusive"] else {**existing, **hashes}

    if changed and not module.check_mode:
        directory = os.path.dirname(path) or "."
        fd, work = tempfile.mkstemp(prefix=".nats_users.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write("".join(f"{u}:{h}\n" for u, h in sorted(kept.items())))
            module.atomic_move(work, path)
        finally:
            if os.path.exists(work):
                os.unlink(work)

    file_args = module.load_file_common_arguments(module.params)
    if os.path.exists(path):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, hashes=hashes, added=added, updated=updated, removed=removed)


if __name__ == "__main__":
    main()
