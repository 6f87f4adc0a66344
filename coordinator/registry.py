"""The fleet registry: which nodes exist, which are live, what they told us when they joined (pure, no MQTT);
and the fleet's identity (``FleetIdentity``): the classification labels and base model every node must share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from coordinator.strategies.base import NodeInfo
from shared.messages import NodeRefused, NodeStatus

REFUSAL_HINTS = {  # what an operator does about a refused node or region (FleetIdentity.admit)
    "labels": "every node needs the same class list in the same order: set [node] labels on each (Ansible: "
              "edge_node_labels), or [coordinator] labels to pin the fleet's",
    "base_model": "every node needs the same base model files (config.json and weights): give each node the same "
                  "copy (Ansible: edge_node_model_src), or pin the right one with [coordinator] base_model",
}
IDENTITY_KEYS = ("labels", "base_model")


def _plain(value):
    """A log field's value: tuples as lists (JSON)."""
    return list(value) if isinstance(value, tuple) else value


def identity_of(labels, base_model) -> dict:
    """An identity as FleetIdentity compares it, from a message's fields (NodeStatus, RegionRound, RegionReport):
    the class names as a tuple, None where unknown (a causal LM has no labels; a node may not know its digest)."""
    return {"labels": tuple(labels or ()) or None, "base_model": base_model or None}


@dataclass
class FleetIdentity:
    """The fleet's identity: the class list (in order) of its classification head and the digest of its base model.
    Every node whose updates are averaged together must share both, or heads' rows of different classes (or updates
    made on different weights) would be mixed.  A value is pinned (``[coordinator] labels``/``base_model``, or at a
    region, the root's ``RegionRound``) or adopted from the first node (or region) that names one; None on either
    side matches anything.  The root's and each region's gate (``admit``) apply this one rule.

    ``provisional``: values adopted here are not final (a region's, until its root sends the fleet's: ``follow``);
    its refusals under them say so."""

    labels: tuple[str, ...] | None = None
    base_model: str | None = None
    provisional: bool = False
    _unsettled: set = field(default_factory=set)  # keys adopted provisionally and not yet settled by ``follow``
    _refused: dict = field(default_factory=dict)  # (kind, who) -> what it was refused with (logged once each)

    def get(self) -> dict:
        return {"labels": self.labels, "base_model": self.base_model}

    def differs(self, got: dict) -> list[str]:
        """The keys of ``got`` (``identity_of``) that disagree with the fleet's (both known and different)."""
        fleet = self.get()
        return [k for k in IDENTITY_KEYS if got[k] is not None and fleet[k] is not None and got[k] != fleet[k]]

    def adopt(self, got: dict) -> list[str]:
        """Take the keys of ``got`` the fleet has none for; return them."""
        new = [k for k in IDENTITY_KEYS if got[k] is not None and getattr(self, k) is None]
        for k in new:
            setattr(self, k, got[k])
        if self.provisional:
            self._unsettled.update(new)
        return new

    def follow(self, fleet: dict) -> bool:
        """A region: take the root's identity (``identity_of`` a RegionRound) for every key it knows, dropping a
        provisional value; a key it does not know stays as it was.  True if a value changed or was settled."""
        changed = False
        for k in IDENTITY_KEYS:
            if fleet[k] is not None:
                changed |= getattr(self, k) != fleet[k] or k in self._unsettled
                setattr(self, k, fleet[k])
                self._unsettled.discard(k)
        return changed

    def settled(self, keys: list[str]) -> bool:
        """Whether the fleet's values of ``keys`` are final (not a region's provisional ones)."""
        return not self._unsettled.intersection(keys)

    def refusal(self, node_id: str, got: dict, wrong: list[str]) -> NodeRefused:
        """What a node refused for the keys ``wrong`` is told: its values and the fleet's, and the hints."""
        fleet = self.get()
        reason = "; ".join(f"{k} {_plain(got[k])} here, {_plain(fleet[k])} in the fleet" for k in wrong)
        return NodeRefused(node_id=node_id, reason=reason[:500], hint=" ".join(REFUSAL_HINTS[k] for k in wrong)[:500])

    def admit(self, who: str, got: dict, log, *, kind: str = "node") -> list[str]:
        """May ``who`` (a ``kind``: node, or region at the root) with identity ``got`` take part?  [] if it may: the
        keys the fleet lacks are adopted from it (``fleet_<key>`` info line naming it).  Else the keys that differ,
        logged as ``<kind>_refused_<key>`` errors with the fleet's value and the hint (``provisional`` where that
        value is), once until its identity, or the fleet's value it was refused for, changes or is settled."""
        wrong = self.differs(got)
        fleet = self.get()
        if not wrong:
            self._refused.pop((kind, who), None)
            for k in self.adopt(got):
                log.info(f"fleet_{k}", **{k: _plain(got[k]), f"first_{kind}": who},
                         **({"provisional": True} if self.provisional else {}))
            return []
        seen = (tuple(got.items()), tuple((k, fleet[k], k in self._unsettled) for k in wrong))
        if self._refused.get((kind, who)) != seen:
            self._refused[(kind, who)] = seen
            for k in wrong:
                log.error(f"{kind}_refused_{k}", **{kind: who, k: _plain(got[k]), f"fleet_{k}": _plain(fleet[k])},
                          hint=REFUSAL_HINTS[k], **({"provisional": True} if k in self._unsettled else {}))
        return wrong


