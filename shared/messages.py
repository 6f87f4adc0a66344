"""Every message on the wire as a frozen, self-validating dataclass, and the one codec that (de)serialises them.

Wire form: a map ``{"type": <TYPE>, "v": <schema version>, <field>: <value>, ...}``.  Telemetry and
presence (``WIRE = "json"``) are UTF-8 JSON so ``mosquitto_sub`` shows them as text; control messages and
chunks (``WIRE = "msgpack"``) are msgpack, with chunk data as msgpack ``bin`` (no base64, no pickle).

``decode`` is the only way network bytes become messages; it raises one exception type, ``ProtocolError``,
whose text names the offending field and value.  Validation lives in ``__post_init__`` so an invalid
message cannot be built locally either.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import msgpack

from shared.topics import TopicError, check_node_id

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024 + 64 * 1024  # the largest chunk BrokerConfig allows, plus the envelope
MAX_CHUNK_DATA = 8 * 1024 * 1024
MAX_STR = 256
MAX_ERROR_STR = 2048
MAX_MAP_ITEMS = 64
MAX_MISSING = 65536
MAX_CHUNKS = 1 << 20
MAX_TOTAL_SIZE = 1 << 40
_TRANSFER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_BIG = 1e12

M = TypeVar("M", bound="Message")


class ProtocolError(ValueError):
    """A message that is malformed, of the wrong type or version, oversize or out of range."""


def spec(default: Any = MISSING, *, lo: float | None = None, hi: float | None = None, choices: tuple = (),
         max_len: int = MAX_STR, check: str = "", factory: Any = MISSING) -> Any:
    """A dataclass field with its validation rules (bounds, allowed values, length, special check)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "max_len": max_len, "check": check}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _fail(cls: type, name: str, value: Any, why: str) -> ProtocolError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return ProtocolError(f"{cls.__name__}.{name}: {why} (got {text})")


