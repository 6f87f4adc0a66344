"""Telemetry: the jtop adapter against a fake with jtop's real attribute and key names, the psutil fallback,
RAPL energy, the JSON schema operators read, energy integration, and the publisher thread."""

from __future__ import annotations

import json
import time

import pytest

from edge_node.config import TelemetrySettings
from edge_node.telemetry import (
    EnergyMeter,
    JtopProvider,
    ProfileProvider,
    PsutilProvider,
    Sample,
    TelemetryPublisher,
    TelemetryUnavailable,
    integrate,
    make_provider,
)
from shared.messages import RoundTelemetry, Telemetry, decode, encode
from shared.topics import Topics


class FakeNvp:
    name = "MODE_15W_6CORE"


class FakeJtop:
    """Shapes and key names as in jetson-stats 7.2.2 jtop/jtop.py: power (l. 913, mW), cpu (l. 719),
    gpu (l. 855, status.load), memory (l. 612, kB), temperature (l. 960, °C), nvpmodel (l. 419, .name)."""

    def __init__(self, tot_mw: int = 7500):
        self.power = {"rail": {"VDD_CPU_GPU_CV": {"online": True, "type": "INA3221", "volt": 5000, "curr": 600,
                                                  "power": 3000, "avg": 2900},
                               "VDD_SOC": {"online": True, "type": "INA3221", "volt": 5000, "curr": 300,
                                           "power": 1500, "avg": 1400}},
                      "tot": {"online": True, "type": "INA3221", "volt": 5000, "curr": 1500, "power": tot_mw,
                              "avg": 7000, "name": "VDD_IN"}}
        self.cpu = {"total": {"user": 30.0, "nice": 0.0, "system": 10.0, "idle": 60.0}, "cpu": []}
        self.gpu = {"gv11b": {"type": "integrated", "status": {"railgate": False, "tpc_pg_mask": False,
                                                                "3d_scaling": True, "load": 42.5},
                              "freq": {"governor": "nvhost_podgov", "cur": 1100000, "max": 1100000, "min": 0}}}
        self.memory = {"RAM": {"tot": 7_765_000, "used": 2_048_000, "free": 0, "buffers": 0, "cached": 0,
                               "shared": 0, "lfb": 4}, "SWAP": {"tot": 0, "used": 0, "cached": 0}}
        self.temperature = {"cpu": {"online": True, "temp": 48.5}, "gpu": {"online": True, "temp": 46.0},
                            "tj": {"online": False, "temp": -256}}
        self.nvpmodel = FakeNvp()
        self.closed = False

    def close(self):
        self.closed = True


def test_jtop_provider_reads_real_key_names():
    fake = FakeJtop()
    s = JtopProvider(client=fake).sample()
    assert s.power_w == pytest.approx(7.5) and not s.power_estimated
    assert s.rails_w == {"VDD_CPU_GPU_CV": pytest.approx(3.0), "VDD_SOC": pytest.approx(1.5)}
    assert s.cpu_percent == pytest.approx(40.0) and s.gpu_percent == pytest.approx(42.5)
    assert s.ram_used_mb == pytest.approx(2000.0) and s.ram_total_mb == pytest.approx(7765000 / 1024)
    assert s.temperatures_c == {"cpu": 48.5, "gpu": 46.0}  # offline sensor dropped
    assert s.nvpmodel == "MODE_15W_6CORE"


def test_auto_falls_back_to_psutil_with_one_warning_and_jtop_mode_refuses():
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        p = make_provider(TelemetrySettings(provider="auto"))
    assert p.source == "psutil"
    assert [e["event"] for e in logs] == ["telemetry_fallback"]
    with pytest.raises(TelemetryUnavailable):
        make_provider(TelemetrySettings(provider="jtop"))


def test_psutil_fallback_on_this_machine(tmp_path):
    p = PsutilProvider(rapl_root=tmp_path)  # no RAPL here: power is absent, never invented
    p.sample()
    s = p.sample()
    assert s.power_w is None and s.rails_w == {} and not s.power_estimated
    assert 0.0 <= s.cpu_percent <= 100.0 * 64
    assert 0 < s.ram_used_mb < s.ram_total_mb


