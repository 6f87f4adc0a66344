"""Chunked transfer of large payloads: split, reassemble (any order, duplicates, resume) and the sender's outbox.

Pure logic, no MQTT: the transport publishes what ``split``/``Outbox`` produce and feeds what arrives into a
``Reassembler``.  Every chunk carries the transfer id, sender, index, count, total size and the sha256 of
the whole payload.  All chunks but the last have the same size, so any single chunk fixes the geometry:
``chunk_size = (total_size - len(last)) / (count - 1)``.

Resume: the receiver lists what it lacks with ``missing()`` and sends a ``ResendRequest``; the sender's
``Outbox`` answers with exactly those chunks.  While nothing has arrived the count is unknown, so
``missing()`` asks for chunk 0, whose arrival reveals the rest.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from shared.logs import get_logger
from shared.messages import MAX_MISSING, Chunk, ProtocolError, ResendRequest
from shared.topics import check_node_id

DEFAULT_CHUNK_SIZE = 256 * 1024
RESEND_IDLE_S = 3.0  # a transfer with no new chunk for this long is asked for its missing chunks


def split(payload: bytes, transfer_id: str, sender: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Chunk]:
    """Cut ``payload`` into chunks of ``chunk_size`` bytes (the last may be shorter); data are zero-copy views."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(payload).cast("B")
    total = len(view)
    digest = hashlib.sha256(view).hexdigest()
    count = max(1, math.ceil(total / chunk_size))
    return [
        Chunk(transfer_id=transfer_id, sender=sender, index=i, count=count, total_size=total, digest=digest,
              data=view[i * chunk_size:(i + 1) * chunk_size])
        for i in range(count)
    ]


@dataclass(frozen=True)
class TransferStatus:
    """Progress of one incoming transfer; ``count`` is None until its first chunk arrived."""

    transfer_id: str
    sender: str
    count: int | None
    received: int
    total_size: int | None
    age_s: float
    idle_s: float


class _Transfer:
    """Receive state of one expected transfer: geometry from its first chunk, a preallocated buffer."""

    __slots__ = ("sender", "created", "last_progress", "asked", "count", "total", "digest", "chunk_size", "buf",
                 "have", "n_have", "hasher", "hashed_upto")

    def __init__(self, sender: str, now: float) -> None:
        self.sender = sender
        self.created = now
        self.last_progress = now
        self.asked = now  # when the sender was last asked for missing chunks
        self.reset()

    def reset(self) -> None:
        self.count: int | None = None
        self.total = 0
        self.digest = ""
        self.chunk_size = 0
        self.buf: bytearray | None = None
        self.have = bytearray()
        self.n_have = 0
        self.hasher: Any = None
        self.hashed_upto = 0  # chunks 0..hashed_upto-1 are already in the running digest

    def geometry(self, chunk: Chunk) -> str:
        """Fix count/size/digest/chunk size from a first chunk; return an error text or ''."""
        n, count, total = len(chunk.data), chunk.count, chunk.total_size
        if count == 1:
            size = total
        elif chunk.index < count - 1:
            size = n
        elif (total - n) % (count - 1):
            return f"last chunk of {n} bytes does not fit {count} chunks of {total} bytes"
        else:
            size = (total - n) // (count - 1)
        last = total - (count - 1) * size
        if size <= 0 and total > 0 or not 0 <= last <= size or (count > 1 and last == 0):
            return f"{count} chunks cannot make {total} bytes"
        if n != (size if chunk.index < count - 1 else last):
            return f"chunk {chunk.index} of {n} bytes does not fit {count} chunks of {total} bytes"
        self.count, self.total, self.digest, self.chunk_size = count, total, chunk.digest, size
        self.buf = bytearray(total)
        self.have = bytearray(count)
        self.hasher = hashlib.sha256()
        return ""

    def expected_len(self, index: int) -> int:
        assert self.count is not None
        return self.chunk_size if index < self.count - 1 else self.total - (self.count - 1) * self.chunk_size

    def advance_hash(self) -> None:
        """Hash the contiguous prefix received so far, so in-order transfers are verified as they arrive."""
        assert self.buf is not None and self.count is not None
        view = memoryview(self.buf)
        start = self.hashed_upto
        while self.hashed_upto < self.count and self.have[self.hashed_upto]:
            self.hashed_upto += 1
        if self.hashed_upto > start:
            end = min(self.total, self.hashed_upto * self.chunk_size)
            self.hasher.update(view[start * self.chunk_size:end])

    def missing(self) -> list[int]:
        if self.count is None:
            return [0]
        return [i for i, got in enumerate(self.have) if not got]


