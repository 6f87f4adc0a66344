"""``fedspine monitor``: a live terminal view of a fleet, built only from what the broker carries.

It subscribes like any other MQTT client (presence, telemetry, round reports, coordinator status) and needs
no coordinator internals; with the production ACL use the read-only ``monitor`` user.  ``FleetView`` holds the
state and is pure (tested without a broker); malformed messages are logged once and dropped.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field

from shared.config import BrokerConfig, ConfigError, from_mapping, load_toml
from shared.logs import get_logger
from shared.messages import (
    CoordinatorStatus,
    ExportReport,
    NodeStatus,
    ProtocolError,
    RoundReport,
    RoundTelemetry,
    Telemetry,
    decode,
)
from shared.topics import TopicError, Topics

# the phase a node's export report leaves it in (any status but these is a failure)
EXPORT_PHASES = {"ok": "exported", "skipped": "not exported", "error": "export failed"}


@dataclass
class NodeRow:
    node_id: str
    state: str = "?"
    device_type: str = ""
    round: int = -1
    phase: str = ""
    sparsity: float | None = None
    rank: int | None = None
    power_w: float | None = None
    power_source: str = ""
    cpu_percent: float | None = None
    gpu_percent: float | None = None
    loss: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None  # a causal LM's score, shown where a classifier's accuracy would be
    energy_j: float | None = None
    last_seen: float = 0.0
    region: str = ""  # the regional aggregator it trains under ("" : the root coordinator)


@dataclass
class FleetView:
    """The fleet as seen on the broker; ``apply`` takes raw (topic, payload) pairs."""

    topics: Topics
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    coordinator: CoordinatorStatus | None = None
    rejected: int = 0

    def _row(self, node_id: str) -> NodeRow:
        return self.nodes.setdefault(node_id, NodeRow(node_id))

    def _topics_of(self, topic: str) -> tuple[Topics, str]:
        """The topic tree ``topic`` lies in: the root's, or a region's (``<root>/region/<rid>/...``) and its id."""
        head = f"{self.topics.root}/region/"
        if topic.startswith(head):
            rid = topic[len(head):].split("/", 1)[0]
            return self.topics.region_root(rid), rid  # an invalid region id raises TopicError
        return self.topics, ""

    def apply(self, topic: str, payload: bytes, log=None) -> bool:
        """Update the view; return False (and log one line) for anything malformed."""
        try:
            topics, region = self._topics_of(topic)
            parsed = topics.parse(topic)
            if region and parsed.kind == "coordinator_status":
                return False  # a region's presence toward its own nodes: not the fleet's coordinator
            if parsed.kind == "coordinator_status":
                status = decode(payload, CoordinatorStatus)
                if self.coordinator is not None and status.run_id and self.coordinator.run_id \
                        and status.run_id != self.coordinator.run_id:
                    self._new_run()
                self.coordinator = status
                return True
            if parsed.node_id is None:
                return False
            if parsed.kind == "status":
                if not payload:  # a cleared retained status, or a node's start-up identity probe
                    return False
                st = decode(payload, NodeStatus)
                self._check(st.node_id, parsed.node_id)
                row = self._row(parsed.node_id)
                row.state, row.device_type = st.state, st.device_type or row.device_type
                # an offline status the node published itself (not its will) still says where it stood
                if st.state == "online" or st.round >= 0 or st.sparsity > 0:
                    row.sparsity = st.sparsity
                if st.test_accuracy is not None and st.round >= row.round:
                    row.accuracy = st.test_accuracy
                row.round = max(row.round, st.round)
            elif parsed.kind == "telemetry":
                t = decode(payload, Telemetry)
                self._check(t.node_id, parsed.node_id)
                row = self._row(parsed.node_id)
                row.power_w, row.power_source = t.power_w, t.source
                row.cpu_percent, row.gpu_percent, row.phase = t.cpu_percent, t.gpu_percent, t.phase
                row.round = max(row.round, t.round)
            elif parsed.kind == "telemetry/round":
                rt = decode(payload, RoundTelemetry)
                self._check(rt.node_id, parsed.node_id)
                self._row(parsed.node_id).energy_j = rt.energy_j
            elif parsed.kind == "report":
                rep = decode(payload, (RoundReport, ExportReport))
                self._check(rep.node_id, parsed.node_id)
                row = self._row(parsed.node_id)
                if isinstance(rep, RoundReport):
                    # the final sync (sent as round N + 1) evaluates round N's aggregate: shown as round N
                    row.round = max(row.round, rep.round - 1 if rep.final else rep.round)
                    if rep.status == "ok":
                        row.loss, row.sparsity, row.rank = rep.loss_end, rep.sparsity, rep.rank
                        row.accuracy = rep.metrics.get("test_accuracy", rep.metrics.get("val_accuracy", row.accuracy))
                        row.perplexity = rep.metrics.get("test_perplexity",
                                                         rep.metrics.get("val_perplexity", row.perplexity))
                    else:
                        row.phase = rep.status
                else:
                    row.phase = EXPORT_PHASES.get(rep.status, EXPORT_PHASES["error"])
                    # test_*: the examples every round is evaluated on, so the column keeps one definition
                    row.accuracy = rep.metrics.get("test_accuracy", row.accuracy)
                    row.perplexity = rep.metrics.get("test_perplexity", row.perplexity)
            else:
                return False
        except (ProtocolError, TopicError) as exc:
            self.rejected += 1
            (log or get_logger("monitor")).warning("message_rejected", topic=topic, size=len(payload), error=str(exc))
            return False
        row = self._row(parsed.node_id)
        row.last_seen, row.region = time.time(), region
        return True

    def _new_run(self) -> None:
        """A new job started (a new run id): its rounds count from 1 and its nodes start from the base model, so
        the previous run's round, progress and results go; presence, tier and live telemetry stay."""
        for row in self.nodes.values():
            row.round, row.sparsity, row.rank, row.loss, row.accuracy, row.energy_j = -1, None, None, None, None, None
            row.perplexity = None
            if row.phase in EXPORT_PHASES.values():
                row.phase = ""

    @staticmethod
    def _check(named: str, from_topic: str) -> None:
        if named != from_topic:
            raise ProtocolError(f"message names node {named!r} but came on {from_topic!r}'s topic")

    def table(self):
        from rich.table import Table

        c = self.coordinator
        title = "FedSpine fleet" + (f" - coordinator {c.state}, round {c.round}, {c.method}" if c else "")
        t = Table(title=title)
        regions = any(r.region for r in self.nodes.values())  # the column only for a fleet with regions
        left = ("node", "region", "presence", "tier", "phase", "source")
        for col in ("node", *(("region",) if regions else ()), "presence", "tier", "round", "phase", "sparsity",
                    "rank", "power W", "source", "CPU %", "GPU %", "loss", "test acc / ppl", "energy J"):
            t.add_column(col, justify="left" if col in left else "right")

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        def score(r: NodeRow) -> str:  # a classifier's accuracy, else a causal LM's perplexity
            return f(r.accuracy, ".3f") if r.accuracy is not None or r.perplexity is None else f"ppl {r.perplexity:.2f}"

        for r in sorted(self.nodes.values(), key=lambda r: (r.region, r.node_id)):
            presence = "[green]online" if r.state == "online" else f"[red]{r.state}"
            t.add_row(r.node_id, *((r.region or "-",) if regions else ()), presence, r.device_type,
                      f(r.round if r.round >= 0 else None, "d"), r.phase, f(r.sparsity, ".2f"), f(r.rank, "d"),
                      f(r.power_w, ".1f"), r.power_source, f(r.cpu_percent, ".0f"), f(r.gpu_percent, ".0f"),
                      f(r.loss, ".4f"), score(r), f(r.energy_j, ".0f"))
        return t