def test_rapl_counter_gives_measured_power_and_survives_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("100000000\n")  # wraps at 100 J
    (zone / "energy_uj").write_text("90000000\n")
    p = PsutilProvider(rapl_root=tmp_path)
    s0 = p.sample()
    time.sleep(0.2)
    (zone / "energy_uj").write_text("5000000\n")  # 90 J -> wrapped -> 105 J: 15 J spent
    s1 = p.sample()
    assert s1.energy_j - s0.energy_j == pytest.approx(15.0)
    assert s1.power_w == pytest.approx(15.0 / (s1.ts - s0.ts), rel=1e-6)
    assert s1.rails_w == {"rapl": s1.power_w}


def _sample(ts, w, energy=None):
    return Sample(ts=ts, power_w=w, power_estimated=False, rails_w={}, cpu_percent=50.0, gpu_percent=None,
                  ram_used_mb=1.0, ram_total_mb=2.0, temperatures_c={}, energy_j=energy)


def test_energy_integration():
    assert integrate([(0.0, 10.0), (1.0, 10.0), (2.0, 10.0)]) == pytest.approx(20.0)
    assert integrate([(0.0, 0.0), (4.0, 8.0)]) == pytest.approx(16.0)  # ramp
    m = EnergyMeter("n1", "jtop")
    m.begin_round(3, _sample(100.0, 5.0))
    m.add(_sample(101.0, 5.0))
    rt = m.end_round(_sample(102.0, 7.0))
    assert rt.energy_j == pytest.approx(11.0) and rt.avg_power_w == pytest.approx(5.5) and rt.round == 3
    m.begin_round(4, _sample(0.0, 1.0, energy=1000.0))  # a hardware counter wins over the samples
    rt = m.end_round(_sample(10.0, 1.0, energy=1042.0))
    assert rt.energy_j == pytest.approx(42.0) and rt.duration_s == pytest.approx(10.0)
    m.begin_round(5, _sample(0.0, None))
    rt = m.end_round(_sample(1.0, None))
    assert rt.energy_j is None and rt.avg_power_w is None  # nothing measured: nothing reported


def test_publisher_emits_readable_json_and_round_summaries():
    sent = []
    pub = TelemetryPublisher(JtopProvider(client=FakeJtop()), lambda t, p, qos=0: sent.append((t, p)),
                             Topics("fedspine/v1"), "agx-01", interval_s=0.1, sample_s=0.05)
    pub.start()
    pub.set_phase("training", 2)
    pub.meter.begin_round(2)
    time.sleep(0.35)
    summary = pub.meter.end_round()
    pub.stop()
    assert sent and all(t == "fedspine/v1/node/agx-01/telemetry" for t, _ in sent)
    doc = json.loads(sent[-1][1])  # what mosquitto_sub prints: plain JSON
    assert doc["source"] == "jtop" and doc["power_w"] == pytest.approx(7.5) and doc["phase"] == "training"
    assert decode(sent[-1][1], Telemetry).node_id == "agx-01"
    assert isinstance(summary, RoundTelemetry) and summary.samples >= 3
    assert summary.energy_j == pytest.approx(7.5 * summary.duration_s, rel=1e-6)
    assert pub.provider._j.closed


def test_a_simulated_device_publishes_its_power_model_labelled_as_such():
    """``fedspine simulate``: busy watts while training, idle watts otherwise, source "profile", never a reading."""
    sent = []
    pub = TelemetryPublisher(ProfileProvider(busy_w=15.0, idle_w=2.5), lambda t, p, qos=0: sent.append((t, p)),
                             Topics("fedspine/v1"), "tx2-03", interval_s=0.05, sample_s=0.05)
    assert pub.message(pub.sample()).power_w == 2.5  # idle
    pub.set_phase("training", 1)
    msg = decode(encode(pub.message(pub.sample())), Telemetry)
    assert (msg.source, msg.power_w, msg.power_estimated) == ("profile", 15.0, True)
    pub.start()
    time.sleep(0.2)
    pub.stop()
    assert sent and all(json.loads(p)["source"] == "profile" for _, p in sent)