class Reassembler:
    """Reassembles expected transfers from chunks fed by the network thread; thread-safe; bounded memory.

    ``feed`` never raises for bad chunks: it logs one ``chunk_rejected`` line and returns None, so one
    corrupt or hostile chunk cannot disturb other transfers.
    """

    def __init__(self, max_bytes: int, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 log: Any = None, recent: int = 256) -> None:
        if max_bytes <= 0 or timeout_s <= 0:
            raise ValueError(f"max_bytes ({max_bytes}) and timeout_s ({timeout_s}) must be positive")
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._clock = clock
        self._log = log if log is not None else get_logger("chunking")
        self._lock = threading.Lock()
        self._transfers: dict[str, _Transfer] = {}
        self._done: deque[str] = deque(maxlen=recent)  # completed ids: late duplicates are dropped quietly
        self.rejected = 0
        self.duplicates = 0

    def expect(self, transfer_id: str, sender: str) -> None:
        """Accept chunks of ``transfer_id`` from ``sender`` from now on (idempotent for the same sender)."""
        check_node_id(sender)
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None or t.sender != sender:
                self._transfers[transfer_id] = _Transfer(sender, self._clock())
            if transfer_id in self._done:
                self._done.remove(transfer_id)

    def forget(self, transfer_id: str) -> None:
        with self._lock:
            self._transfers.pop(transfer_id, None)

    def _reject(self, chunk: Chunk, topic_sender: str, reason: str) -> None:
        self.rejected += 1
        self._log.warning("chunk_rejected", transfer=chunk.transfer_id, sender=chunk.sender,
                          topic_sender=topic_sender, index=chunk.index, count=chunk.count, reason=reason)

    def feed(self, chunk: Chunk, sender_from_topic: str) -> bytes | None:
        """Store ``chunk``; return the whole payload once every chunk is in and the digest matches.

        The payload is returned as the reassembly buffer itself (a ``bytearray`` now owned by the caller,
        bytes-like and equal to the sent bytes): no final copy of a possibly large payload."""
        if not isinstance(chunk, Chunk):
            raise ProtocolError(f"feed expects a Chunk, got {type(chunk).__name__}")
        with self._lock:
            t = self._transfers.get(chunk.transfer_id)
            if t is None:
                if chunk.transfer_id in self._done:
                    self.duplicates += 1
                    return None
                self._reject(chunk, sender_from_topic, "unknown transfer")
                return None
            if chunk.sender != t.sender or sender_from_topic != t.sender:
                self._reject(chunk, sender_from_topic, f"sender mismatch: transfer expected from {t.sender!r}")
                return None
            if chunk.total_size > self.max_bytes:
                self._reject(chunk, sender_from_topic, f"total size {chunk.total_size} exceeds {self.max_bytes}")
                return None
            if t.count is None:
                error = t.geometry(chunk)
                if error:
                    self._reject(chunk, sender_from_topic, error)
                    return None
            elif (chunk.count, chunk.total_size, chunk.digest) != (t.count, t.total, t.digest):
                self._reject(chunk, sender_from_topic,
                             f"inconsistent with earlier chunks (count {t.count}, size {t.total}, digest {t.digest[:12]})")
                return None
            assert t.buf is not None and t.count is not None
            if not 0 <= chunk.index < t.count:
                self._reject(chunk, sender_from_topic, f"index out of range [0, {t.count})")
                return None
            n = len(chunk.data)
            if n != t.expected_len(chunk.index):
                self._reject(chunk, sender_from_topic, f"chunk of {n} bytes, expected {t.expected_len(chunk.index)}")
                return None
            if t.have[chunk.index]:
                self.duplicates += 1
                return None
            off = chunk.index * t.chunk_size
            t.buf[off:off + n] = chunk.data
            t.have[chunk.index] = 1
            t.n_have += 1
            t.last_progress = self._clock()
            if chunk.index == t.hashed_upto:
                t.advance_hash()
            if t.n_have < t.count:
                return None
            t.advance_hash()
            if t.hasher.hexdigest() != t.digest:
                self._reject(chunk, sender_from_topic, "digest mismatch: transfer reset for a resend")
                t.reset()
                return None
            del self._transfers[chunk.transfer_id]
            self._done.append(chunk.transfer_id)
            return t.buf  # type: ignore[return-value] - bytes-like; saves a copy of the whole payload

    def missing(self, transfer_id: str) -> list[int]:
        """Indices still missing (``[0]`` while nothing arrived; ``[]`` for an unknown transfer)."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            return t.missing() if t is not None else []

    def resend_request(self, transfer_id: str, requester: str, idle_s: float = RESEND_IDLE_S) -> ResendRequest | None:
        """The request for ``transfer_id``'s missing chunks once it has stalled, else None.

        Stalled means no new chunk and no request for ``idle_s`` seconds.  Asking on a plain timer instead
        re-queues every chunk still in flight: on a slow uplink each request adds a full copy of the rest of
        the transfer behind the first, and the transfer finishes later with every request."""
        with self._lock:
            t = self._transfers.get(transfer_id)
            now = self._clock()
            if t is None or now - max(t.last_progress, t.asked) < idle_s:
                return None
            missing = t.missing()
            if not missing:
                return None
            t.asked = now
        return ResendRequest(transfer_id=transfer_id, requester=requester, missing=missing[:MAX_MISSING])

    def stalled(self, idle_s: float, started_only: bool = False) -> list[str]:
        """Transfers that made no progress for ``idle_s`` seconds: time to send a ResendRequest.

        ``started_only`` leaves out transfers of which no chunk arrived yet (e.g. the sender is still
        computing the payload)."""
        now = self._clock()
        with self._lock:
            return [tid for tid, t in self._transfers.items()
                    if now - t.last_progress >= idle_s and not (started_only and t.count is None)]

    def expire(self) -> list[str]:
        """Drop transfers idle for longer than ``timeout_s``; return their ids (logged)."""
        now = self._clock()
        with self._lock:
            gone = [tid for tid, t in self._transfers.items() if now - t.last_progress > self.timeout_s]
            for tid in gone:
                t = self._transfers.pop(tid)
                self._log.warning("transfer_expired", transfer=tid, sender=t.sender, received=t.n_have,
                                  count=t.count, idle_s=round(now - t.last_progress, 3))
        return gone

    def status(self, transfer_id: str) -> TransferStatus | None:
        now = self._clock()
        with self._lock:
            t = self._transfers.get(transfer_id)
            if t is None:
                return None
            return TransferStatus(transfer_id, t.sender, t.count, t.n_have, t.total if t.count else None,
                                  now - t.created, now - t.last_progress)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._transfers)


class Outbox:
    """Recently sent transfers (LRU, bounded by payload bytes) to answer ResendRequests; thread-safe.

    The newest transfer is always kept, even when it alone exceeds ``max_bytes``: the payload in flight
    must stay resendable.  Chunks are views into the caller's payload, so storing them costs no copy.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[str, list[Chunk]] = OrderedDict()
        self._bytes = 0

    def add(self, chunks: list[Chunk]) -> None:
        if not chunks:
            return
        tid = chunks[0].transfer_id
        with self._lock:
            old = self._items.pop(tid, None)
            if old is not None:
                self._bytes -= old[0].total_size
            self._items[tid] = chunks
            self._bytes += chunks[0].total_size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped[0].total_size

    def get(self, transfer_id: str, indices: Iterable[int] = ()) -> list[Chunk]:
        """The chunks of ``transfer_id`` at ``indices`` (all when empty); unknown ids/indices give nothing."""
        with self._lock:
            chunks = self._items.get(transfer_id)
            if chunks is None:
                return []
            self._items.move_to_end(transfer_id)
        wanted = sorted(set(indices))
        if not wanted:
            return list(chunks)
        return [chunks[i] for i in wanted if 0 <= i < len(chunks)]

    def __contains__(self, transfer_id: object) -> bool:
        with self._lock:
            return transfer_id in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes
