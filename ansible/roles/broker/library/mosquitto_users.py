#!/usr/bin/python
"""Ansible module: keep a mosquitto password file in step with a user -> password map, idempotently."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: mosquitto_users
short_description: Manage the users of a mosquitto password file
description:
  - Verifies every wanted user's password against the hash already in the file (PBKDF2-SHA512 C($7$) or
    salted SHA512 C($6$)) and only calls C(mosquitto_passwd) for users that are missing or whose password changed.
  - Passwords reach C(mosquitto_passwd) on its standard input, never on a command line.
  - With O(exclusive=true), users that are in the file but not in O(users) are removed.
options:
  path:
    description: The password file (mosquitto's C(password_file)).
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
  mosquitto_passwd:
    description: Path or name of the C(mosquitto_passwd) binary.
    type: str
    default: mosquitto_passwd
extends_documentation_fragment: [files]
"""

RETURN = r"""
added: {description: Users created, type: list, returned: always}
updated: {description: Users whose password changed, type: list, returned: always}
removed: {description: Users removed, type: list, returned: always}
"""

USER_RE = re.compile(r"^[^:\s#+/][^:\s]{0,127}$")
MAX_PASSWORD = 256


def read_entries(path: str) -> dict[str, str]:
    """User -> hash string of an existing password file (comments and blank lines skipped)."""
    entries: dict[str, str] = {}
    if not os.path.exists(path):
        return entries
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            user, hashed = line.split(":", 1)
            entries[user] = hashed
    return entries


def password_matches(hashed: str, password: str) -> bool:
    """Whether ``password`` produces ``hashed`` ($7$<iterations>$<salt>$<hash> or $6$<salt>$<hash>)."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            computed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
        elif len(parts) == 4 and parts[1] == "6":
            salt, digest = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            computed = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, digest)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {"type": "dict", "required": True, "no_log": True},
            "exclusive": {"type": "bool", "default": True},
            "mosquitto_passwd": {"type": "str", "default": "mosquitto_passwd"},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path: str = module.params["path"]
    users: dict = module.params["users"]
    for user, password in users.items():
        if not USER_RE.match(str(user)):
            module.fail_json(msg=f"invalid MQTT user name {user!r}: no ':' or whitespace, 1-128 characters")
        if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD or "\n" in password:
            module.fail_json(msg=f"password of user {user!r} must be a non-empty single-line string of at most "
                                 f"{MAX_PASSWORD} characters")

    existing = read_entries(path)
    added = sorted(u for u in users if u not in existing)
    updated = sorted(u for u in users if u in existing and not password_matches(existing[u], users[u]))
    removed = sorted(u for u in existing if u not in users) if module.params["exclusive"] else []
    changed = bool(added or updated or removed)

    if changed and not module.check_mode:
        binary = module.params["mosquitto_passwd"]
        if os.sep not in binary:
            binary = module.get_bin_path(binary, required=True, opt_dirs=["/usr/bin", "/usr/sbin"])
        directory = os.path.dirname(path) or "."
        fd, work = tempfile.mkstemp(prefix=".mosquitto_users.", dir=directory)
        os.close(fd)
        try:
            if os.path.exists(path):
                shutil.copyfile(path, work)
            for user in added + updated:
                password = users[user]
                rc, _out, err = module.run_command([binary, work, user], data=f"{password}\n{password}")
                if rc != 0:
                    module.fail_json(msg=f"mosquitto_passwd failed for user {user!r}: {err.strip()}")
            for user in removed:
                rc, _out, err = module.run_command([binary, "-D", work, user])
                if rc != 0:
                    module.fail_json(msg=f"mosquitto_passwd -D failed for user {user!r}: {err.strip()}")
            module.atomic_move(work, path)
        finally:
            if os.path.exists(work):
                os.unlink(work)

    file_args = module.load_file_common_arguments(module.params)
    if os.path.exists(path):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, added=added, updated=updated, removed=removed)


if __name__ == "__main__":
    main()
