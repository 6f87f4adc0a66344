"""Jinja filters that render the flat TOML tables of the FedSpine config files (keys of one dataclass each)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ansible.errors import AnsibleFilterError

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise AnsibleFilterError(f"TOML key {key!r} must be a non-empty string")
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """One TOML value: string, bool, int, finite float, array of values, or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AnsibleFilterError(f"TOML value {value!r} must be finite")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX for control characters).
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise AnsibleFilterError(f"cannot render {type(value).__name__} {value!r} as a TOML value")


def toml_table(table: Mapping[str, Any]) -> str:
    """The ``key = value`` lines of one table, sorted by key; ``None`` values are left out (dataclass default)."""
    if not isinstance(table, Mapping):
        raise AnsibleFilterError(f"a TOML table must be a mapping, got {type(table).__name__}")
    return "\n".join(f"{_key(k)} = {toml_value(v)}" for k, v in sorted(table.items()) if v is not None)


class FilterModule:
    """Registers ``fedspine_toml_value`` and ``fedspine_toml_table``."""

    def filters(self) -> dict[str, Any]:
        return {"fedspine_toml_value": toml_value, "fedspine_toml_table": toml_table}
