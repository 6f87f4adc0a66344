"""The edge node agent: joins the fleet over MQTT, runs the rounds it is asked to run, uploads, exports.

MQTT callbacks only decode and enqueue; training runs on the main thread; paho's network thread keeps
the connection (and the presence) alive however long a local round takes.
"""

from __future__ import annotations

import collections
import gc
import json
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from safetensors import SafetensorError

from edge_node.config import NodeConfig
from shared import __version__ as SOFTWARE_VERSION
from shared.chunking import Reassembler
from shared.logs import LiveRoundLogger, get_logger
from shared.messages import (
    Chunk,
    Command,
    ExportReport,
    NodeRefused,
    NodeStatus,
    ResendRequest,
    RoundConfig,
    RoundReport,
    RoundTelemetry,
    decode_from,
    encode,
)
from shared.topics import COORDINATOR_ID, TopicError
from shared.transport import CHUNK_OVERHEAD, MqttTransport, TransportError
from shared.updates import LoraUpdate, UpdateError

IDENTITY_TIMEOUT_S = 5.0  # the start-up probe on the node's own status topic must come back within this
# The node connects while its model loads.  An attempt during the load gives up after CONNECT_EARLY_TIMEOUT_S (so
# that an unreachable broker is logged early), is logged, and is tried again after CONNECT_RETRY_S, doubling up to
# CONNECT_RETRY_MAX_S; the attempt after the load, whose failure stops the node (exit 1), lasts CONNECT_TIMEOUT_S.
CONNECT_EARLY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 15.0
CONNECT_RETRY_S = 5.0
CONNECT_RETRY_MAX_S = 60.0
CALIBRATION_STEPS = 5  # local steps timed before joining, to size the node's first round
# A node that gets no round logs so, after this long and then at doubling intervals up to an hour: a coordinator
# or regional aggregator that refused it (other labels or base model) says so only in its own log, on another host.
IDLE_NOTICE_S = 300.0
IDLE_NOTICE_MAX_S = 3600.0
IDLE_HINT = ("no round or command has reached this node: is the coordinator (or region) running on this topic_root? "
             "Its log says why it leaves a node out (node_refused_labels, node_refused_base_model: this node's labels "
             "or model differ from the fleet's) or what it waits for (waiting_for_nodes)")


@dataclass(frozen=True)
class DeviceProfile:
    """A simulated device (``fedspine simulate``): the node reports its times on this device's virtual clock,
    compute time / ``speed`` (relative to an AGX) + upload bytes / ``uplink_mbps`` + ``latency_s``, and its
    energy from the profile's power model (``busy_w`` while computing, ``idle_w`` otherwise; source "profile")."""

    speed: float
    uplink_mbps: float
    latency_s: float
    memory_mb: int = 8192
    busy_w: float = 0.0
    idle_w: float = 0.0


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in str(exc).lower()


class Superseded(Exception):
    """The round being worked on is no longer the newest configuration this node received."""


def _key(cfg: RoundConfig) -> tuple:
    return (cfg.run_id, cfg.round, cfg.upload_transfer_id)


@dataclass
class _Done:
    """The last round this node completed, kept to answer a repeated config without re-training."""

    run_id: str
    round: int
    report: RoundReport


