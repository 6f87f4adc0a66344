"""The MQTT topic tree: the one module that builds and parses topic strings.

Layout under a configurable, versioned root (default ``fedspine/v1``)::

    <root>/coordinator/status            retained JSON presence of the coordinator (last will: offline)
    <root>/broadcast/command             msgpack Command (export, stop) for every node
    <root>/node/<id>/status              retained JSON presence + announcement of node <id> (last will: offline)
    <root>/node/<id>/telemetry           JSON periodic telemetry of node <id>
    <root>/node/<id>/telemetry/round     JSON per-round energy/utilisation summary of node <id>
    <root>/node/<id>/report              msgpack RoundReport / ExportReport from node <id>
    <root>/node/<id>/upload              msgpack Chunk of node <id>'s LoRA upload (node -> coordinator)
    <root>/node/<id>/missing             msgpack ResendRequest: chunks node <id> misses of its download
    <root>/node/<id>/config              msgpack RoundConfig for node <id> (coordinator -> node)
    <root>/node/<id>/download            msgpack Chunk of the global LoRA slice for node <id>
    <root>/node/<id>/resend              msgpack ResendRequest: chunks the coordinator misses of <id>'s upload
    <root>/region/<rid>/status           retained JSON presence of regional aggregator <rid> (last will: offline)
    <root>/region/<rid>/report           msgpack RegionReport: the round's outcome in region <rid>
    <root>/region/<rid>/upload           msgpack Chunk of region <rid>'s partial aggregate (region -> root)
    <root>/region/<rid>/missing          msgpack ResendRequest: chunks region <rid> misses of its download
    <root>/region/<rid>/config           msgpack RegionRound for region <rid> (root -> region)
    <root>/region/<rid>/download         msgpack Chunk of the global state for region <rid>
    <root>/region/<rid>/resend           msgpack ResendRequest: chunks the root misses of <rid>'s upload
    <root>/region/<rid>/node/<id>/...    region <rid>'s sub-fleet: the node tree above, rooted at <root>/region/<rid>

A node writes only the first group of its own sub-tree and reads only the second group plus the
broadcast topics; the broker's ACL (``broker_config/``) pins ``<id>`` to the MQTT username.  A regional aggregator
(coordinator/region.py) speaks the same protocol twice: as a coordinator to the nodes of its sub-tree
(``Topics.region_root``), and as one participant of the root's rounds on its ``region/<rid>`` topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "fedspine/v1"
# The sender id of the coordinator's chunks and resend requests, which a node accepts from no one else; a regional
# aggregator sends as it to its own nodes.  Also the coordinator's node_id in its logs.
COORDINATOR_ID = "coordinator"

# What a node publishes in its own sub-tree, and what it receives there.
NODE_WRITES = ("status", "telemetry", "telemetry/round", "report", "upload", "missing")
NODE_READS = ("config", "download", "resend")
# A region writes and reads the same kinds in its own sub-tree <root>/region/<rid>/ (presence, chunked transfers).
REGION_WRITES = ("status", "report", "upload", "missing")
REGION_READS = ("config", "download", "resend")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ROOT_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class TopicError(ValueError):
    """A topic string or node id that does not belong to the tree."""


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a valid id (one topic level, no wildcards), else raise TopicError."""
    if not isinstance(node_id, str) or not _ID_RE.match(node_id):
        raise TopicError(f"invalid node id {node_id!r}: use 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
    return node_id


def check_nats_name(name: str, what: str = "node id") -> str:
    """``check_node_id`` for a fleet on NATS, which also refuses '.': nats-server maps MQTT topic levels to
    subject tokens separated by '.', so it refuses topics containing one (a node id is a topic level).
    Mosquitto fleets keep the wider rule: ids already in use there stay valid."""
    check_node_id(name)
    if "." in name:
        raise TopicError(f"invalid {what} {name!r} for NATS: '.' separates NATS subject tokens; "
                         "use [A-Za-z0-9_-] only")
    return name


def nats_subject(topic: str) -> str:
    """The NATS subject an MQTT topic or filter of this tree maps to (a/b -> a.b, + -> *, # -> >)."""
    if "." in topic or " " in topic:
        raise TopicError(f"topic {topic!r} cannot be carried by NATS ('.' and ' ' are refused)")
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


@dataclass(frozen=True)
class ParsedTopic:
    """A topic inside the tree: ``node_id`` is None for coordinator and broadcast topics."""

    kind: str
    node_id: str | None = None
    region: str | None = None  # set (and node_id None) for a regional aggregator's topics


@dataclass(frozen=True)
class Topics:
    """Builds and parses every topic of one deployment (one root)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not _ROOT_RE.match(self.root):
            raise TopicError(f"invalid topic root {self.root!r}: levels of [A-Za-z0-9_.-] separated by '/'")

    # ---- builders -------------------------------------------------------------------------------
    def node(self, node_id: str, kind: str) -> str:
        if kind not in NODE_WRITES and kind not in NODE_READS:
            raise TopicError(f"unknown node topic kind {kind!r}")
        return f"{self.root}/node/{check_node_id(node_id)}/{kind}"

    def node_filter(self, kind: str) -> str:
        """Subscription filter for ``kind`` of every node, e.g. ``fedspine/v1/node/+/upload``."""
        if kind not in NODE_WRITES and kind not in NODE_READS:
            raise TopicError(f"unknown node topic kind {kind!r}")
        return f"{self.root}/node/+/{kind}"

    def region(self, region_id: str, kind: str) -> str:
        if kind not in REGION_WRITES and kind not in REGION_READS:
            raise TopicError(f"unknown region topic kind {kind!r}")
        return f"{self.root}/region/{check_node_id(region_id)}/{kind}"

    def region_filter(self, kind: str) -> str:
        """Subscription filter for ``kind`` of every region, e.g. ``fedspine/v1/region/+/upload``."""
        if kind not in REGION_WRITES and kind not in REGION_READS:
            raise TopicError(f"unknown region topic kind {kind!r}")
        return f"{self.root}/region/+/{kind}"

    def region_root(self, region_id: str) -> Topics:
        """The topic tree of region ``region_id``'s sub-fleet: its nodes are configured with this topic_root."""
        return Topics(f"{self.root}/region/{check_node_id(region_id)}")

    @property
    def coordinator_status(self) -> str:
        return f"{self.root}/coordinator/status"

    @property
    def broadcast_command(self) -> str:
        return f"{self.root}/broadcast/command"

    @property
    def telemetry_filter(self) -> str:
        """What an operator subscribes to with mosquitto_sub to follow the fleet's telemetry."""
        return f"{self.root}/node/+/telemetry/#"

    # ---- parser ---------------------------------------------------------------------------------
    def sender(self, topic: str, kind: str, log, field: str = "node_id") -> str | None:
        """The node (``field="region"``: the region) that ``topic`` belongs to when it is of ``kind``; None, with a
        warning for a topic outside this tree, otherwise (an inbound handler then drops the message)."""
        try:
            parsed = self.parse(topic)
        except TopicError as exc:
            log.warning("topic_rejected", topic=topic, error=str(exc))
            return None
        return getattr(parsed, field) if parsed.kind == kind else None

    def parse(self, topic: str) -> ParsedTopic:
        """Classify a topic of this tree; raise TopicError for anything else (never trust a topic)."""
        prefix = self.root + "/"
        if not isinstance(topic, str) or not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is outside root {self.root!r}")
        rest = topic[len(prefix):]
        if rest == "coordinator/status":
            return ParsedTopic("coordinator_status")
        if rest == "broadcast/command":
            return ParsedTopic("command")
        parts = rest.split("/", 2)
        if len(parts) == 3 and parts[0] == "region":
            region_id, kind = parts[1], parts[2]
            check_node_id(region_id)
            if kind in REGION_WRITES or kind in REGION_READS:
                return ParsedTopic(kind, None, region_id)
        if len(parts) == 3 and parts[0] == "node":
            node_id, kind = parts[1], parts[2]
            check_node_id(node_id)
            if kind in NODE_WRITES or kind in NODE_READS:
                return ParsedTopic(kind, node_id)
        raise TopicError(f"topic {topic!r} is not part of the fedspine tree")
