"""The fleet registry: which nodes exist, which are live, what they told us when they joined (pure, no MQTT)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from coordinator.strategies.base import NodeInfo
from shared.messages import NodeStatus


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