class NodeAgent:
    """One edge node process. ``trainer`` and ``transport`` may be injected (tests)."""

    def __init__(self, cfg: NodeConfig, *, trainer=None, transport=None, telemetry=None, log=None,
                 profile: DeviceProfile | None = None) -> None:
        self.cfg = cfg
        self.profile = profile
        self.node_id = cfg.node.id
        self.topics = cfg.broker.topics
        # every line says which round the node is in (-1 before its first, as its status message does)
        self.log = LiveRoundLogger((log or get_logger("edge_node")).bind(node_id=self.node_id), lambda: self._round)
        self.events: queue.Queue = queue.Queue()
        self.chunk_limit = cfg.broker.chunk_size + CHUNK_OVERHEAD
        self.downloads: queue.Queue = queue.Queue()  # completed global slices, apart from the control events
        self.reassembler = Reassembler(max_bytes=512 * 1024 * 1024, timeout_s=600.0)
        self._trainer = trainer
        self._injected = trainer is not None
        self._telemetry = telemetry
        # Measured at startup: seconds per local step, of the rest of a round, and the sparsity of the steps
        self._timing: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._round = -1
        self._upload: tuple[int, float] | None = None  # (rank, device seconds) of the last round's upload
        self._done: _Done | None = None
        # (run id, round, upload transfer) of the newest live config received: a round being worked on whose
        # config is no longer the newest (a restarted coordinator, a retry after the deadline) is abandoned.
        self._latest: tuple | None = None
        self._seen: collections.deque = collections.deque(maxlen=256)
        self._stop = threading.Event()
        self._accuracy: float | None = None  # the last round's test accuracy (announced in the status)
        self._ready = False  # model and data loaded: the node announces itself (and does on every reconnect)
        # Start-up: the connection is made on a thread of its own while the main thread loads (_connect_while_loading)
        self._loading_over = threading.Event()  # the load ended (done, failed or stopped)
        self._joined = False  # connected and identity checked, not yet announced
        self._connect_error: Exception | None = None  # why the last connection attempt failed
        self.state_dir = Path(cfg.node.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._resume_dir = self.state_dir / "trainer"  # the trainer's state, saved after every uploaded round
        # The run the trainer's state belongs to (None: the base model, or resume state of unknown origin).
        run_file = self.state_dir / "run_id"
        resumable = run_file.exists() and self._resume_dir.exists()
        self._run = (run_file.read_text().strip() or None) if resumable else None
        offline = encode(NodeStatus(node_id=self.node_id, state="offline", ts=time.time()))
        self.transport = transport or MqttTransport(
            cfg.broker, client_id=f"fedspine-node-{self.node_id}", will=(self.topics.node(self.node_id, "status"), offline),
            on_connect=self._on_connect, announced=lambda: self._ready, log=self.log.bind(logger="transport"),
            persistent=True,
        )

    # ---- lazily built heavy parts ------------------------------------------------------------------------
    @property
    def trainer(self):
        if self._trainer is None:
            from edge_node.engine import LocalTrainer

            n = self.cfg.node
            self._trainer = LocalTrainer(
                n.model_path, n.data_path, task=n.task, train=self.cfg.train, device=n.device, dtype=n.dtype,
                gradient_checkpointing=n.gradient_checkpointing, seed=n.seed, test_path=n.test_path or None,
                labels=list(n.labels) or None, log=self.log,
            )
            if self._resume_dir.exists() and hasattr(self._trainer, "load_resume"):
                try:
                    self._trainer.load_resume(self._resume_dir)
                except (ValueError, OSError, SafetensorError) as exc:
                    # State that no longer fits (other labels or model, a damaged file): start from the base
                    # model, once, rather than fail at every restart.  The coordinator's next slice brings the run.
                    self.log.warning("resume_state_discarded", error=f"{type(exc).__name__}: {exc}"[:300])
                    shutil.rmtree(self._resume_dir, ignore_errors=True)
                    self._run, self._trainer = None, None
                    self._free_memory()
                    return self.trainer
                self.log.info("trainer_resumed", sparsity=self._trainer.sparsity)
        return self._trainer

    @property
    def simulated(self) -> bool:
        """This process stands for a device profile (``fedspine simulate``): times are on a virtual clock."""
        return self.profile is not None

    def _device_s(self, wall: float, cpu: float | None, work: float | None = None) -> float:
        """Seconds on this device's clock: the wall time, or on a simulated device the trainer's modeled work
        (engine.MODEL_STEP_S: the same run gives the same times, whatever else shares the machine) scaled by the
        profile speed.  A trainer without the model: this thread's CPU time with one torch thread, else the wall."""
        if not self.simulated:
            return wall
        if work is not None:
            return work / self.profile.speed
        import torch

        return (cpu if cpu is not None and torch.get_num_threads() == 1 else wall) / self.profile.speed

    def _device_clock(self) -> float:
        """Now, on the clock ``_device_s`` reads (differences of it are device seconds)."""
        return self._device_s(time.perf_counter(), time.thread_time(), getattr(self._trainer, "work_s", None))

    def _pace(self, cfg: RoundConfig, received: float):
        """The engine's ``Pace`` for a paced round (``cfg.finish_s``), or None.  The trainer's round clock starts
        when it does: the finish leaves room for the upload (the last round's, scaled by the LoRA rank, which the
        payload is proportional to) and, on a real device, for the time since the config arrived (the download)."""
        if cfg.finish_s is None:
            return None
        from edge_node.engine import Pace

        upload = self._upload[1] * cfg.rank / max(self._upload[0], 1) if self._upload is not None else 0.0
        if self.simulated:
            finish = cfg.finish_s - upload - self.profile.latency_s
        else:
            finish = cfg.finish_s - upload - (time.monotonic() - received)
        return Pace(finish_s=max(finish, 0.0), min_steps=cfg.min_steps, max_steps=cfg.max_steps,
                    clock=self._device_clock)

    def _calibrate(self) -> None:
        """Time a few local steps before joining, so that the coordinator can size this node's first round."""
        steps = CALIBRATION_STEPS
        if not hasattr(self.trainer, "calibrate"):
            return
        try:
            c = self.trainer.calibrate(steps)
        except Exception as exc:  # noqa: BLE001 - without a timing the node still works (first round at τ)
            self.log.warning("calibration_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        self._timing = (self._device_s(c["step_s"], c.get("step_cpu_s"), c.get("step_work_s")),
                        self._device_s(c["fixed_s"], c.get("fixed_cpu_s"), c.get("fixed_work_s"))
                        + (self.profile.latency_s if self.simulated else 0.0),
                        float(getattr(self.trainer, "sparsity", 0.0)))
        self.log.info("calibrated", steps=steps, step_s=round(self._timing[0], 4), overhead_s=round(self._timing[1], 4),
                      width_scale=round(c.get("width_scale", 1.0), 4),
                      sparsity=round(self._timing[2], 4))

    # ---- presence -----------------------------------------------------------------------------------------
    def _status(self, state: str) -> NodeStatus:
        n = self.cfg.node
        memory = self.profile.memory_mb if self.profile else int(psutil.virtual_memory().total // 2**20)
        sparsity = float(getattr(self._trainer, "sparsity", 0.0)) if self._trainer is not None else 0.0
        return NodeStatus(
            node_id=self.node_id, state=state, ts=time.time(), device_type=n.device_type,
            model_id=Path(n.model_path).name if n.model_path else "", memory_mb=memory,
            software_version=SOFTWARE_VERSION, sparsity=sparsity, round=self._round,
            telemetry_source=getattr(self._telemetry, "source", ""), step_s=self._timing[0], overhead_s=self._timing[1],
            step_sparsity=self._timing[2],
            labels=list(getattr(self._trainer, "labels", None) or []),
            base_model=getattr(self._trainer, "base_model", None), test_accuracy=self._accuracy,
        )

    def _on_connect(self) -> None:
        # Birth message on every (re)connect once ready: the retained status replaces the will's "offline".
        if self._ready:
            self._announce()

    def _probe_identity(self, timeout_s: float = IDENTITY_TIMEOUT_S) -> None:
        """Check that the broker lets this node publish in its own sub-tree: an empty, non-retained message on its
        own status topic (the one topic a node may both write and read; every reader ignores an empty status) must
        come back to it.  The ACL confines a broker user to ``node/<username>/...`` and drops the rest silently,
        so a node whose id is not its user name would otherwise look connected and never be heard."""
        from shared.config import ConfigError

        topic = self.topics.node(self.node_id, "status")
        payload = b""
        back = threading.Event()
        self.transport.on_will_topic = lambda p: back.set() if p == payload else None
        try:
            self.transport.publish(topic, payload, qos=1)
            ok = back.wait(timeout_s)
        finally:
            self.transport.on_will_topic = None
        user = self.cfg.broker.username
        if ok:
            self.log.info("identity_checked", username=user, topic=topic)
            return
        if user != self.node_id:
            raise ConfigError(f"[node] id {self.node_id!r} differs from [broker] username {user!r}: the broker's ACL "
                              f"lets user {user!r} publish only under node/{user}/, so nothing node {self.node_id!r} "
                              "sends would arrive; make them equal")
        raise ConfigError(f"node {self.node_id!r} (broker username {user!r}) cannot publish and read back its own "
                          f"status on {topic} within {timeout_s:.0f} s: check the broker's ACL (pattern lines of "
                          "acl.j2) and [broker] topic_root")

    def _announce(self) -> None:
        """Publish the retained status: presence, and where the node stands (round, sparsity), so that a monitor
        or ``mosquitto_sub`` started later sees the node as it is now, not as it was when it joined."""
        self.transport.publish(self.topics.node(self.node_id, "status"), encode(self._status("online")),
                               qos=1, retain=True)

    # ---- network thread: decode and enqueue ------------------------------------------------------------------
    def _check_topic(self, topic: str, kind: str) -> bool:
        try:
            parsed = self.topics.parse(topic)
        except TopicError as exc:
            self.log.warning("topic_rejected", topic=topic, error=str(exc))
            return False
        return parsed.kind == kind and parsed.node_id == self.node_id

    def _handle_config(self, topic: str, payload: bytes) -> None:
        cfg = self._check_topic(topic, "config") and decode_from(payload, (RoundConfig, NodeRefused), topic=topic,
                                                                 log=self.log)
        if isinstance(cfg, NodeRefused):  # the coordinator leaves this node out: say why, here, and stay up
            if cfg.node_id == self.node_id:
                self.log.error("refused_by_coordinator", reason=cfg.reason, hint=cfg.hint)
            return
        if cfg:
            if time.time() <= cfg.deadline_ts and _key(cfg) not in self._seen:  # a redelivered config is not news
                self._seen.append(_key(cfg))
                self._latest = _key(cfg)
                if cfg.download_transfer_id:
                    # Here, not when the main thread gets to it: the slice's chunks follow right behind the config.
                    self.reassembler.expect(cfg.download_transfer_id, COORDINATOR_ID)
            self.events.put(("config", cfg))

    def _handle_download(self, topic: str, payload: bytes) -> None:
        chunk = self._check_topic(topic, "download") and decode_from(
            payload, Chunk, topic=topic, log=self.log, sender=COORDINATOR_ID, sender_field="sender",
            max_bytes=self.chunk_limit, event="chunk_rejected")
        if not chunk:
            return
        whole = self.reassembler.feed(chunk, COORDINATOR_ID)  # logs its own rejections
        if whole is not None:
            self.downloads.put((chunk.transfer_id, whole))

    def _handle_resend(self, topic: str, payload: bytes) -> None:
        req = self._check_topic(topic, "resend") and decode_from(
            payload, ResendRequest, topic=topic, log=self.log, sender=COORDINATOR_ID, sender_field="requester")
        if not req:
            return
        # Answered right here: the outbox is thread-safe and this must work while training runs.
        sent = self.transport.resend(self.topics.node(self.node_id, "upload"), req)
        self.log.info("upload_chunks_resent", transfer=req.transfer_id, asked=len(req.missing), sent=sent)

    def _handle_command(self, topic: str, payload: bytes) -> None:
        cmd = decode_from(payload, Command, topic=topic, log=self.log)
        if cmd:
            self.events.put(("command", cmd))

    # ---- main loop ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def _load(self) -> None:
        """Load the model and data and time a few steps (main thread; the connection is made meanwhile)."""
        _ = self.trainer
        if not self._stop.is_set():
            self._calibrate()

    def _join_broker(self, timeout_s: float) -> None:
        """Connect and check the node's identity (a real broker's ACL); the node is not announced yet."""
        self.transport.start(timeout_s, cancel=self._stop)
        if isinstance(self.transport, MqttTransport):  # a real broker, with an ACL to check
            self._probe_identity(IDENTITY_TIMEOUT_S)

    def _connect_while_loading(self) -> None:
        """Connect while the main thread loads, so that a broker problem is in the log at once, not after the load.

        An attempt during the load gives up early (``CONNECT_EARLY_TIMEOUT_S``), is logged with the transport's
        reason and what to check, and is tried again until the load is over; the last attempt starts after the
        load and lasts ``CONNECT_TIMEOUT_S``, so a broker that came up meanwhile is found.  The node is
        not announced here: its retained status stays what the will says ("offline") until ``_announce``.  The
        outcome is left in ``_joined`` and ``_connect_error`` for ``run``, which acts on it once the load is over:
        a bad model or data file is reported (exit 2) whatever the broker does."""
        delay = CONNECT_RETRY_S
        while True:
            final = self._loading_over.is_set()
            try:
                self._join_broker(CONNECT_TIMEOUT_S if final else CONNECT_EARLY_TIMEOUT_S)
            except TransportError as exc:
                self._connect_error = exc
                if final or self._stop.is_set():
                    return  # run() says why (start_up_failed, exit 1), or the node is stopping anyway
                last = f"one more attempt ({CONNECT_TIMEOUT_S:g} s), and exit 1 if that fails too"
                if self._loading_over.is_set():
                    hint = f"the model and data are loaded: {last}"
                else:
                    hint = (f"the node goes on loading its model and data and tries again in {delay:g} s; "
                            f"once loaded, {last}")
                self.log.error("broker_connect_failed", error=str(exc), hint=hint)
            except Exception as exc:  # noqa: BLE001 - the identity check (exit 2), or a bug: raised by run()
                self._connect_error = exc
                self.log.error("broker_check_failed", error=f"{type(exc).__name__}: {exc}"[:600],
                               hint="the node stops (start_up_failed) once its model and data are loaded")
                return
            else:
                self._joined, self._connect_error = True, None
                if not self._loading_over.is_set():
                    self.log.info("connected_loading_model",
                                  hint="the node announces itself once its model and data are loaded and timed")
                return
            if not self._loading_over.wait(delay):
                delay = min(2 * delay, CONNECT_RETRY_MAX_S)

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        t = self.transport
        t.subscribe(self.topics.node(self.node_id, "config"), self._handle_config)
        t.subscribe(self.topics.node(self.node_id, "download"), self._handle_download)
        t.subscribe(self.topics.node(self.node_id, "resend"), self._handle_resend)
        t.subscribe(self.topics.broadcast_command, self._handle_command)
        n = self.cfg.node
        self.log.info("node_starting", model=n.model_path, data=n.data_path, broker=list(self.cfg.broker.urls),
                      hint="loading the model and data while connecting to the broker; the node announces itself "
                           "(node_joined) once both are done")
        connector = threading.Thread(target=self._connect_while_loading, name=f"connect-{self.node_id}", daemon=True)
        connector.start()
        try:
            try:
                self._load()
            except BaseException:
                self._stop.set()  # a bad model or data file stops the node (exit 2) whatever the broker does
                raise
            finally:
                self._loading_over.set()
                connector.join()  # the attempt under way ends: connected, failed, or cancelled by a stop
            if self._stop.is_set():  # told to stop while loading or connecting: leave without announcing
                self.log.info("stopped_before_joining")
                return 0
            if not self._joined:
                raise self._connect_error or TransportError("no connection to the broker")
            self._ready = True
            self._announce()
            if self._telemetry is not None:
                self._telemetry.start()
            self.log.info("node_joined", device_type=self.cfg.node.device_type, model=self.cfg.node.model_path)
            idle_since, interval = time.monotonic(), IDLE_NOTICE_S
            notice_at = idle_since + interval
            while not self._stop.is_set():
                try:
                    ev = self.events.get(timeout=0.5)
                except queue.Empty:
                    if time.monotonic() >= notice_at:
                        self.log.info("waiting_for_rounds", idle_s=round(time.monotonic() - idle_since), hint=IDLE_HINT)
                        interval = min(2 * interval, IDLE_NOTICE_MAX_S)
                        notice_at = time.monotonic() + interval
                    continue
                idle_since, interval = time.monotonic(), IDLE_NOTICE_S
                notice_at = idle_since + interval
                kind, msg = ev
                if kind == "config":
                    self._on_round_config(msg)
                elif kind == "command":
                    if msg.command == "stop":
                        self.log.info("stop_requested", run_id=msg.run_id)
                        break
                    if msg.command == "export":
                        self._export(msg)
            return 0
        finally:
            if self._telemetry is not None and self._ready:
                self._telemetry.stop()
            if self._ready:
                t.publish(self.topics.node(self.node_id, "status"), encode(self._status("offline")), qos=1,
                          retain=True)
            t.wait_published(5.0)
            t.stop()  # a graceful disconnect: the will is not published
            self.log.info("node_stopped")

    def _superseded(self, cfg: RoundConfig) -> bool:
        return self._latest is not None and self._latest != _key(cfg)

    def _wait_download(self, cfg: RoundConfig, log) -> LoraUpdate | None:
        """Wait for the global slice of this round; ask for missing chunks when it stalls."""
        tid = cfg.download_transfer_id
        deadline = cfg.deadline_ts
        while not self._stop.is_set() and time.time() < deadline:
            if self._superseded(cfg):
                raise Superseded("a newer configuration arrived while waiting for the global update")
            try:
                got_tid, data = self.downloads.get(timeout=1.0)
            except queue.Empty:
                got_tid = None
            if got_tid is not None:
                if got_tid != tid:
                    log.info("stale_download_dropped", transfer=got_tid)
                    continue
                self.reassembler.forget(tid)
                return LoraUpdate.from_bytes(data)
            req = self.reassembler.resend_request(tid, self.node_id)
            if req is not None:
                self.transport.publish(self.topics.node(self.node_id, "missing"), encode(req), qos=1)
        raise TimeoutError(f"global update {tid} did not arrive before the round's deadline")

    def _on_round_config(self, cfg: RoundConfig) -> None:
        log = self.log.bind(round=cfg.round - 1 if cfg.local_steps == 0 else cfg.round, run_id=cfg.run_id)
        if self._done and (self._done.run_id, self._done.round) == (cfg.run_id, cfg.round) \
                and self._done.report.transfer_id == cfg.upload_transfer_id:
            # A repeated config (QoS 1 redelivery, coordinator restart): answer again, never train twice.
            log.info("config_repeated_report_resent")
            self.transport.publish(self.topics.node(self.node_id, "report"), encode(self._done.report), qos=1)
            return
        if time.time() > cfg.deadline_ts:
            log.info("config_past_deadline_dropped")
            return
        if self._superseded(cfg):
            log.info("config_superseded_dropped", newer_round=self._latest[1] if self._latest else None)
            return
        # One round numbering everywhere: the final sync (sent as round N + 1, a transfer of its own) evaluates the
        # aggregate of round N and is logged, announced and reported to people as round N with final = true.
        final = cfg.local_steps == 0
        shown = cfg.round - 1 if final else cfg.round
        log = self.log.bind(round=shown, run_id=cfg.run_id, **({"final": True} if final else {}))
        self._round = shown
        self._enter_run(cfg.run_id, log)
        log.info("round_config", target_sparsity=cfg.target_sparsity, rank=cfg.rank, local_steps=cfg.local_steps,
                 **({"finish_s": round(cfg.finish_s, 2), "min_steps": cfg.min_steps, "max_steps": cfg.max_steps}
                    if cfg.finish_s is not None else {}))
        try:
            report = self._train_and_upload(cfg, log)
        except Superseded as exc:  # its coordinator moved on (or restarted): nobody waits for this answer
            log.info("round_superseded", error=str(exc))
            return
        self.transport.publish(self.topics.node(self.node_id, "report"), encode(report), qos=1)
        self._done = _Done(cfg.run_id, cfg.round, report)
        self._announce()

    def _train_and_upload(self, cfg: RoundConfig, log) -> RoundReport:
        base = dict(run_id=cfg.run_id, round=cfg.round, node_id=self.node_id, final=cfg.local_steps == 0)
        shown = self._round  # the round people see (telemetry included): the final sync's is the last round's
        received = time.monotonic()
        try:
            global_update = self._wait_download(cfg, log) if cfg.download_transfer_id else None
            meter = getattr(self._telemetry, "meter", None)
            if meter is not None:
                self._telemetry.set_phase("training", shown)
                meter.begin_round(shown)
            pace = self._pace(cfg, received)
            try:
                result = self.trainer.run_round(
                    target_sparsity=cfg.target_sparsity, rank=cfg.rank, local_steps=cfg.local_steps,
                    global_update=global_update, importance=cfg.importance,
                    should_stop=lambda: self._stop.is_set() or self._superseded(cfg),
                    **({"pace": pace} if pace is not None else {}),
                )
            finally:
                energy = meter.end_round() if meter is not None else None
                if self._telemetry is not None:
                    self._telemetry.set_phase("uploading", shown)
            if self._superseded(cfg):
                raise Superseded("a newer configuration arrived during local training")
            t0 = time.perf_counter()
            self.transport.send_transfer(self.topics.node(self.node_id, "upload"), result.payload,
                                         cfg.upload_transfer_id, self.node_id)
            self.transport.wait_published(max(1.0, cfg.deadline_ts - time.time()))
            upload_s = time.perf_counter() - t0
            self._save_resume()
        except UpdateError as exc:
            log.warning("global_update_rejected", error=str(exc))
            return RoundReport(**base, status="error", error=f"global update rejected: {exc}"[:500])
        except Superseded:
            raise
        except TimeoutError as exc:
            if self._superseded(cfg):
                raise Superseded(str(exc)) from exc
            log.warning("round_abandoned", error=str(exc))
            return RoundReport(**base, status="error", error=str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - a failed round is reported, never crashes the node
            if _is_oom(exc):
                self._free_memory()
                log.warning("round_out_of_memory", error=str(exc)[:200], rank=cfg.rank, target=cfg.target_sparsity)
                return RoundReport(**base, status="oom", error=str(exc)[:500], rank=cfg.rank,
                                   sparsity=float(getattr(self._trainer, "sparsity", 0.0)))
            log.exception("round_failed")
            return RoundReport(**base, status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            if self._telemetry is not None:
                self._telemetry.set_phase("idle", shown)
        virtual_s, train_s = 0.0, self._device_s(result.train_s, result.metrics.get("train_cpu_s"),
                                                 result.metrics.get("train_work_s"))
        self._upload = (result.rank, upload_s)
        if self.simulated:  # plus the profile's uplink and latency, and its power model's energy
            p = self.profile
            self._upload = (result.rank, len(result.payload) * 8 / (p.uplink_mbps * 1e6))
            busy = self._device_s(result.compute_s, result.metrics.get("cpu_s"), result.metrics.get("work_s"))
            virtual_s = busy + self._upload[1] + p.latency_s
            energy = RoundTelemetry(node_id=self.node_id, round=shown, source="profile", duration_s=virtual_s,
                                    energy_j=p.busy_w * busy + p.idle_w * (virtual_s - busy),
                                    avg_power_w=(p.busy_w * busy + p.idle_w * (virtual_s - busy)) / max(virtual_s, 1e-9),
                                    power_estimated=True, avg_cpu_percent=100.0, avg_gpu_percent=None, samples=0)
        if energy is not None:
            self.transport.publish(self.topics.node(self.node_id, "telemetry/round"), encode(energy), qos=0)
        report = RoundReport(
            **base, status="ok", transfer_id=cfg.upload_transfer_id, upload_bytes=len(result.payload),
            loss_start=result.loss_start, loss_end=result.loss_end, samples=result.samples, steps=result.steps,
            examples=result.examples, compute_s=result.compute_s, train_s=train_s, upload_s=self._upload[1],
            virtual_s=virtual_s, sparsity=result.sparsity,
            rank=result.rank, energy_j=energy.energy_j if energy is not None else None,
            avg_power_w=energy.avg_power_w if energy is not None else None,
            power_source=energy.source if energy is not None else "", metrics=dict(result.metrics),
            peak_memory_mb=result.peak_memory_mb,
        )
        if "test_accuracy" in result.metrics:
            self._accuracy = min(max(float(result.metrics["test_accuracy"]), 0.0), 1.0)
            log.info("round_accuracy", final=cfg.local_steps == 0, test_accuracy=round(result.metrics["test_accuracy"], 4),
                     eval_set=self._eval_set(result.metrics.get("test_examples")),
                     model="final aggregate" if cfg.local_steps == 0 else "global model this round started from")
        log.info("round_uploaded", loss_start=round(result.loss_start, 4), loss_end=round(result.loss_end, 4),
                 sparsity=round(result.sparsity, 4), rank=result.rank, compute_s=round(result.compute_s, 2),
                 upload_bytes=len(result.payload), virtual_s=round(virtual_s, 2))
        return report

    def _eval_set(self, examples) -> str:
        """The evaluation set an accuracy is on, named wherever one is printed."""
        n = f"first {int(examples)} examples" if examples else f"first {self.cfg.train.test_batches} batches"
        return f"{n} of test_path {Path(self.cfg.node.test_path).name} ([train] test_batches)"

    def _free_memory(self) -> None:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _enter_run(self, run_id: str, log) -> None:
        """Tie the trainer's state to ``run_id``.  A config of another run than the one the state came from (a new
        job, or a coordinator that lost its checkpoint) starts from the base model, dense and without LoRA, as
        that coordinator's fresh global model and bandit assume; the earlier run's export stays until this run
        exports.  A coordinator resumed from its checkpoint keeps its run id, so its nodes continue."""
        if self._run is not None and self._run != run_id:
            log.info("new_run_starts_from_base_model", previous_run=self._run,
                     previous_sparsity=round(float(getattr(self._trainer, "sparsity", 0.0)), 4))
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            if self._injected:
                getattr(self._trainer, "reset", lambda: None)()
            else:
                self._trainer = None  # rebuilt from the base model on first use
                self._free_memory()
        if self._run != run_id:
            self._run = run_id
            (self.state_dir / "run_id").write_text(run_id)

    def _save_resume(self) -> None:
        if hasattr(self._trainer, "save_resume"):
            self._trainer.save_resume(self._resume_dir)

    def _export(self, cmd: Command) -> None:
        log = self.log.bind(round=cmd.round, run_id=cmd.run_id)
        n = self.cfg.node
        out = n.export_dir
        done = self._done
        if done is None or done.run_id != cmd.run_id or done.round <= cmd.round or done.report.status != "ok":
            # No final aggregate of this run here (the node joined after its last round, or its final sync
            # failed): exporting would ship the base model, or another run's, as this run's result.  An earlier
            # export in ``out`` stays as it was.
            why = f"no final model of run {cmd.run_id} on this node: it took no part in the run's final sync"
            log.warning("export_skipped", reason=why)
            self.transport.publish(self.topics.node(self.node_id, "report"), encode(ExportReport(
                run_id=cmd.run_id, node_id=self.node_id, status="skipped", error=why)), qos=1)
            return
        try:
            from edge_node.export import export_pruned_model, measure_latency

            model = self.trainer.merged_model()
            info = export_pruned_model(model, out, tokenizer=getattr(self.trainer, "tokenizer", None))
            latency = measure_latency(model, batch_size=self.cfg.train.batch_size, seq_len=self.cfg.train.max_length)
            metrics: dict[str, float] = {}
            if getattr(self.trainer, "has_test", False):
                # test_*: the set every round's accuracy is on (so it equals the final evaluation); without a
                # prefix: the whole test file
                sample = self.trainer.evaluate("test", self.cfg.train.test_batches)
                metrics = {**{k: float(v) for k, v in self.trainer.evaluate("test").items()},
                           **{f"test_{k}": float(v) for k, v in sample.items()}}
            report = ExportReport(run_id=cmd.run_id, node_id=self.node_id, status="ok", path=str(info.path),
                                  size_bytes=info.size_bytes, params=info.params, sparsity=self.trainer.sparsity,
                                  latency_ms=latency, metrics=metrics)
            (out / "fedspine_export.json").write_text(json.dumps({"run_id": cmd.run_id, "round": cmd.round,
                                                                  "latency_ms": latency, **metrics}))
            log.info("model_exported", path=str(info.path), size_bytes=info.size_bytes, latency_ms=round(latency, 2),
                     **({"test_accuracy": round(metrics["test_accuracy"], 4),
                         "eval_set": self._eval_set(metrics.get("test_examples")),
                         "file_accuracy": round(metrics["accuracy"], 4), "file_examples": int(metrics["examples"])}
                        if "test_accuracy" in metrics else {}))
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, the node stays up
            log.exception("export_failed")
            report = ExportReport(run_id=cmd.run_id, node_id=self.node_id, status="error",
                                  error=f"{type(exc).__name__}: {exc}"[:500])
        self.transport.publish(self.topics.node(self.node_id, "report"), encode(report), qos=1)
