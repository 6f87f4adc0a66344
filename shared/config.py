"""Self-checking config dataclasses shared by every process, and the TOML loader they all use.

Each process reads one TOML file; every section maps onto one dataclass whose ``__post_init__`` raises
``ConfigError`` naming the field and the bad value.  Unknown keys are errors too (typos must not pass).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlparse

from shared.topics import DEFAULT_ROOT, Topics

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or out of range."""


def from_mapping(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from a TOML table, refusing unknown keys."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; known: {sorted(names)}")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"[{section}] {exc}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


class Sections:
    """A process's whole configuration: one dataclass per TOML section, listed in ``SECTIONS`` (name -> class)."""

    SECTIONS: dict[str, type] = {}
    # Keys that moved to another section: section -> {key: the section it is in now}.  Such a key in its old place is
    # refused with a message naming its new place (no fallback: a file reads the same everywhere or not at all).
    MOVED: dict[str, dict[str, str]] = {}

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        unknown = sorted(set(data) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; known: {list(cls.SECTIONS)}")
        for section, keys in cls.MOVED.items():
            table = data.get(section)
            moved = sorted(set(table) & set(keys)) if isinstance(table, dict) else []
            if moved:
                raise ConfigError(f"[{section}] " + "; ".join(f"{k} has moved to [{keys[k]}]" for k in moved)
                                  + " (docs/configuration.md)")
        return cls(**{name: from_mapping(kind, data.get(name), name) for name, kind in cls.SECTIONS.items()})

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_dict(load_toml(path))


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the MQTT broker: one URL, or every member of a clustered engine (clients go round them)."""

    url: str | tuple[str, ...] = field(default="mqtt://127.0.0.1:1883", metadata={
        "help": "mqtt://host:1883 or mqtts://host:8883 (TLS); a list of such URLs names every member of a "
                "clustered broker: clients connect to the first reachable one and move to the next on loss"})
    username: str | None = field(default=None, metadata={
        "help": "MQTT user name (a node's is its node id); unset: anonymous"})
    password: str | None = field(default=None, metadata={
        "help": "MQTT password in clear; prefer password_file"})
    password_file: str | None = field(default=None, metadata={
        "help": "file holding the MQTT password, readable by the service only (production)"})
    ca_file: str | None = field(default=None, metadata={
        "help": "CA bundle that signed the broker's certificate (mqtts://); unset: the system CAs"})
    topic_root: str = field(default=DEFAULT_ROOT, metadata={
        "help": "root of the fleet's topic tree, the same for every process of one deployment"})
    chunk_size: int = field(default=256 * 1024, metadata={
        "help": "bytes per chunk of an upload or download, in [4 KiB, 8 MiB]; below the broker's packet limit"})

    def __post_init__(self) -> None:
        urls = (self.url,) if isinstance(self.url, str) else tuple(self.url)
        if not urls:
            raise ConfigError("[broker] url must name at least one broker")
        schemes = set()
        for url in urls:
            u = urlparse(url) if isinstance(url, str) else None
            if u is None or u.scheme not in ("mqtt", "mqtts") or not u.hostname:
                raise ConfigError(f"[broker] url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
            try:
                u.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ConfigError(f"[broker] url {url!r} has an invalid port") from None
            schemes.add(u.scheme)
        if len(schemes) > 1:
            raise ConfigError(f"[broker] url mixes mqtt:// and mqtts:// ({list(urls)}): a failover must never "
                              "fall back to plain text")
        if len(set(urls)) != len(urls):
            raise ConfigError(f"[broker] url lists a member twice: {list(urls)}")
        if not 4 * 1024 <= self.chunk_size <= 8 * 1024 * 1024:
            raise ConfigError(f"[broker] chunk_size {self.chunk_size} outside [4 KiB, 8 MiB]")
        if self.password is not None and self.password_file is not None:
            raise ConfigError("[broker] set password or password_file, not both")
        Topics(self.topic_root)  # validates the root

    @property
    def urls(self) -> tuple[str, ...]:
        """Every member's URL, in the order clients try them."""
        return (self.url,) if isinstance(self.url, str) else tuple(self.url)

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every member, in ``urls`` order."""
        out = []
        for url in self.urls:
            u = urlparse(url)
            out.append((u.hostname or "127.0.0.1", u.port or (8883 if u.scheme == "mqtts" else 1883)))
        return tuple(out)

    @property
    def tls(self) -> bool:
        return urlparse(self.urls[0]).scheme == "mqtts"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_root)

    def resolved_password(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"[broker] cannot read password_file {self.password_file}: {exc}") from None
        return self.password


def reference() -> str:
    """docs/configuration.md: every key of the coordinator's and the node's TOML file with its help text, generated
    from the fields (``python -m shared.config > docs/configuration.md``; a test checks the file is current)."""
    from coordinator.config import CoordinatorConfig, RegionConfig
    from edge_node.config import NodeConfig

    lines = ["# Configuration reference", "",
             "Generated from the configuration dataclasses by `python -m shared.config > docs/configuration.md`; do not",
             "edit by hand. Each process reads one TOML file; an unknown key or a bad value stops it at start-up with a",
             "message naming the key.", ""]
    for title, cfg in (("Coordinator (`fedspine coordinator --config coordinator.toml`)", CoordinatorConfig),
                       ("Edge node (`fedspine node --config node.toml`)", NodeConfig),
                       ("Regional aggregator (`fedspine region --config region.toml`)", RegionConfig)):
        lines += [f"## {title}", ""]
        for section, kind in cfg.SECTIONS.items():
            lines += [f"### [{section}]", "", "| key | default | what |", "|---|---|---|"]
            for f in dataclasses.fields(kind):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = "(required)"
                shown = "(required)" if default == "(required)" else f"`{_toml_literal(default)}`"
                lines.append(f"| `{f.name}` | {shown} | {f.metadata.get('help', '')} |")
            lines.append("")
    return "\n".join(lines)


def _toml_literal(v: Any) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_literal(x)}" for k, x in v.items()) + "}"
    return repr(v)


if __name__ == "__main__":
    print(reference(), end="")
