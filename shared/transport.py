"""Publish/subscribe transport: paho-mqtt 2.x over a real broker, and an in-memory bus with the same interface.

Handlers registered with ``subscribe`` run on the transport's network thread with ``(topic, payload)``;
they must only decode and enqueue.  An exception in a handler is logged and never stops the loop.
``send_transfer`` cuts a payload into chunks (``shared.chunking``) and publishes them with flow control:
paho puts at most ``MAX_INFLIGHT`` on the wire, and the sender hands paho at most ``window`` (default
4 x ``MAX_INFLIGHT``) unacknowledged chunks, so paho always has the next chunk ready when a PUBACK
arrives while memory stays bounded.  Chunks stay in an ``Outbox`` so ``resend`` can answer a
``ResendRequest`` with only the missing chunks.

``MqttTransport`` knows every member of a clustered broker (``[broker] url`` as a list): it connects to the
first reachable one and, when the connection is lost or a member refuses service, moves round-robin to the
next, with paho's exponential backoff between attempts; every connect re-subscribes and calls
``on_connect`` (the birth message).  A client with a last will also watches its own will topic: a member that
publishes the will of a connection this client already left (the link to it broke, the client moved on)
overwrites the retained "online" with "offline", and the client answers by calling ``on_connect`` again.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from shared.chunking import Outbox, split
from shared.config import BrokerConfig, ConfigError
from shared.logs import get_logger
from shared.messages import MAX_MESSAGE_BYTES, Chunk, ResendRequest, encode
from shared.topics import TopicError, Topics

Handler = Callable[[str, bytes], None]
CHUNK_OVERHEAD = 1024  # envelope of a Chunk beyond its data: type, ids, digest, counters
_CHUNK_KINDS = ("upload", "download")

# Connection constants (not configuration: read when a transport is made, so tests may patch them).
KEEPALIVE_S = 30  # MQTT keep-alive: a dead link is noticed within about 1.5 x this
SUBSCRIBE_BACKOFF_MAX_S = 60.0  # a refused subscription is asked for again after 1, 2, 4 … s, at most this
MAX_INFLIGHT = 20  # QoS 1 messages paho puts on the wire unacknowledged; paho ignores the broker's receive maximum
RECONNECT_MIN_S = 0.5  # first retry after a loss (to the next member); doubles per failed attempt
RECONNECT_MAX_S = 30.0  # backoff ceiling


class Transport(Protocol):
    """What round logic may use: implemented by MqttTransport and MemoryTransport."""

    connected: threading.Event
    topics: Topics
    chunk_size: int

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...
    def start(self, timeout_s: float = 15.0, cancel: threading.Event | None = None) -> None: ...
    def stop(self, flush_s: float = 5.0) -> None: ...
    def wait_published(self, timeout_s: float) -> bool: ...
    def send_transfer(self, topic: str, payload: bytes, transfer_id: str, sender: str) -> int: ...
    def resend(self, topic: str, request: ResendRequest) -> int: ...


def connection_problem(host: str, port: int, tls: bool, ca_file: str | None, timeout_s: float = 3.0) -> str:
    """Why a client cannot reach the broker at ``host:port``, in words that say what to check; "" when a TCP
    connection (and with ``tls`` a handshake verified as the transport verifies it) succeeds."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return f"nothing listens on {host}:{port} (is the broker started, and on this port?)"
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout_s} s (is the host up, the port open in its firewall?)"
    except OSError as exc:  # name resolution, no route
        return f"cannot reach {host}:{port}: {exc.strerror or exc}"
    with sock:
        if not tls:
            return (f"{host}:{port} accepts connections but no MQTT answer came (a TLS listener needs mqtts://, "
                    "or the broker is overloaded)")
        try:
            with ssl.create_default_context(cafile=ca_file).wrap_socket(sock, server_hostname=host):
                return ""
        except ssl.SSLCertVerificationError as exc:
            return (f"the broker's TLS certificate does not verify ({exc.verify_message}): ca_file "
                    f"({ca_file or 'unset: the system CAs'}) must be the CA that signed it, and it must name {host}")
        except (ssl.SSLError, OSError) as exc:
            return f"no TLS handshake with {host}:{port} ({exc}; is it a TLS listener? mqtt:// is plain MQTT)"