def _check_number(cls: type, name: str, value: Any, meta: dict, kind: str) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(cls, name, value, "must be an integer")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(cls, name, value, "must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise _fail(cls, name, value, "must be finite")
    lo, hi = meta["lo"], meta["hi"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _fail(cls, name, value, f"outside [{lo}, {hi}]")
    return value


def _check_str(cls: type, name: str, value: Any, meta: dict) -> str:
    if not isinstance(value, str):
        raise _fail(cls, name, value, "must be a string")
    if len(value) > meta["max_len"]:
        raise _fail(cls, name, value, f"longer than {meta['max_len']} characters")
    if meta["choices"] and value not in meta["choices"]:
        raise _fail(cls, name, value, f"must be one of {list(meta['choices'])}")
    check = meta["check"]
    if check == "node_id":
        try:
            check_node_id(value)
        except TopicError as exc:
            raise _fail(cls, name, value, str(exc)) from None
    elif check == "transfer_id" and not _TRANSFER_RE.match(value):
        raise _fail(cls, name, value, "must be 1-200 of [A-Za-z0-9_.:-]")
    elif check == "digest" and not _DIGEST_RE.match(value):
        raise _fail(cls, name, value, "must be a sha256 digest in lowercase hex")
    return value


def _check_field(cls: type, name: str, value: Any, kind: str, meta: dict) -> Any:
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in ("int", "float"):
        return _check_number(cls, name, value, meta, kind)
    if kind == "str":
        return _check_str(cls, name, value, meta)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(cls, name, value, "must be true or false")
        return value
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _fail(cls, name, value, "must be bytes")
        if len(value) > meta["max_len"]:
            raise _fail(cls, name, f"<{len(value)} bytes>", f"longer than {meta['max_len']} bytes")
        return value
    if kind in ("map", "intmap"):  # dict[str, float] / dict[str, int] (keys: up to MAX_STR characters for intmap)
        if not isinstance(value, dict):
            raise _fail(cls, name, value, f"must be a map of name -> {'number' if kind == 'map' else 'integer'}")
        if len(value) > MAX_MAP_ITEMS:
            raise _fail(cls, name, f"<{len(value)} items>", f"more than {MAX_MAP_ITEMS} items")
        out = {}
        key_len = 64 if kind == "map" else MAX_STR
        for k, x in value.items():
            if not isinstance(k, str) or not 0 < len(k) <= key_len:
                raise _fail(cls, name, k, f"keys must be strings of 1-{key_len} characters")
            out[k] = _check_number(cls, f"{name}[{k!r}]", x, meta, "float" if kind == "map" else "int")
        return out
    if kind in ("ints", "strs"):  # list[int] / list[str]: max_len bounds the items (a string: MAX_STR characters)
        if not isinstance(value, (list, tuple)):
            raise _fail(cls, name, value, f"must be a list of {'integers' if kind == 'ints' else 'strings'}")
        if len(value) > meta["max_len"]:
            raise _fail(cls, name, f"<{len(value)} items>", f"more than {meta['max_len']} items")
        if kind == "ints":
            return [_check_number(cls, f"{name}[{i}]", x, meta, "int") for i, x in enumerate(value)]
        item = {"max_len": MAX_STR, "choices": (), "check": ""}
        return [_check_str(cls, f"{name}[{i}]", x, item) for i, x in enumerate(value)]
    raise AssertionError(f"unsupported field kind {kind}")  # pragma: no cover - guarded at import


_KINDS = {"str": "str", "str | None": "str?", "int": "int", "int | None": "int?", "float": "float",
          "float | None": "float?", "bool": "bool", "bytes": "bytes", "dict[str, float]": "map",
          "dict[str, int]": "intmap", "list[int]": "ints",
          "list[str]": "strs"}


@dataclass(frozen=True)
class Message:
    """Base of every wire message: ``TYPE`` tags it, ``WIRE`` picks JSON or msgpack, ``v`` is the schema."""

    TYPE: ClassVar[str] = ""
    WIRE: ClassVar[str] = "msgpack"
    _schema: ClassVar[tuple[tuple[str, str, dict], ...]] = ()
    _checks: ClassVar[tuple[tuple[str, Any], ...]] = ()  # (field, validator) compiled from _schema

    v: int = field(default=SCHEMA_VERSION, kw_only=True)

    def __post_init__(self) -> None:
        cls = type(self)
        if self.v != SCHEMA_VERSION or isinstance(self.v, bool):
            raise _fail(cls, "v", self.v, f"unsupported schema version, this build speaks {SCHEMA_VERSION}")
        for name, check in cls._checks:
            value = getattr(self, name)
            checked = check(value)
            if checked is not value:
                object.__setattr__(self, name, checked)  # int -> float, tuple -> list, fresh dicts
        self._check()

    def _check(self) -> None:
        """Cross-field rules; subclasses override."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "v": self.v}
        for name, _, _ in self._schema:
            out[name] = getattr(self, name)
        return out


MESSAGE_TYPES: dict[str, type[Message]] = {}


def _compile(cls: type, name: str, kind: str, meta: dict) -> Any:
    """A field's validator: a fast path that passes values ``_check_field`` would return unchanged (a finite float in
    range, a non-bool int in range, a plain string within bounds), and ``_check_field`` for the rest, which converts
    or raises.  Messages are validated on every send and receive: at 20,000 nodes a round this is the hot path."""
    slow = lambda v: _check_field(cls, name, v, kind, meta)  # noqa: E731
    lo = meta["lo"] if meta["lo"] is not None else -math.inf
    hi = meta["hi"] if meta["hi"] is not None else math.inf
    if kind in ("float", "float?"):
        def check(v):
            return v if type(v) is float and v - v == 0.0 and lo <= v <= hi else slow(v)
    elif kind in ("int", "int?"):
        def check(v):
            return v if type(v) is int and lo <= v <= hi else slow(v)
    elif kind in ("str", "str?") and not meta["check"]:
        max_len, choices = meta["max_len"], meta["choices"]

        def check(v):
            return v if type(v) is str and len(v) <= max_len and (not choices or v in choices) else slow(v)
    else:
        check = slow
    return check


def message(cls: type[M]) -> type[M]:
    """Class decorator: make ``cls`` a frozen dataclass, compile its schema and register its TYPE."""
    cls = dataclass(frozen=True)(cls)
    schema = []
    for f in fields(cls):
        if f.name == "v":
            continue
        kind = _KINDS.get(str(f.type))
        if kind is None:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported annotation {f.type!r}")
        meta = dict(f.metadata) or {"lo": None, "hi": None, "choices": (), "max_len": MAX_STR, "check": ""}
        schema.append((f.name, kind, meta))
    cls._schema = tuple(schema)
    cls._checks = tuple((name, _compile(cls, name, kind, meta)) for name, kind, meta in schema)
    if not cls.TYPE or cls.TYPE in MESSAGE_TYPES or cls.WIRE not in ("json", "msgpack"):
        raise TypeError(f"{cls.__name__}: TYPE must be unique and WIRE json or msgpack")
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


# ---- common field specs ---------------------------------------------------------------------------------
def _node_id() -> Any:
    return spec(check="node_id", max_len=64)


def _ts() -> Any:
    return spec(lo=0.0, hi=1e11)


def _round(default: Any = MISSING) -> Any:
    return spec(default, lo=-1, hi=10**9)


def _count(default: Any = MISSING) -> Any:
    return spec(default, lo=0, hi=_BIG)


def _frac(default: Any = MISSING) -> Any:
    return spec(default, lo=0.0, hi=1.0)


def _seconds(default: Any = MISSING) -> Any:
    return spec(default, lo=0.0, hi=1e9)


def _percent() -> Any:
    return spec(lo=0.0, hi=1e4)


def _watts(default: Any = MISSING) -> Any:
    return spec(default, lo=0.0, hi=1e5)


def _slowest() -> Any:
    """Up to two (node id -> seconds): a (sub-)fleet's two slowest completion times (FedSpine under regions)."""
    return spec(lo=0.0, hi=1e9, factory=dict)


def _check_slowest(cls: type, name: str, value: dict[str, float]) -> None:
    if len(value) > 2:
        raise _fail(cls, name, f"<{len(value)} items>", "more than the two slowest")
    for k in value:
        _check_str(cls, f"{name} key", k, {"max_len": 64, "choices": (), "check": "node_id"})


# ---- presence and telemetry (JSON) ----------------------------------------------------------------------
@message
class NodeStatus(Message):
    TYPE = "node_status"
    WIRE = "json"
    node_id: str = _node_id()
    state: str = spec(choices=("online", "offline"))
    ts: float = _ts()
    device_type: str = spec("")
    model_id: str = spec("")
    memory_mb: int = _count(0)
    software_version: str = spec("")
    sparsity: float = _frac(0.0)
    round: int = _round(-1)
    telemetry_source: str = spec("")
    # Measured before joining (on a simulated device: on its virtual clock): seconds per local training step and
    # of a round's work outside the steps, and the sparsity the steps ran at.  The coordinator sizes round 1's
    # local steps with them; 0 = unknown.
    step_s: float = _seconds(0.0)
    overhead_s: float = _seconds(0.0)
    step_sparsity: float = _frac(0.0)
    # The class names of its classification head, in order (empty for a causal LM): every node of a fleet must
    # have the same list, or their heads' rows would be averaged across different classes.
    labels: list[str] = spec(factory=list, max_len=1024)
    # SHA-256 of its base model's config and weight files (edge_node.model.base_model_digest; None: unknown):
    # every node of a fleet must train on the same base weights, or the LoRA updates averaged mean nothing.
    base_model: str | None = spec(None, check="digest")
    # Its last test accuracy (the round's, on its [train] test_batches; None: none yet, or no test file), so that a
    # monitor started later, or a node gone offline, still shows it from the retained presence.
    test_accuracy: float | None = spec(None, lo=0.0, hi=1.0)


@message
class CoordinatorStatus(Message):
    TYPE = "coordinator_status"
    WIRE = "json"
    state: str = spec(choices=("online", "offline", "finished"))
    ts: float = _ts()
    run_id: str = spec("", max_len=64)
    round: int = _round(-1)
    method: str = spec("", max_len=64)


@message
class Telemetry(Message):
    TYPE = "telemetry"
    WIRE = "json"
    node_id: str = _node_id()
    ts: float = _ts()
    source: str = spec(choices=("jtop", "psutil", "profile"))  # profile: a simulated device's power model
    power_w: float | None = _watts()
    power_estimated: bool = spec()
    rails_w: dict[str, float] = _watts()
    cpu_percent: float = _percent()
    gpu_percent: float | None = _percent()
    ram_used_mb: float = spec(lo=0.0, hi=1e9)
    ram_total_mb: float = spec(lo=0.0, hi=1e9)
    temperatures_c: dict[str, float] = spec(lo=-273.15, hi=1000.0)
    nvpmodel: str | None = spec(None, max_len=64)
    round: int = _round(-1)
    phase: str = spec("idle", max_len=32)


@message
class RoundTelemetry(Message):
    TYPE = "round_telemetry"
    WIRE = "json"
    node_id: str = _node_id()
    round: int = _round()
    source: str = spec(max_len=32)
    duration_s: float = _seconds()
    energy_j: float | None = spec(lo=0.0, hi=_BIG)
    avg_power_w: float | None = _watts()
    power_estimated: bool = spec()
    avg_cpu_percent: float = _percent()
    avg_gpu_percent: float | None = _percent()
    samples: int = _count()


# ---- control (msgpack) ----------------------------------------------------------------------------------
@message
class RoundConfig(Message):
    TYPE = "round_config"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    target_sparsity: float = spec(lo=0.0, hi=0.999999)
    rank: int = spec(lo=1, hi=4096)
    local_steps: int = spec(lo=0, hi=10**7)  # 0: apply the global update and evaluate only (final sync)
    deadline_ts: float = _ts()
    upload_transfer_id: str = spec(check="transfer_id")
    download_transfer_id: str | None = spec(check="transfer_id")
    # Track LoRA-guided importance during the local steps and report it (the node will still be cut; a method
    # that never prunes does not pay for the scores).  A cut (target_sparsity above the node's) comes before the
    # steps, ranked by the fleet's averaged importance that the global slice carries.
    importance: bool = spec(True)
    # A paced round (aligned steps): instead of exactly local_steps (the plan), run at least min_steps and at most
    # max_steps, stopping at the step boundary nearest finish_s, the round's planned completion time in seconds on
    # the node's round clock (from this config's arrival; virtual on a simulated device).
    finish_s: float | None = spec(None, lo=0.0, hi=1e7)
    min_steps: int = spec(0, lo=0, hi=10**7)
    max_steps: int = spec(0, lo=0, hi=10**7)

    def _check(self) -> None:
        if self.finish_s is not None and not 1 <= self.min_steps <= self.local_steps <= self.max_steps:
            raise _fail(type(self), "local_steps", self.local_steps,
                        f"a paced round needs 1 <= min_steps ({self.min_steps}) <= local_steps <= max_steps ({self.max_steps})")
        if self.finish_s is None and (self.min_steps or self.max_steps):
            raise _fail(type(self), "finish_s", None, "min_steps and max_steps need finish_s")

    def steps_error(self, steps: int) -> str:
        """Why a node that ran ``steps`` local steps did not answer this config ("" if it did): paced, it may run
        min_steps to max_steps; otherwise exactly local_steps.  The steps weight its change in the aggregate."""
        if self.finish_s is not None:
            ok, assigned = self.min_steps <= steps <= self.max_steps, f"{self.min_steps}-{self.max_steps}"
        else:
            ok, assigned = steps == self.local_steps, str(self.local_steps)
        return "" if ok else f"ran {steps} local steps, not the assigned {assigned}"


@message
class RoundReport(Message):
    TYPE = "round_report"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    node_id: str = _node_id()
    status: str = spec(choices=("ok", "oom", "error"))
    error: str = spec("", max_len=MAX_ERROR_STR)
    transfer_id: str = spec("", max_len=200)
    upload_bytes: int = _count(0)
    loss_start: float = spec(0.0, lo=-_BIG, hi=_BIG)
    loss_end: float = spec(0.0, lo=-_BIG, hi=_BIG)
    samples: int = _count(0)
    steps: int = _count(0)  # local steps run (0: not reported; the assigned local_steps)
    examples: int = _count(0)  # size of the node's local training set (the aggregation weight)
    compute_s: float = _seconds(0.0)
    train_s: float = _seconds(0.0)  # the local steps' share of the round time, on the same clock as virtual_s/wall
    upload_s: float = _seconds(0.0)  # the upload's share of the round time, on the same clock
    virtual_s: float = _seconds(0.0)
    sparsity: float = _frac(0.0)
    rank: int = spec(0, lo=0, hi=4096)
    energy_j: float | None = spec(None, lo=0.0, hi=_BIG)
    avg_power_w: float | None = _watts(None)
    power_source: str = spec("", max_len=32)
    metrics: dict[str, float] = spec(lo=-_BIG, hi=_BIG, factory=dict)
    peak_memory_mb: float = spec(0.0, lo=0.0, hi=1e9)
    # the final sync's evaluation (local_steps 0): sent as round N + 1, a round of its own on the wire; logs, the
    # monitor and the metrics show it as round N, whose aggregate it evaluates
    final: bool = spec(False)


@message
class ExportReport(Message):
    TYPE = "export_report"
    run_id: str = spec(max_len=64)
    node_id: str = _node_id()
    status: str = spec(choices=("ok", "oom", "error", "skipped"))
    error: str = spec("", max_len=MAX_ERROR_STR)
    path: str = spec("", max_len=1024)
    size_bytes: int = _count(0)
    params: int = _count(0)
    sparsity: float = _frac(0.0)
    latency_ms: float = _seconds(0.0)
    metrics: dict[str, float] = spec(lo=-_BIG, hi=_BIG, factory=dict)


@message
class NodeRefused(Message):
    """The coordinator's (or a region's) word to a node it leaves out of the fleet's rounds, on the node's config
    topic: why (its labels or base model differ from the fleet's, ``FleetIdentity``) and what to do.  The node logs
    it (``refused_by_coordinator``, error) on its own host and stays up."""

    TYPE = "node_refused"
    node_id: str = _node_id()
    reason: str = spec(max_len=500)
    hint: str = spec("", max_len=500)


@message
class Command(Message):
    TYPE = "command"
    command: str = spec(choices=("export", "stop"))
    run_id: str = spec(max_len=64)
    round: int = _round(-1)


# ---- regional aggregation (coordinator/region.py) -------------------------------------------------------
@message
class RegionStatus(Message):
    """Presence of a regional aggregator (retained; last will: offline): the root derives its regions from these."""

    TYPE = "region_status"
    WIRE = "json"
    region_id: str = _node_id()
    state: str = spec(choices=("online", "offline"))
    ts: float = _ts()
    nodes: int = _count(0)  # live nodes of its sub-fleet


@message
class RegionRound(Message):
    """The root's round for one region: the assignment it relays to each of its nodes (the strategy's fleet-wide
    schedule: target sparsity, rank, τ steps), the global state it sends (chunked on the region's download topic;
    None while there is none) and the transfer id of its partial.  ``local_steps`` 0 is the final sync: the region
    relays it to its nodes, reports how many took part and sends no partial.

    Pacing: ``finish_s`` is the fleet's planned finish (the latest slowest completion its regions reported for this
    plan, as ``next_finish_s`` with their previous round or, where the root had none for the plan, in a RegionPlan
    answering its RegionPlanQuery just before this round; None: every node runs τ steps unpaced), to which the
    region aligns and paces each node with a timing.  ``next_target_sparsity`` and ``next_rank`` are the next
    round's schedule as far as the root knows it now: the region answers with its nodes' slowest completion at τ
    steps under it (``RegionReport.next_finish_s``), so a steady-state round needs no query.

    HetLoRA: ``tier_ranks`` gives each device tier its rank (the node's presence names its tier, ``device_type``; a
    tier the table does not name trains at ``rank``, likewise ``next_rank``: ``rank_for``), and a node is sent the
    slice at ``sent_rank`` or its own rank if higher.  ``zero_pad_rank`` set: the global state is zero-padded factors
    (``ZeroPadLora``) and the partial sums the nodes' factors padded to that rank; None: the mask-aware average.

    Identity: ``labels`` and ``base_model`` are the fleet's (the root's ``FleetIdentity``: pinned, or adopted from
    the first node or region report; empty/None: not known yet), as NodeStatus's fields.  The region refuses any of
    its nodes whose presence disagrees (``node_refused_labels``/``node_refused_base_model``), so no two identities are
    ever averaged; a key the root does not know yet the region adopts provisionally from its first node.

    ``per_node``: the method's policy is per node (FedSpine) and the region runs it for its own nodes: each node gets
    the configuration the region chose for this round and attempt when it answered the RegionPlanQuery of stage
    ``choose`` (``target_sparsity`` and ``rank`` are then unused; ``sent_rank`` is the deployed rank); the final sync
    sends each node its last target at the deployed rank."""

    TYPE = "region_round"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    target_sparsity: float = spec(lo=0.0, hi=0.999999)
    rank: int = spec(lo=1, hi=4096)
    sent_rank: int = spec(lo=1, hi=4096)  # rank of the slice each node is sent (it trains from the first `rank`)
    local_steps: int = spec(lo=0, hi=10**7)  # 0: the final sync (apply the global state and evaluate only)
    deadline_ts: float = _ts()
    upload_transfer_id: str = spec(check="transfer_id")
    download_transfer_id: str | None = spec(check="transfer_id")
    importance: bool = spec(True)  # the nodes track importance during the steps (they will still be cut)
    attempt: int = spec(0, lo=0, hi=10**6)  # the root's try of this round: names the region's node transfers
    finish_s: float | None = spec(None, lo=0.0, hi=1e7)  # seconds on each node's round clock, as RoundConfig's
    next_target_sparsity: float | None = spec(None, lo=0.0, hi=0.999999)
    next_rank: int | None = spec(None, lo=1, hi=4096)
    tier_ranks: dict[str, int] = spec(lo=1, hi=4096, factory=dict)  # device tier -> its LoRA rank (HetLoRA)
    zero_pad_rank: int | None = spec(None, lo=1, hi=4096)
    labels: list[str] = spec(factory=list, max_len=1024)  # the fleet's class names, in order (empty: not known)
    base_model: str | None = spec(None, check="digest")  # the fleet's base model digest (None: not known)
    per_node: bool = spec(False)

    def _check(self) -> None:
        if self.sent_rank < self.rank:
            raise _fail(type(self), "sent_rank", self.sent_rank, f"must be >= rank {self.rank}")
        if self.zero_pad_rank is not None and self.zero_pad_rank < max([self.rank, *self.tier_ranks.values()]):
            raise _fail(type(self), "zero_pad_rank", self.zero_pad_rank, "must be >= rank and every tier's rank")
        if self.finish_s is not None and self.local_steps == 0:
            raise _fail(type(self), "finish_s", self.finish_s, "the final sync (local_steps 0) is not paced")
        if (self.next_target_sparsity is None) != (self.next_rank is None):
            raise _fail(type(self), "next_rank", self.next_rank, "needs next_target_sparsity, and the other way")

    def rank_for(self, tier: str, rank: int | None = None) -> int:
        """The LoRA rank a node of device tier ``tier`` trains at: its tier's, else ``rank`` (default: this round's)."""
        return self.tier_ranks.get(tier, self.rank if rank is None else rank)


@message
class RegionReport(Message):
    """A region's answer to a RegionRound: how many of its nodes its partial aggregates (status ok), or why none.

    ``labels`` and ``base_model``: the identity the region held for the round (the root's, or where the root had
    none, the one it adopted provisionally from its first node).  The root adopts the first one reported (regions in
    id order) and refuses the partial of a region whose identity disagrees with the fleet's
    (``region_refused_labels``/``region_refused_base_model``).

    A per-node round's statistics of the region's accepted nodes (coordinator/reward.py ``RoundStats``, sent where
    ``slowest`` is not empty): the best relative loss reduction (floored at 0), the largest update importance, the
    lowest energy per sample (None unless every node reported energy) and the two slowest modelled completion times.
    The root merges those of the regions it aggregated and sends them back with the next round's query."""

    TYPE = "region_report"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    region_id: str = _node_id()
    status: str = spec(choices=("ok", "error"))
    error: str = spec("", max_len=MAX_ERROR_STR)
    transfer_id: str = spec("", max_len=200)
    upload_bytes: int = _count(0)
    accepted: int = _count(0)
    failed: int = _count(0)
    cpu_s: float = _seconds(0.0)  # the region's CPU time for the round
    # Its live nodes' slowest completion at τ steps under the RegionRound's next_target_sparsity and next_rank
    # (planning.round_finish; 0: none has a timing; None: not asked): the root paces the next round to the latest.
    # Where the next round's plan turns out to be another (a retry) or the region is new, the root asks instead
    # (RegionPlanQuery / RegionPlan).
    next_finish_s: float | None = spec(None, lo=0.0, hi=1e7)
    labels: list[str] = spec(factory=list, max_len=1024)  # as NodeStatus's (empty: none known)
    base_model: str | None = spec(None, check="digest")  # as NodeStatus's (None: none known)
    best_loss: float = spec(0.0, lo=0.0)
    best_importance: float = spec(0.0, lo=0.0)
    lowest_energy: float | None = spec(None, lo=0.0)
    slowest: dict[str, float] = _slowest()

    def _check(self) -> None:
        _check_slowest(type(self), "slowest", self.slowest)


@message
class RegionPlanQuery(Message):
    """The root's question to a region, on its config topic, before a round whose finish it lacks for that region
    (the first hierarchical round, the first after the region joined, a retried round whose plan is not the one it
    announced): the region's live nodes' slowest completion at ``local_steps`` τ under this plan (``target_sparsity``,
    ``rank``, each tier's rank by ``tier_ranks`` as in RegionRound), answered at once with a RegionPlan.

    A per-node policy (FedSpine) asks in two stages every round.  ``timing``: the two slowest completions at τ of
    the region's live nodes as they are (RegionPlan ``slowest_at_tau``).  ``choose``: the region first learns from
    its nodes' results of round ``learn_round`` if it is one of ``learn_regions`` (whose partials the root
    aggregated), rewarding them against the fleet's statistics of that round (``best_loss`` … ``slowest``, as in
    RegionReport), then chooses and holds each live node's configuration for this round and attempt, with the
    fleet's ``slowest_at_tau`` and ``cut`` (the fleet's averaged importance exists), and answers with its slowest
    completion under them (``finish_s``).  ``learn`` (after the last round, before the final sync): only the
    learning, answered with an empty RegionPlan.  These stages carry the policy's settings, the root's: ``target_sparsity``
    is s*, ``caps`` each tier's s_max (``default`` for the rest), ``ranks`` the rank arms, ``reward`` the reward
    weights, ``total_rounds`` and ``seed``; ``rank`` is the deployed rank."""

    TYPE = "region_plan_query"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    target_sparsity: float = spec(lo=0.0, hi=0.999999)
    rank: int = spec(lo=1, hi=4096)
    local_steps: int = spec(lo=1, hi=10**7)  # τ (the final sync is never paced, so never asked about)
    attempt: int = spec(0, lo=0, hi=10**6)  # the root's try of the round (the answer names it back)
    tier_ranks: dict[str, int] = spec(lo=1, hi=4096, factory=dict)  # device tier -> its LoRA rank (HetLoRA)
    stage: str = spec("finish", choices=("finish", "timing", "choose", "learn"))
    caps: dict[str, float] = spec(lo=0.0, hi=0.999999, factory=dict)
    ranks: list[int] = spec(lo=1, hi=4096, max_len=64, factory=list)
    reward: dict[str, float] = spec(lo=0.0, hi=1e6, factory=dict)
    total_rounds: int = spec(0, lo=0, hi=10**9)
    seed: int = spec(0, lo=-(2**63), hi=2**63 - 1)
    cut: bool = spec(False)
    slowest_at_tau: dict[str, float] = _slowest()
    learn_round: int = spec(0, lo=0, hi=10**9)  # 0: nothing to learn
    learn_regions: list[str] = spec(factory=list, max_len=1024)
    best_loss: float = spec(0.0, lo=0.0)
    best_importance: float = spec(0.0, lo=0.0)
    lowest_energy: float | None = spec(None, lo=0.0)
    slowest: dict[str, float] = _slowest()

    def _check(self) -> None:
        cls = type(self)
        _check_slowest(cls, "slowest_at_tau", self.slowest_at_tau)
        _check_slowest(cls, "slowest", self.slowest)
        for rid in self.learn_regions:
            _check_str(cls, "learn_regions item", rid, {"max_len": 64, "choices": (), "check": "node_id"})
        if self.stage != "finish" and (not self.ranks or self.total_rounds < 1):
            raise _fail(cls, "ranks", self.ranks, f"a per-node stage ({self.stage}) needs the rank arms and total_rounds")

    def rank_for(self, tier: str) -> int:
        """The LoRA rank a node of device tier ``tier`` trains at under this plan (RegionRound's rule)."""
        return self.tier_ranks.get(tier, self.rank)


@message
class RegionPlan(Message):
    """A region's answer to a RegionPlanQuery, on its report topic: its live nodes' slowest completion at τ steps
    under the queried plan (``planning.round_finish``; 0: none has a timing; None: it cannot say), which the root
    paces the round to, as with ``RegionReport.next_finish_s``; to a query of stage ``timing``, ``slowest_at_tau``
    instead (the two slowest completions at τ of its live nodes as they are)."""

    TYPE = "region_plan"
    run_id: str = spec(max_len=64)
    round: int = spec(lo=0, hi=10**9)
    region_id: str = _node_id()
    attempt: int = spec(0, lo=0, hi=10**6)
    finish_s: float | None = spec(None, lo=0.0, hi=1e7)  # seconds on each node's round clock, as RoundConfig's
    slowest_at_tau: dict[str, float] = _slowest()

    def _check(self) -> None:
        _check_slowest(type(self), "slowest_at_tau", self.slowest_at_tau)


@message
class RegionExport(Message):
    """A region's answer to the root's export Command (sent on its config topic): it relayed the command to its
    live nodes and counts their ExportReports by status (``missing``: no report before the deadline)."""

    TYPE = "region_export"
    run_id: str = spec(max_len=64)
    region_id: str = _node_id()
    nodes: int = _count()  # live nodes asked
    ok: int = _count(0)
    skipped: int = _count(0)
    failed: int = _count(0)  # error or oom
    missing: int = _count(0)

    def _check(self) -> None:
        if self.ok + self.skipped + self.failed + self.missing != self.nodes:
            raise _fail(type(self), "nodes", self.nodes, "must equal ok + skipped + failed + missing")


# ---- chunked transfer (msgpack) -------------------------------------------------------------------------
@message
class Chunk(Message):
    TYPE = "chunk"
    transfer_id: str = spec(check="transfer_id")
    sender: str = _node_id()
    index: int = spec(lo=0, hi=MAX_CHUNKS - 1)
    count: int = spec(lo=1, hi=MAX_CHUNKS)
    total_size: int = spec(lo=0, hi=MAX_TOTAL_SIZE)
    digest: str = spec(check="digest")
    data: bytes = spec(max_len=MAX_CHUNK_DATA)

    def _check(self) -> None:
        if self.index >= self.count:
            raise _fail(type(self), "index", self.index, f"must be < count {self.count}")
        if len(self.data) > self.total_size:
            raise _fail(type(self), "data", f"<{len(self.data)} bytes>", f"larger than total_size {self.total_size}")


@message
class ResendRequest(Message):
    """Ask the sender of ``transfer_id`` for the chunks in ``missing`` (an empty list asks for all)."""

    TYPE = "resend_request"
    transfer_id: str = spec(check="transfer_id")
    requester: str = _node_id()
    missing: list[int] = spec(lo=0, hi=MAX_CHUNKS - 1, max_len=MAX_MISSING)


# ---- codec ----------------------------------------------------------------------------------------------
def encode(msg: Message) -> bytes:
    """Serialise ``msg`` in its class's wire format."""
    if not isinstance(msg, Message) or type(msg).TYPE not in MESSAGE_TYPES:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a registered message")
    wire = msg.to_wire()
    if msg.WIRE == "json":
        return json.dumps(wire, allow_nan=False, separators=(",", ":")).encode()
    return msgpack.packb(wire, use_bin_type=True)


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"JSON constant {name} is not allowed (numbers must be finite)")


