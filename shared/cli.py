"""The ``fedspine`` command line: coordinator, node, simulate (the local fleet), monitor, kit, broker tools.

Services (coordinator, node) write JSON lines to stderr and nothing else: third-party output (transformers'
progress bars and load reports, Python warnings) goes through the same renderer or is silenced.  The run's
human table goes to stdout only when stdout is a terminal."""

from __future__ import annotations

import argparse
import sys

from shared.logs import configure_logging, quiet_third_party


def _coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.metrics import summarize
    from coordinator.server import Coordinator

    coordinator = Coordinator(CoordinatorConfig.load(args.config))
    summary = coordinator.run()
    if coordinator.metrics.path.exists() and sys.stdout.isatty():
        print(summarize(coordinator.metrics.path), flush=True)  # the run's table, for a person at a terminal
    return 0 if not summary.stopped_early else 3


def _node(args: argparse.Namespace, profile=None) -> int:
    """Run a node agent; ``profile`` (an ``edge_node.agent.DeviceProfile``): a simulated device (fedspine simulate)."""
    from edge_node.agent import NodeAgent
    from edge_node.config import NodeConfig
    from edge_node.telemetry import ProfileProvider, TelemetryPublisher, make_provider

    cfg = NodeConfig.load(args.config)
    cfg.check_files()
    agent = NodeAgent(cfg, profile=profile)
    provider = ProfileProvider(profile.busy_w, profile.idle_w) if profile else make_provider(cfg.telemetry, agent.log)
    agent._telemetry = TelemetryPublisher(
        provider, agent.transport.publish, agent.topics, cfg.node.id, cfg.telemetry.interval_s, agent.log
    )
    return agent.run()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fedspine", description="FedSpine federated prune-and-tune over MQTT.")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                        help="log renderer (default: JSON unless stderr is a terminal)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("coordinator", help="run the coordinator service")
    p.add_argument("--config", required=True,
                   help="coordinator TOML ([broker], [coordinator], [pruning], [lora], [bandit])")
    p = sub.add_parser("region", help="run a regional aggregator (a sub-fleet's coordinator, one partial upward)")
    p.add_argument("--config", required=True, help="region TOML ([broker], [region])")
    p = sub.add_parser("node", help="run an edge node agent")
    p.add_argument("--config", required=True, help="node TOML ([broker], [node], [train], [telemetry])")
    sub.add_parser("simulate", help="run a local fleet (embedded broker, coordinator, simulated Jetson nodes)",
                   add_help=False)
    sub.add_parser("monitor", help="live terminal view of a fleet (connects to the broker)", add_help=False)
    sub.add_parser("broker", help="broker credentials, ACL and config tools", add_help=False)
    sub.add_parser("kit", help="write a fleet's configs, users, ACL and certificates from fleet.toml", add_help=False)

    # simulate, monitor and broker have their own parsers: they get the rest of the command line.
    args, rest = parser.parse_known_args(argv)
    configure_logging(json=None if args.log_format == "auto" else args.log_format == "json", level=args.log_level)
    if args.command in ("coordinator", "node"):
        quiet_third_party()
    if args.command == "simulate":
        from coordinator.simulate import main as simulate_main

        return simulate_main(rest)
    if args.command == "monitor":
        from coordinator.monitor import main as monitor_main

        return monitor_main(rest)
    if args.command == "kit":
        from broker_config.kit import main as kit_main

        return kit_main(rest)
    if args.command == "broker":
        from broker_config.fedspine_broker import main as broker_main

        return broker_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "region":
        from coordinator.region import main_region

        return run_service("region", lambda: main_region(args.config))
    return run_service(args.command, lambda: _coordinator(args) if args.command == "coordinator" else _node(args))


def run_service(command: str, run) -> int:
    """Run a service, turning start-up errors into one line (``_start_up_failed``) and an exit code systemd
    understands: 2 for a configuration or data error (fixed by the operator, not by restarting), 1 for the broker."""
    from edge_node.data import DataError
    from shared.config import ConfigError
    from shared.transport import TransportError

    try:
        return run()
    except ConfigError as exc:
        return _start_up_failed(command, f"configuration error: {exc}", 2)
    except DataError as exc:  # the node's own data file: fixed by the operator, not by restarting
        return _start_up_failed(command, f"data error: {exc}", 2)
    except TransportError as exc:  # broker down or refusing us at start-up: exit 1 so that systemd tries again
        return _start_up_failed(command, str(exc), 1)
    except Exception:  # a bug or a file no check foresaw: its traceback in the JSON log, not after it
        from shared.logs import get_logger, json_lines

        if not json_lines():
            raise
        get_logger(command).exception("service_failed", exit_status=1)
        return 1


def _start_up_failed(command: str, error: str, status: int) -> int:
    """The one line that says why a service stops: a JSON line (``start_up_failed``, level error) where the
    service logs JSON lines, so that the log stays one JSON object a line for jq and the journal; plain text on
    a terminal."""
    from shared.logs import get_logger, json_lines

    message = f"fedspine {command}: {error}"
    if json_lines():
        get_logger(command).error("start_up_failed", error=message, exit_status=status)
    else:
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