class TransportError(RuntimeError):
    """The broker refused us, could not be reached, or a payload breaks the transport's limits."""


class _Base:
    """What both transports share: payload limits, chunked sends through an Outbox, handler isolation."""

    def __init__(self, topics: Topics, chunk_size: int, max_inflight: int, log: Any, outbox_bytes: int) -> None:
        self.topics = topics
        self.chunk_size = chunk_size
        self.max_inflight = max_inflight
        self.log = log
        self.outbox = Outbox(outbox_bytes)
        self.connected = threading.Event()
        self._handlers: dict[str, tuple[Handler, int]] = {}

    def _limit(self, topic: str) -> int:
        try:
            if self.topics.parse(topic).kind in _CHUNK_KINDS:
                return self.chunk_size + CHUNK_OVERHEAD
        except TopicError:
            pass
        return MAX_MESSAGE_BYTES

    def _check_publish(self, topic: str, payload: bytes, qos: int) -> None:
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        limit = self._limit(topic)
        if len(payload) > limit:
            raise TransportError(f"payload of {len(payload)} bytes for {topic} exceeds {limit} bytes; "
                                 "use send_transfer for large payloads")

    def _call(self, handler: Handler, topic: str, payload: bytes) -> None:
        try:
            handler(topic, payload)
        except Exception:  # noqa: BLE001 - a handler bug must not kill the network thread
            self.log.exception("handler_failed", topic=topic, size=len(payload))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        raise NotImplementedError

    def _publish_flow(self, topic: str, payload: bytes) -> None:
        self.publish(topic, payload, qos=1)

    def publish_chunks(self, topic: str, chunks: Iterable[Chunk]) -> int:
        """Publish ``chunks`` in the given order (flow-controlled, QoS 1); return how many."""
        n = 0
        for c in chunks:
            self._publish_flow(topic, encode(c))
            n += 1
        return n

    def send_transfer(self, topic: str, payload: bytes, transfer_id: str, sender: str) -> int:
        """Publish ``payload`` as chunks on ``topic`` (flow-controlled, QoS 1); return the number of chunks."""
        chunks = split(payload, transfer_id, sender, self.chunk_size)
        self.outbox.add(chunks)
        self.publish_chunks(topic, chunks)
        self.log.debug("transfer_sent", topic=topic, transfer=transfer_id, chunks=len(chunks), size=len(payload))
        return len(chunks)

    def resend(self, topic: str, request: ResendRequest) -> int:
        """Publish only the chunks ``request`` lists (all when its list is empty); return how many."""
        chunks = self.outbox.get(request.transfer_id, request.missing)
        if not chunks:
            if request.transfer_id in self.outbox:  # known transfer, but none of the asked indices exist
                self.log.warning("resend_indices_out_of_range", transfer=request.transfer_id,
                                 requester=request.requester, asked=len(request.missing))
            else:
                self.log.warning("resend_unknown_transfer", transfer=request.transfer_id, requester=request.requester)
            return 0
        return self.publish_chunks(topic, chunks)


# A connection the broker closes this soon after accepting it, this many times in a row, is being taken over:
# another client connects with the same client id (a node started twice) and the two evict each other forever.
FLAP_SESSION_S = 5.0
FLAP_COUNT = 3


