"""Node telemetry: jtop on a Jetson, a clearly labelled psutil fallback elsewhere, energy per round, publication.

- ``JtopProvider`` reads jetson-stats' ``jtop`` (AGPL-3.0, optional extra ``[jetson]``; imported lazily here
  only): total and per-rail power (``jtop.power['tot'|'rail'][name]['power']``, mW), CPU load
  (``jtop.cpu['total']['idle']``), GPU load (``jtop.gpu[name]['status']['load']``), RAM (``jtop.memory['RAM']``,
  kB), temperatures (``jtop.temperature[name]['temp']``, °C) and the nvpmodel name (``jtop.nvpmodel.name``).
- ``PsutilProvider`` reports CPU, RAM and temperatures with ``source = "psutil"``; power only where the
  kernel measures it (Linux RAPL package energy, ``/sys/class/powercap/intel-rapl:*``), else ``None``.
- ``ProfileProvider`` is a simulated device's power model (busy and idle watts of its tier), ``source = "profile"``.
- ``EnergyMeter`` integrates power over a round (trapezoid over samples, or the provider's energy counter).
- ``TelemetryPublisher`` samples in a daemon thread and publishes JSON ``Telemetry`` on the node's topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edge_node.config import TelemetrySettings
from shared.logs import get_logger
from shared.messages import RoundTelemetry, Telemetry, encode
from shared.topics import Topics


@dataclass(frozen=True)
class Sample:
    ts: float
    power_w: float | None
    power_estimated: bool
    rails_w: dict[str, float]
    cpu_percent: float
    gpu_percent: float | None
    ram_used_mb: float
    ram_total_mb: float
    temperatures_c: dict[str, float]
    nvpmodel: str | None = None
    energy_j: float | None = None  # cumulative energy counter, when the hardware has one


class TelemetryUnavailable(RuntimeError):
    """The requested telemetry source cannot be used on this machine."""


class JtopProvider:
    """jetson-stats' jtop client (needs the jtop service of a Jetson)."""

    source = "jtop"

    def __init__(self, interval_s: float = 0.5, client=None) -> None:
        if client is None:
            try:
                from jtop import JtopException, jtop
            except ImportError as exc:
                raise TelemetryUnavailable("jetson-stats is not installed (pip install 'fedspine-fleet[jetson]')") from exc
            try:
                client = jtop(interval=interval_s)
                client.start()
            except JtopException as exc:
                raise TelemetryUnavailable(f"jtop service not available: {exc}") from exc
        self._j = client

    def sample(self) -> Sample:
        j = self._j
        power = j.power or {}
        rails = {name: rail["power"] / 1000.0 for name, rail in power.get("rail", {}).items()
                 if rail.get("online", True) and "power" in rail}
        tot = power.get("tot", {}).get("power")
        cpu_total = j.cpu.get("total", {})
        cpu = 100.0 - float(cpu_total["idle"]) if "idle" in cpu_total else 0.0
        gpus = list(j.gpu.values()) if j.gpu else []
        gpu = float(gpus[0]["status"]["load"]) if gpus else None
        ram = j.memory.get("RAM", {})
        temps = {name: float(t["temp"]) for name, t in (j.temperature or {}).items()
                 if t.get("online", True) and t.get("temp", -256) > -256}
        nvp = getattr(j.nvpmodel, "name", None) if j.nvpmodel is not None else None
        return Sample(ts=time.time(), power_w=tot / 1000.0 if tot is not None else None, power_estimated=False,
                      rails_w=rails, cpu_percent=cpu, gpu_percent=gpu, ram_used_mb=ram.get("used", 0) / 1024.0,
                      ram_total_mb=ram.get("tot", 0) / 1024.0, temperatures_c=temps,
                      nvpmodel=str(nvp) if nvp is not None else None)

    def close(self) -> None:
        try:
            self._j.close()
        except Exception:  # noqa: BLE001 - closing a dead service connection
            pass