ONCE_S = 6.0  # --once listens this long: the retained presence at once, telemetry within its interval (5 s)
UNWRAPPED_WIDTH = 240  # columns of the table when the output is not a terminal


def run_monitor(broker: BrokerConfig, *, once: bool = False, duration_s: float = 3.0, console=None,
                client_id: str | None = None) -> FleetView:
    """Follow the fleet on ``broker``; with ``once`` print one snapshot after ``duration_s`` and return the view."""
    from rich.console import Console
    from rich.live import Live

    from shared.transport import MqttTransport

    log = get_logger("monitor")
    view = FleetView(broker.topics)
    lock = threading.Lock()

    def handle(topic: str, payload: bytes) -> None:
        with lock:
            view.apply(topic, payload, log)

    client = MqttTransport(broker, client_id or f"fedspine-monitor-{int(time.time() * 1000) % 10**9}")
    root = view.topics.root
    node_filters = (view.topics.node_filter("status"), view.topics.telemetry_filter, view.topics.node_filter("report"))
    # Nodes under a regional aggregator speak on <root>/region/<rid>/node/<id>/...: the same kinds, a level down.
    under_regions = tuple(f"{root}/region/+/{flt[len(root) + 1:]}" for flt in node_filters)
    for flt in (*node_filters, view.topics.coordinator_status, *under_regions):
        client.subscribe(flt, handle, qos=0)
    client.start()
    if console is None:
        # Rich sizes a console that writes to a file or a pipe (``--once > snapshot.txt``, ssh without a tty) at 80
        # columns, which cuts every column of the table to a letter or two: there, lay it out at full width.
        console = Console()
        if not console.is_terminal:
            console = Console(width=UNWRAPPED_WIDTH)
    try:
        if once:
            time.sleep(duration_s)
            with lock:
                console.print(view.table())
            return view
        deadline = time.monotonic() + duration_s if duration_s > 0 else float("inf")
        with Live(view.table(), console=console, refresh_per_second=2) as live:
            while time.monotonic() < deadline:
                time.sleep(0.5)
                with lock:
                    live.update(view.table())
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    return view


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedspine monitor", description="Live view of a FedSpine fleet over MQTT.")
    ap.add_argument("--config", default=None,
                    help="a TOML file whose [broker] section says how to connect (the kit's monitor/monitor.toml); "
                         "replaces --broker, --username, --password-file, --ca-file and --root")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                    help="mqtt://host:port or mqtts://host:8883; a clustered broker's members separated by commas")
    ap.add_argument("--username", default=None)
    ap.add_argument("--password-file", default=None)
    ap.add_argument("--ca-file", default=None)
    ap.add_argument("--root", default="fedspine/v1", help="topic root")
    ap.add_argument("--once", action="store_true", help="print one snapshot after --duration seconds and exit")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds to listen (default with --once: 6, longer than the nodes' default telemetry "
                         "interval of 5 s, so every live node's power and load are in the snapshot; else until "
                         "Ctrl-C)")
    a = ap.parse_args(argv)
    try:
        if a.config:
            broker = from_mapping(BrokerConfig, load_toml(a.config).get("broker"), "broker")
        else:
            urls = tuple(u.strip() for u in a.broker.split(",") if u.strip())
            broker = BrokerConfig(url=urls[0] if len(urls) == 1 else urls, username=a.username,
                                  password_file=a.password_file, ca_file=a.ca_file, topic_root=a.root)
    except ConfigError as exc:
        print(f"fedspine monitor: configuration error: {exc}", file=sys.stderr)
        return 2
    duration = a.duration if a.duration is not None else (ONCE_S if a.once else 0.0)
    run_monitor(broker, once=a.once, duration_s=duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