def _parse(payload: bytes, wire: str, max_bytes: int) -> Any:
    if wire == "json":
        try:
            return json.loads(bytes(payload).decode("utf-8"), parse_constant=_reject_constant)
        except ProtocolError:
            raise
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"malformed JSON: {exc}") from None
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                               max_str_len=min(max_bytes, 1 << 20), max_array_len=2 * MAX_MISSING,
                               max_map_len=1024, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError) as exc:
        raise ProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


_NAMES: dict[type, tuple[frozenset, tuple[str, ...]]] = {}


def _field_names(cls: type[Message]) -> tuple[frozenset, tuple[str, ...]]:
    """(every field name a message of ``cls`` may carry, those it must carry): computed once per class."""
    if cls not in _NAMES:
        _NAMES[cls] = (frozenset(name for name, _, _ in cls._schema) | {"v"},
                       tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING))
    return _NAMES[cls]


def decode(payload: bytes, expected: type[M] | tuple[type, ...], *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse and validate ``payload`` as one of ``expected``; raise ProtocolError for anything else."""
    types = expected if isinstance(expected, tuple) else (expected,)
    if not types or not all(isinstance(t, type) and issubclass(t, Message) for t in types):
        raise TypeError(f"expected must be message classes, got {expected!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if not payload:
        raise ProtocolError("empty payload")
    wires = {t.WIRE for t in types}
    wire = wires.pop() if len(wires) == 1 else ("json" if bytes(payload[:1]) == b"{" else "msgpack")
    data = _parse(payload, wire, max_bytes)
    if not isinstance(data, dict):
        raise ProtocolError(f"message must be a map, got {type(data).__name__}")
    tag = data.pop("type", None)
    by_tag = {t.TYPE: t for t in types}
    cls = by_tag.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"message type {tag!r} is not one of {sorted(by_tag)}")
    if "v" not in data:
        raise ProtocolError(f"{cls.__name__}.v: missing schema version")
    names, required = _field_names(cls)
    if not names.issuperset(data):
        unknown = sorted(str(k) for k in data if k not in names)
        raise ProtocolError(f"{cls.__name__}: unknown field(s) {unknown[:8]}")
    absent = [n for n in required if n not in data]
    if absent:
        raise ProtocolError(f"{cls.__name__}: missing field(s) {absent}")
    try:
        return cls(**data)  # __post_init__ validates every field
    except TypeError as exc:  # pragma: no cover - guarded above
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


def decode_from(payload: bytes, expected: type[M] | tuple[type, ...], *, topic: str, log: Any,
                sender: str | None = None, sender_field: str = "node_id", max_bytes: int = MAX_MESSAGE_BYTES,
                event: str = "message_rejected") -> M | None:
    """``decode`` for network handlers: on any defect log one ``event`` line and return None.

    With ``sender`` (the node id in the topic), the message's ``sender_field`` must name that same node, so a
    client cannot speak for another one even where the broker's ACL would let it through.
    """
    try:
        msg = decode(payload, expected, max_bytes=max_bytes)
        if sender is not None and getattr(msg, sender_field) != sender:
            raise ProtocolError(f"{type(msg).__name__}.{sender_field}: {getattr(msg, sender_field)!r} "
                                f"is not the topic's node {sender!r}")
    except ProtocolError as exc:
        log.warning(event, topic=topic, size=len(payload), error=str(exc))
        return None
    return msg