class PsutilProvider:
    """Fallback for machines without jtop: what psutil and the kernel can measure, honestly labelled."""

    source = "psutil"

    def __init__(self, rapl_root: str | Path = "/sys/class/powercap") -> None:
        self._rapl = self._find_rapl(Path(rapl_root))
        self._last: tuple[float, float] | None = None  # (ts, cumulative J) of the previous sample
        self._offset = 0.0  # accumulated wrap-arounds of the RAPL counter
        self._prev_raw: float | None = None
        psutil.cpu_percent(None)  # prime the counter

    @staticmethod
    def _find_rapl(root: Path) -> tuple[Path, float] | None:
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue  # sub-zones (core, uncore) are inside the package
            energy, rng = zone / "energy_uj", zone / "max_energy_range_uj"
            try:
                int(energy.read_text())
                return energy, float(rng.read_text()) / 1e6 if rng.exists() else float("inf")
            except (OSError, ValueError):
                continue
        return None

    def _energy(self) -> float | None:
        if self._rapl is None:
            return None
        path, wrap = self._rapl
        try:
            raw = int(path.read_text()) / 1e6
        except (OSError, ValueError):
            return None
        if self._prev_raw is not None and raw < self._prev_raw:
            self._offset += wrap
        self._prev_raw = raw
        return raw + self._offset

    def sample(self) -> Sample:
        now = time.time()
        energy = self._energy()
        power = None
        if energy is not None and self._last is not None and now > self._last[0]:
            power = (energy - self._last[1]) / (now - self._last[0])
        if energy is not None:
            self._last = (now, energy)
        vm = psutil.virtual_memory()
        temps: dict[str, float] = {}
        try:
            for name, entries in (psutil.sensors_temperatures() or {}).items():
                for i, e in enumerate(entries):
                    temps[f"{name}{'' if len(entries) == 1 else i}"] = float(e.current)
        except (AttributeError, OSError):
            pass
        return Sample(ts=now, power_w=power, power_estimated=False, rails_w={"rapl": power} if power is not None else {},
                      cpu_percent=float(psutil.cpu_percent(None)), gpu_percent=None,
                      ram_used_mb=(vm.total - vm.available) / 2**20, ram_total_mb=vm.total / 2**20,
                      temperatures_c=temps, energy_j=energy)

    def close(self) -> None:
        pass


class ProfileProvider(PsutilProvider):
    """A simulated device's power model (``fedspine simulate``): ``busy_w`` while it trains, ``idle_w`` otherwise,
    labelled ``source = "profile"`` and ``power_estimated`` so that nobody mistakes it for a measurement.  CPU, RAM
    and temperatures are the host's, as psutil reads them."""

    source = "profile"

    def __init__(self, busy_w: float, idle_w: float) -> None:
        super().__init__(rapl_root="/nonexistent")
        self.busy_w, self.idle_w, self.phase = busy_w, idle_w, "idle"

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def sample(self) -> Sample:
        power = self.busy_w if self.phase == "training" else self.idle_w
        host = super().sample()
        return Sample(ts=host.ts, power_w=power, power_estimated=True, rails_w={}, cpu_percent=host.cpu_percent,
                      gpu_percent=None, ram_used_mb=host.ram_used_mb, ram_total_mb=host.ram_total_mb,
                      temperatures_c=host.temperatures_c)


def make_provider(settings: TelemetrySettings, log=None):
    """``auto``: jtop when its service answers, else psutil with one warning; ``jtop`` insists; ``psutil`` forces."""
    log = log or get_logger("telemetry")
    if settings.provider in ("auto", "jtop"):
        try:
            return JtopProvider(interval_s=min(settings.interval_s, 1.0))
        except TelemetryUnavailable as exc:
            if settings.provider == "jtop":
                raise
            log.warning("telemetry_fallback", source="psutil", reason=str(exc),
                        hint="power is reported only where the kernel measures it (RAPL); install the jtop "
                             "service on Jetsons")
    return PsutilProvider()


def integrate(points: list[tuple[float, float]]) -> float:
    """Energy in joules of a power trace [(t seconds, P watts)] by the trapezoid rule."""
    return sum((t1 - t0) * (p0 + p1) / 2.0 for (t0, p0), (t1, p1) in zip(points, points[1:], strict=False))