@dataclass
class NodeEntry:
    """What the coordinator knows about one node."""

    node_id: str
    device_type: str
    model_id: str
    memory_mb: int
    software_version: str
    online: bool
    last_change: float
    joined_round: int  # last completed (or in-progress) round when it came online; it takes part after it
    step_s: float = 0.0  # its startup timing (NodeStatus), for sizing its first round
    overhead_s: float = 0.0
    step_sparsity: float = 0.0  # the sparsity that timing was measured at

    def info(self) -> NodeInfo:
        return NodeInfo(node_id=self.node_id, device_type=self.device_type, memory_mb=self.memory_mb,
                        step_s=self.step_s, overhead_s=self.overhead_s, step_sparsity=self.step_sparsity)


class Registry:
    """Live view of the fleet, fed with the retained presence messages (``node/<id>/status``)."""

    def __init__(self) -> None:
        self._nodes: dict[str, NodeEntry] = {}
        self._online = 0  # number of entries with online=True, kept in step by apply()

    def apply(self, status: NodeStatus, now: float, current_round: int) -> str | None:
        """Apply one presence message; return "joined", "left", "updated" or None (nothing changed)."""
        entry = self._nodes.get(status.node_id)
        online = status.state == "online"
        if entry is None:
            if not online:
                return None  # a retained "offline" of a node we never saw: remember nothing
            self._nodes[status.node_id] = NodeEntry(
                node_id=status.node_id, device_type=status.device_type or "default", model_id=status.model_id,
                memory_mb=status.memory_mb, software_version=status.software_version, online=True,
                last_change=now, joined_round=current_round, step_s=status.step_s, overhead_s=status.overhead_s,
                step_sparsity=status.step_sparsity,
            )
            self._online += 1
            return "joined"
        if online:
            changed = not entry.online
            entry.device_type = status.device_type or entry.device_type
            entry.model_id = status.model_id or entry.model_id
            entry.memory_mb = status.memory_mb or entry.memory_mb
            entry.software_version = status.software_version or entry.software_version
            if status.step_s > 0:
                entry.step_s, entry.overhead_s = status.step_s, status.overhead_s
                entry.step_sparsity = status.step_sparsity
            if changed:
                entry.online, entry.last_change, entry.joined_round = True, now, current_round
                self._online += 1
                return "joined"
            return "updated"
        if entry.online:
            entry.online, entry.last_change = False, now
            self._online -= 1
            return "left"
        return None

    def live(self, for_round: int | None = None) -> list[NodeInfo]:
        """Live nodes, sorted by id; with ``for_round``, only those that joined before that round started."""
        return [
            e.info()
            for e in sorted(self._nodes.values(), key=lambda e: e.node_id)
            if e.online and (for_round is None or e.joined_round < for_round)
        ]

    def live_count(self) -> int:
        return self._online

    def is_live(self, node_id: str) -> bool:
        entry = self._nodes.get(node_id)
        return bool(entry and entry.online)

    def get(self, node_id: str) -> NodeEntry | None:
        return self._nodes.get(node_id)

    def __len__(self) -> int:
        return len(self._nodes)

    def state_dict(self) -> dict:
        return {nid: asdict(e) for nid, e in self._nodes.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore known nodes; presence is re-learnt from the broker's retained status messages."""
        self._nodes = {nid: NodeEntry(**{**e, "online": False}) for nid, e in state.items()}
        self._online = 0