class MqttTransport(_Base):
    """paho-mqtt 2.x client (MQTT 3.1.1 by default: the embedded amqtt broker and NATS speak nothing else).

    ``persistent`` asks for a persistent session (a client with a stable id: coordinator, nodes); it is used
    only when the broker config lists several members.  ``on_connect`` runs on the network thread after every
    CONNACK and must be idempotent (it publishes the retained birth status).  ``announced`` says whether the
    client has published its birth yet (None: from the start); before that its own will on its status topic is
    the truth, and is left alone.  ``member`` is the URL of the member in use; ``failovers`` lists
    ``(from_url, to_url, seconds)`` of every reconnect after a lost connection, seconds from the loss to
    the CONNACK."""

    def __init__(self, broker: BrokerConfig, client_id: str, *, will: tuple[str, bytes] | None = None,
                 on_connect: Callable[[], None] | None = None, announced: Callable[[], bool] | None = None,
                 persistent: bool = False, log: Any = None,
                 protocol: int = mqtt.MQTTv311, outbox_bytes: int = 1 << 30, stall_s: float = 30.0,
                 window: int | None = None) -> None:
        super().__init__(broker.topics, broker.chunk_size, MAX_INFLIGHT,
                         (log or get_logger("transport")).bind(client_id=client_id), outbox_bytes)
        self.broker = broker
        self.client_id = client_id
        self.on_connect = on_connect
        self.announced = announced
        self.keepalive_s = KEEPALIVE_S
        self._stall_s = stall_s
        self.window = window or 4 * MAX_INFLIGHT
        self._members = broker.endpoints
        self._member = 0  # index into broker.urls of the member connected to, or being tried
        self._advanced = False  # this connection attempt already moved on to the next member
        self._lost_at: float | None = None  # monotonic time the last connection was lost
        self._lost_from: str | None = None
        self.failovers: list[tuple[str, str, float]] = []
        self._will = will
        self.on_will_topic: Callable[[bytes], None] | None = None  # every message on the will topic (network thread)
        self._cv = threading.Condition()
        self._pending: set[int] = set()  # mids published and not yet acknowledged
        self._early: set[int] = set()  # mids acknowledged before publish() returned them
        self._refused: str | None = None
        self._sub_lock = threading.Lock()
        self.connects = 0  # successful CONNACKs so far (reconnects included)
        self.subscribed = threading.Event()  # the subscriptions made before start() are active (SUBACK)
        self._suback_mid: int | None = None
        self._sub_requests: dict[int, list[tuple[str, int]]] = {}  # SUBSCRIBE mid -> its filters (for a retry)
        self._sub_backoff: dict[str, float] = {}  # refused filter -> seconds before it is asked for again
        self._stopping = False
        self._net_thread: int | None = None
        self._up_since = 0.0  # monotonic time of the last CONNACK
        self._short_sessions = 0  # connections in a row that the broker closed within FLAP_SESSION_S
        # A persistent session only where a member list names a clustered engine that replicates it: there it
        # carries the QoS 1 messages of a failover.  One broker keeps clean sessions (a restart loses nothing
        # the resume protocol does not recover, and old queues never replay into a new run).
        self.persistent = persistent and len(broker.urls) > 1
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                        clean_session=not self.persistent if protocol != mqtt.MQTTv5 else None)
        if broker.username:
            c.username_pw_set(broker.username, broker.resolved_password())
        if broker.tls:
            try:
                c.tls_set(ca_certs=broker.ca_file, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:  # paho's own error names no file
                raise ConfigError(f"[broker] cannot read ca_file {broker.ca_file}: {exc}") from None
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.max_queued_messages_set(0)
        c.on_pre_connect = self._on_pre_connect
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_unrouted
        self.client = c
        if will is not None:
            self.subscribe(will[0], self._guard_will)

    @property
    def member(self) -> str:
        """URL of the broker member in use (or being tried)."""
        return self.broker.urls[self._member]

    def _advance(self, why: str) -> None:
        """Point paho's next (re)connect at the next member (network thread; once per attempt)."""
        if self._advanced or self._stopping or len(self._members) < 2:
            return
        self._advanced = True
        before = self.member
        self._member = (self._member + 1) % len(self._members)
        # paho reconnects to client._host/_port; its host/port setters refuse while a lost connection is
        # being torn down, which is exactly when this runs.
        self.client._host, self.client._port = self._members[self._member]
        self.log.info("broker_next_member", failed=before, next=self.member, reason=why)

    def _guard_will(self, topic: str, payload: bytes) -> None:
        """Our own will, delivered while we are connected: a member published it for a connection we already
        left.  Publish the birth again so the retained presence says what is true (a client not yet announced,
        a node still loading its model, is what its will says)."""
        if self.on_will_topic is not None:
            self.on_will_topic(payload)
        if (self._will is not None and payload == self._will[1] and self.connected.is_set()
                and not self._stopping and self.on_connect is not None
                and (self.announced is None or self.announced())):
            self.log.warning("stale_will_overridden", topic=topic, member=self.member)
            self.on_connect()

    # ---- paho callbacks (network thread) -------------------------------------------------------------
    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._advanced = False

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._advance("unreachable")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._net_thread = threading.get_ident()
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self.log.error("broker_refused", reason=str(reason_code), url=self.member, username=self.broker.username)
            self._advance(f"refused: {reason_code}")
            return
        self._refused = None
        self._up_since = time.monotonic()
        failover_s = None
        if self._lost_at is not None:
            failover_s = round(self._up_since - self._lost_at, 3)
            self.failovers.append((self._lost_from or "", self.member, failover_s))
            self._lost_at = None
        with self._sub_lock:  # subscribe() in another thread either sees connected or is in this list
            subs = [(f, qos) for f, (_, qos) in self._handlers.items()]
            if subs:
                self._suback_mid = client.subscribe(subs)[1]
                self._sub_requests[self._suback_mid] = subs
            else:
                self.subscribed.set()
            self.connected.set()
            self.connects += 1  # counted once the connection is usable: connects == n implies connected (until lost)
        self.log.info("broker_connected", url=self.member, members=len(self._members), subscriptions=len(subs),
                      **({"reconnect_s": failover_s} if failover_s is not None else {}))
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:  # noqa: BLE001
                self.log.exception("on_connect_failed")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._sub_lock:  # a request made in another thread is recorded before its SUBACK is looked at
            asked = self._sub_requests.pop(mid, [])
        failed = [(f, rc) for f, rc in zip(asked, reason_codes or [], strict=False) if rc.is_failure]
        for f, _ in asked:
            if all(f != g for g, _ in failed):
                self._sub_backoff.pop(f[0], None)
        if failed:
            # A clustered engine refuses a subscription it could not set up in time (NATS: its JetStream consumer,
            # under load), and one its permissions forbid; MQTT 3.1.1 tells the two apart by nothing.  Without it
            # this client would silently miss messages, so ask again, backing off (1 s doubling to 60 s) so that a
            # forbidden filter costs a warning a minute; start() does not wait for it.
            delay = max(self._sub_backoff.get(f[0], 0.5) * 2 for f, _ in failed)
            delay = min(delay, SUBSCRIBE_BACKOFF_MAX_S)
            for f, _ in failed:
                self._sub_backoff[f[0]] = delay
            self.log.warning("subscription_refused", filters=[f for (f, _), _ in failed][:8], count=len(failed),
                             reason=str(failed[0][1]), retry_s=delay)
            timer = threading.Timer(delay, self._resubscribe, args=([f for f, _ in failed],))
            timer.daemon = True
            timer.start()
        if mid == self._suback_mid:
            self.subscribed.set()  # the broker answered: granted, or refused and asked again in the background

    def _resubscribe(self, subs: list[tuple[str, int]]) -> None:
        if self._stopping or not self.connected.is_set():
            return  # the next connect subscribes to everything anyway
        with self._sub_lock:
            subs = [s for s in subs if s[0] in self._handlers]  # not unsubscribed meanwhile
            if subs:
                self._sub_requests[self.client.subscribe(subs)[1]] = subs

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        with self._cv:
            self._cv.notify_all()
        if was and not self._stopping:
            self._lost_at, self._lost_from = time.monotonic(), self.member
            self._advance("connection lost")
            lived = time.monotonic() - self._up_since
            self._short_sessions = self._short_sessions + 1 if lived < FLAP_SESSION_S else 0
            self.log.warning("broker_disconnected", url=self._lost_from, reason=str(reason_code),
                             connected_s=round(lived, 1))
            n = self._short_sessions
            if n == FLAP_COUNT or (n > FLAP_COUNT and n % 100 == 0):
                self.log.error("connection_flapping", drops=n, hint=(
                    "the broker keeps closing this connection right after accepting it: most often another "
                    "process is connected with the same client id (the same node id started twice, e.g. a "
                    "systemd service and a manual run) and the two take the session over from each other; "
                    "stop one of them"))
        elif was:
            self.log.info("broker_disconnected", reason=str(reason_code))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cv:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early.add(mid)
            # Waiters wait for room in the window or for nothing outstanding; one acknowledgement at a time, so the
            # count passes each of these exactly once (waking them on every acknowledgement cost a tenth of the
            # network thread at thousands of nodes).
            if len(self._pending) in (0, self.window - 1):
                self._cv.notify_all()

    def _on_unrouted(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Some brokers deliver retained messages of topics we never subscribed to: drop them.
        self.log.debug("unexpected_message_dropped", topic=msg.topic, size=len(msg.payload))

    # ---- public API ----------------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route ``topic_filter`` to ``handler``; (re)subscribed on every connect."""
        self.client.message_callback_add(
            topic_filter, lambda _c, _u, msg, h=handler: self._call(h, msg.topic, msg.payload))
        with self._sub_lock:
            self._handlers[topic_filter] = (handler, qos)
            if self.connected.is_set():
                self._sub_requests[self.client.subscribe(topic_filter, qos)[1]] = [(topic_filter, qos)]

    def start(self, timeout_s: float = 15.0, cancel: threading.Event | None = None) -> None:
        """Connect and start the network thread; return once connected and the subscriptions made so far are
        acknowledged (messages published after that reach this client), or raise TransportError.  A failed
        start may be tried again; ``cancel`` set ends the attempt at once (TransportError, nothing logged)."""
        b = self.broker
        self._stopping = False
        self._refused = None  # a refusal seen by an earlier attempt says nothing about this one
        self.subscribed.clear()
        host, port = self._members[self._member]
        self.client.connect_async(host, port, keepalive=self.keepalive_s)
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.connected.wait(0.05) and self.subscribed.wait(max(0.0, min(0.05, deadline - time.monotonic()))):
                return
            if cancel is not None and cancel.is_set():
                self._shutdown()
                raise TransportError(f"connecting to {self.member} was cancelled")
            refused = self._refused
            if refused is not None and ("authori" in refused.lower() or "credential" in refused.lower()
                                        or "password" in refused.lower()):
                self._shutdown()  # credentials: every member would say the same
                raise TransportError(
                    f"broker {self.member} refused {b.username or 'anonymous'!r}: {refused}; check [broker] username "
                    "and password_file against the broker's users (the kit's or `fedspine broker`'s password file; "
                    "a user added to a running mosquitto needs its SIGHUP); exit 1 retries, so a fixed broker is "
                    "picked up")
        was_connected = self.connected.is_set()
        self._shutdown()
        where = b.urls[0] if len(b.urls) == 1 else f"any of {list(b.urls)}"
        reason = f" (last refusal: {self._refused})" if self._refused else ""
        if was_connected:
            reason = ": connected, but the broker did not acknowledge the subscriptions"
        elif not self._refused:  # paho keeps why a connection failed to itself: ask the network once more
            causes = [c for c in (connection_problem(h, p, b.tls, b.ca_file) for h, p in self._members) if c]
            reason = f": {'; '.join(causes)}" if causes else ""
        raise TransportError(f"no connection to {where} within {timeout_s} s{reason}")

    def _shutdown(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self, flush_s: float = 5.0) -> None:
        """Flush outstanding QoS 1 publishes (up to ``flush_s``), then disconnect gracefully."""
        if self.connected.is_set() and threading.get_ident() != self._net_thread:
            self.wait_published(flush_s)
        self._shutdown()
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish (thread-safe; while disconnected paho keeps QoS >= 1 messages for later)."""
        self._check_publish(topic, payload, qos)
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.log.debug("qos0_dropped_offline", topic=topic)
            return
        with self._cv:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)

    def _publish_flow(self, topic: str, payload: bytes) -> None:
        """Publish once fewer than ``window`` publishes are unacknowledged (never blocks the network
        thread; while disconnected or stalled for ``stall_s`` paho's queue takes over)."""
        if threading.get_ident() != self._net_thread:
            waited_since = time.monotonic()
            with self._cv:
                while (len(self._pending) >= self.window and self.connected.is_set()
                       and time.monotonic() - waited_since < self._stall_s):
                    self._cv.wait(0.5)
        self.publish(topic, payload, qos=1)

    def wait_published(self, timeout_s: float) -> bool:
        """Wait until every publish so far is acknowledged; False on timeout.  Never call from a handler."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
        return True

    @property
    def outstanding(self) -> int:
        with self._cv:
            return len(self._pending)


class MemoryBus:
    """In-process broker: wildcard routing, retained messages, last wills; ``drop(topic, payload)`` may
    return True to lose a message (fault injection in tests)."""

    def __init__(self, drop: Callable[[str, bytes], bool] | None = None) -> None:
        self.drop = drop
        self._lock = threading.Lock()
        self._clients: list[MemoryTransport] = []
        self._retained: dict[str, bytes] = {}
        self.delivered = 0

    def attach(self, t: MemoryTransport) -> None:
        with self._lock:
            if t not in self._clients:
                self._clients.append(t)

    def detach(self, t: MemoryTransport) -> None:
        with self._lock:
            if t in self._clients:
                self._clients.remove(t)

    def retained(self, topic_filter: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self._retained.items() if mqtt.topic_matches_sub(topic_filter, t)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        payload = bytes(payload)
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            clients = list(self._clients)
        if self.drop is not None and self.drop(topic, payload):
            return
        for c in clients:
            if c._wants(topic):
                c._inbox.put((topic, payload))
                self.delivered += 1


class MemoryTransport(_Base):
    """Same interface as MqttTransport on a MemoryBus; handlers run on this transport's own thread."""

    def __init__(self, bus: MemoryBus, client_id: str, *, will: tuple[str, bytes] | None = None,
                 on_connect: Callable[[], None] | None = None, topics: Topics | None = None,
                 chunk_size: int = 256 * 1024, max_inflight: int = 20, log: Any = None,
                 outbox_bytes: int = 1 << 30) -> None:
        super().__init__(topics or Topics(), chunk_size, max_inflight,
                         log or get_logger("transport", client_id=client_id), outbox_bytes)
        self.bus = bus
        self.client_id = client_id
        self.will = will
        self.on_connect = on_connect
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def _wants(self, topic: str) -> bool:
        return self.connected.is_set() and any(mqtt.topic_matches_sub(f, topic) for f in self._handlers)

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            topic, payload = item
            for f, (handler, _) in list(self._handlers.items()):
                if mqtt.topic_matches_sub(f, topic):
                    self._call(handler, topic, payload)
            self._inbox.task_done()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._handlers[topic_filter] = (handler, qos)
        if self.connected.is_set():
            for topic, payload in self.bus.retained(topic_filter):
                self._inbox.put((topic, payload))

    def start(self, timeout_s: float = 15.0, cancel: threading.Event | None = None) -> None:
        self._thread = threading.Thread(target=self._run, name=f"memory-{self.client_id}", daemon=True)
        self._thread.start()
        self.connected.set()
        self.bus.attach(self)
        for f in list(self._handlers):
            for topic, payload in self.bus.retained(f):
                self._inbox.put((topic, payload))
        if self.on_connect is not None:
            self.on_connect()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._check_publish(topic, payload, qos)
        if not self.connected.is_set():
            raise TransportError(f"{self.client_id} is not connected")
        self.bus.publish(topic, payload, retain=retain)

    def wait_published(self, timeout_s: float) -> bool:
        """Wait until every other transport on the bus has handled what it was sent (quiescence)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.bus._lock:
                busy = [c for c in self.bus._clients
                        if c._inbox.unfinished_tasks and (c._thread is None or c._thread.ident != threading.get_ident())]
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)

    def _close(self) -> None:
        self.connected.clear()
        self.bus.detach(self)
        if self._thread is not None:
            self._inbox.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=5)
            self._thread = None

    def stop(self, flush_s: float = 5.0) -> None:
        """Graceful disconnect: the will is not published."""
        self._close()

    def kill(self) -> None:
        """Ungraceful loss (like SIGKILL): the broker publishes the will."""
        self._close()
        if self.will is not None:
            self.bus.publish(self.will[0], self.will[1], retain=True)