@dataclass
class EnergyMeter:
    """Accumulates the samples of one round and summarises them as ``RoundTelemetry``."""

    node_id: str
    source: str
    round: int = -1
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    active: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_round(self, rnd: int, first: Sample | None = None) -> None:
        with self._lock:
            self.round, self.samples, self.started, self.active = rnd, [first] if first else [], time.time(), True

    def add(self, s: Sample) -> None:
        with self._lock:
            if self.active:
                self.samples.append(s)

    def end_round(self, last: Sample | None = None) -> RoundTelemetry:
        with self._lock:
            if last is not None:
                self.samples.append(last)
            self.active = False
            samples = list(self.samples)
        duration = (samples[-1].ts - samples[0].ts) if len(samples) > 1 else max(time.time() - self.started, 0.0)
        counters = [s.energy_j for s in samples if s.energy_j is not None]
        powered = [(s.ts, s.power_w) for s in samples if s.power_w is not None]
        energy = None
        if len(counters) >= 2:
            energy = counters[-1] - counters[0]  # a hardware energy counter beats integrating samples
        elif len(powered) >= 2:
            energy = integrate(powered)
        avg_power = energy / duration if energy is not None and duration > 0 else (
            powered[0][1] if len(powered) == 1 else None)
        gpu = [s.gpu_percent for s in samples if s.gpu_percent is not None]
        return RoundTelemetry(
            node_id=self.node_id, round=max(self.round, 0), source=self.source, duration_s=duration,
            energy_j=max(energy, 0.0) if energy is not None else None, avg_power_w=avg_power,
            power_estimated=any(s.power_estimated for s in samples),
            avg_cpu_percent=sum(s.cpu_percent for s in samples) / len(samples) if samples else 0.0,
            avg_gpu_percent=sum(gpu) / len(gpu) if gpu else None, samples=len(samples),
        )


class TelemetryPublisher:
    """Samples the provider in a daemon thread; publishes JSON telemetry every ``interval_s``; feeds the meter."""

    def __init__(self, provider, publish: Callable[..., None], topics: Topics, node_id: str, interval_s: float = 5.0,
                 log=None, sample_s: float = 0.5) -> None:
        self.provider, self._publish, self.topics, self.node_id = provider, publish, topics, node_id
        self.interval_s, self.sample_s = interval_s, min(sample_s, interval_s)
        self.log = log or get_logger("telemetry", node_id=node_id)
        self.meter = _Meter(self)
        self._phase, self._round = "idle", -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the sampler thread and the round edges share the provider

    def sample(self) -> Sample:
        with self._lock:
            return self.provider.sample()

    @property
    def source(self) -> str:
        return self.provider.source

    def set_phase(self, phase: str, rnd: int) -> None:
        self._phase, self._round = phase, rnd
        if hasattr(self.provider, "set_phase"):  # a simulated device's power model follows the phase
            self.provider.set_phase(phase)

    def message(self, s: Sample) -> Telemetry:
        return Telemetry(node_id=self.node_id, ts=s.ts, source=self.provider.source, power_w=s.power_w,
                         power_estimated=s.power_estimated, rails_w=s.rails_w, cpu_percent=min(s.cpu_percent, 100.0),
                         gpu_percent=s.gpu_percent, ram_used_mb=s.ram_used_mb, ram_total_mb=s.ram_total_mb,
                         temperatures_c=dict(list(s.temperatures_c.items())[:32]), nvpmodel=s.nvpmodel,
                         round=self._round, phase=self._phase)

    def _loop(self) -> None:
        next_pub = 0.0
        while not self._stop.is_set():
            try:
                s = self.sample()
                self.meter.inner.add(s)
                if time.monotonic() >= next_pub:
                    next_pub = time.monotonic() + self.interval_s
                    self._publish(self.topics.node(self.node_id, "telemetry"), encode(self.message(s)), qos=0)
            except Exception:  # noqa: BLE001 - telemetry must never take the node down
                self.log.exception("telemetry_sample_failed")
            self._stop.wait(self.sample_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.provider.close()


class _Meter:
    """The publisher's meter: takes a sample at the round's edges so short rounds are integrated too."""

    def __init__(self, pub: TelemetryPublisher) -> None:
        self.pub = pub
        self.inner = EnergyMeter(pub.node_id, pub.provider.source)

    def begin_round(self, rnd: int) -> None:
        self.inner.begin_round(rnd, self.pub.sample())

    def end_round(self) -> RoundTelemetry:
        return self.inner.end_round(self.pub.sample())
