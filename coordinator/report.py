"""Results of fleet runs: per-method figures from the coordinators' metrics JSONL, a table and plots.

Virtual time: rounds are synchronous, so a round lasts as long as its slowest accepted node
(``round_time_s``: the node's compute time / profile speed + upload / uplink + latency); the clock is the
sum over rounds.  Compute is the nodes' busy device-seconds (round time less upload); energy is what the nodes
report (on a simulated device its profile's power model: busy watts while computing, idle watts while uploading)
plus idle watts while a node waits for the round's slowest.  Accuracy: every node evaluates the global model
(sliced to its structure) on the held-out test split at the start of each round, i.e. at the end of the previous
one; the final figures come from the nodes' exported, pruned models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean


@dataclass
class MethodResult:
    method: str
    rounds: int = 0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (virtual time s, fleet-mean test accuracy)
    final_accuracy: float | None = None
    final_sparsity: float | None = None
    virtual_time_s: float = 0.0
    wall_time_s: float = 0.0
    idle_fraction: float | None = None  # mean over rounds
    upload_bytes: int = 0
    latency_ms: float | None = None
    params: int | None = None
    time_to_target_s: float | None = None
    per_round_idle: list[float] = field(default_factory=list)
    # step alignment: mean |completion time - planned completion time| / completion time over node-rounds
    plan_error: float | None = None
    # node -> (round, sparsity, rank, local steps, completion time s, planned completion time s or None)
    configs: dict[str, list[tuple[int, float, int, int, float, float | None]]] = field(default_factory=dict)
    start_accuracy: dict[int, float] = field(default_factory=dict)  # round -> fleet-mean accuracy at its start
    # beside each curve point: the fleet's compute (busy device-seconds) and energy (J; None: not measured) before it
    curve_cost: list[tuple[float, float | None]] = field(default_factory=list)
    compute_to_target_s: float | None = None
    energy_to_target_j: float | None = None
    node_sparsity: dict[str, float] = field(default_factory=dict)  # each exported model's sparsity


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a metrics file (a missing file has none; a line cut off mid-write is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def analyse(method: str, metrics_path: Path, idle_w: dict[str, float] | None = None) -> MethodResult:
    return analyse_rows(method, read_rows(metrics_path), idle_w)


def analyse_rows(method: str, rows: list[dict], idle_w: dict[str, float] | None = None) -> MethodResult:
    """``idle_w``: each node's idle power (its device profile), for the energy of waiting; None: energy unknown."""
    nodes = [r for r in rows if r.get("kind") == "node"]
    exports = [r for r in rows if r.get("kind") == "export" and r.get("status") == "ok"]
    res = MethodResult(method=method)
    by_round: dict[int, list[dict]] = {}
    for r in nodes:
        # the final evaluation is stored at the last round with final = true (older files: at round N + 1)
        by_round.setdefault(int(r["round"]) + (1 if r.get("final") else 0), []).append(r)
    clock, compute, energy = 0.0, 0.0, 0.0 if idle_w is not None else None
    for rnd in sorted(by_round):
        ok = [r for r in by_round[rnd] if r.get("status") == "ok"]
        if not ok:
            continue
        accs = [r["m_test_accuracy"] for r in ok if isinstance(r.get("m_test_accuracy"), (int, float))]
        if accs:
            res.curve.append((clock, mean(accs)))  # measured at the start of the round
            res.curve_cost.append((compute, energy))
            res.start_accuracy[rnd] = mean(accs)
        times = [float(r.get("round_time_s", 0.0)) for r in ok]
        slowest = max(times)
        if not all(r.get("eval_only") for r in ok):
            clock += slowest
            compute += sum(max(float(r.get("round_time_s", 0.0)) - float(r.get("upload_s") or 0.0), 0.0) for r in ok)
            if energy is not None:
                if all(isinstance(r.get("energy_j"), (int, float)) and r["node"] in idle_w for r in ok):
                    energy += sum(float(r["energy_j"]) + idle_w[r["node"]] * (slowest - float(r["round_time_s"]))
                                  for r in ok)
                else:
                    energy = None
            res.wall_time_s += max(float(r.get("wall_s", 0.0)) for r in ok)
            idle = mean((slowest - t) / slowest for t in times) if slowest > 0 else 0.0
            res.per_round_idle.append(idle)
            res.rounds += 1
        res.upload_bytes += sum(int(r.get("upload_bytes", 0)) for r in ok)
        for r in ok:
            if not r.get("eval_only"):
                res.configs.setdefault(r["node"], []).append(
                    (rnd, float(r.get("sparsity", 0.0)), int(r.get("rank", 0)), int(r.get("steps") or 0),
                     float(r.get("round_time_s", 0.0)), r.get("planned_s")))
    res.virtual_time_s = clock
    plan_errors = [abs(t - planned) / t for seq in res.configs.values() for *_, t, planned in seq if planned and t > 0]
    res.plan_error = mean(plan_errors) if plan_errors else None
    if res.per_round_idle:
        res.idle_fraction = mean(res.per_round_idle)
    if exports:
        accs = [e["metrics"]["accuracy"] for e in exports if "accuracy" in e.get("metrics", {})]
        res.final_accuracy = mean(accs) if accs else None
        res.final_sparsity = mean(float(e.get("sparsity", 0.0)) for e in exports)
        res.latency_ms = mean(float(e.get("latency_ms", 0.0)) for e in exports)
        res.params = round(mean(int(e.get("params", 0)) for e in exports))
        res.node_sparsity = {e["node"]: float(e.get("sparsity", 0.0)) for e in exports if "node" in e}
    elif res.curve:
        res.final_accuracy = res.curve[-1][1]
    return res


def crossing(curve: list[tuple[float, float]], target: float) -> tuple[int, float] | None:
    """Where the curve first reaches ``target``: (index of the first point at or above it, the fraction of the way
    from the point before, by linear interpolation of the accuracy); None if it never does."""
    for i, (_, a) in enumerate(curve):
        if a >= target:
            if i == 0 or curve[i - 1][1] >= a:
                return i, 1.0
            a0 = curve[i - 1][1]
            return i, (target - a0) / (a - a0)
    return None


def _at(values: list[float], where: tuple[int, float]) -> float:
    i, frac = where
    return values[i] if i == 0 else values[i - 1] + frac * (values[i] - values[i - 1])


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """First virtual time at which the curve reaches ``target`` (linear interpolation between points)."""
    where = crossing(curve, target)
    return None if where is None else _at([t for t, _ in curve], where)


def reach_target(res: MethodResult, target: float) -> None:
    """Fill ``res``'s time, compute and energy to ``target`` (None where the curve never reaches it)."""
    where = crossing(res.curve, target)
    res.time_to_target_s = res.compute_to_target_s = res.energy_to_target_j = None
    if where is None:
        return
    res.time_to_target_s = _at([t for t, _ in res.curve], where)
    res.compute_to_target_s = _at([c for c, _ in res.curve_cost], where)
    if all(e is not None for _, e in res.curve_cost):
        res.energy_to_target_j = _at([e for _, e in res.curve_cost], where)


def worst_drop(curve: list[tuple[float, float]], share: float = 0.9) -> float:
    """The largest drop of accuracy from one point to the next once the curve has reached ``share`` of its final
    accuracy (0 if it never drops): the oscillation the evaluation bounds at 5 points."""
    if not curve:
        return 0.0
    final = curve[-1][1]
    start = next(i for i, (_, a) in enumerate(curve) if a >= share * final)
    return max([0.0] + [curve[i - 1][1] - curve[i][1] for i in range(start + 1, len(curve))])


def write_report(runs: dict[str, Path], out: Path, *, target_sparsity: float,
                 target_accuracy: float | None = None) -> str:
    """Analyse every method's metrics, write summary.md / summary.json / rounds.md / plots into ``out``; return the
    table.  Without ``target_accuracy`` the target is the best accuracy every method reached."""
    idle_w = idle_power(out / "fleet.json")
    results = {m: analyse(m, p, idle_w) for m, p in runs.items()}
    reached = [max(a for _, a in r.curve) for r in results.values() if r.curve]
    if target_accuracy is None and reached:
        target_accuracy = min(reached)  # the best accuracy every run reached: a target all of them hit
    for r in results.values():
        if target_accuracy is not None:
            reach_target(r, target_accuracy)
    spine = results.get("fedspine")
    lines = [
        f"Target sparsity {target_sparsity:.2f}; target accuracy {target_accuracy if target_accuracy is None else f'{target_accuracy:.3f}'}",
        "",
        "| method | rounds | final acc | final sparsity | virtual time (s) | time to target (s) | FedSpine speed-up | "
        "compute to target (device s) | energy to target (kJ) | worst drop | idle / round | worst round idle | "
        "plan error | upload MB | latency ms | params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in results.values():
        speedup = r.time_to_target_s / spine.time_to_target_s if spine and r.time_to_target_s and \
            spine.time_to_target_s else None
        lines.append(
            f"| {r.method} | {r.rounds} | {f(r.final_accuracy, '.3f')} | {f(r.final_sparsity, '.2f')} | "
            f"{r.virtual_time_s:.0f} | {f(r.time_to_target_s, '.0f')} | {f(speedup, '.2f')}{'x' if speedup else ''} | "
            f"{f(r.compute_to_target_s, '.0f')} | {f(r.energy_to_target_j and r.energy_to_target_j / 1e3, '.1f')} | "
            f"{worst_drop(r.curve):.3f} | {f(r.idle_fraction, '.1%')} | {f(max(r.per_round_idle, default=None), '.1%')} | "
            f"{f(r.plan_error, '.1%')} | {r.upload_bytes / 1e6:.1f} | {f(r.latency_ms, '.1f')} | {f(r.params, ',')} |"
        )
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"target_accuracy": target_accuracy,
                                                  "methods": {m: asdict(r) for m, r in results.items()}}, indent=2))
    (out / "rounds.md").write_text(rounds_table(results.values()))
    _plots(results, out, target_accuracy)
    return table


def idle_power(fleet_json: Path) -> dict[str, float] | None:
    """Each simulated node's idle watts from the fleet description ``fedspine simulate`` writes (None if absent)."""
    if not fleet_json.exists():
        return None
    profiles = json.loads(fleet_json.read_text()).get("profiles", {})
    return {n: float(p["idle_w"]) for n, p in profiles.items() if "idle_w" in p} or None


def rounds_table(results) -> str:
    """Per method, each round's configuration per node (local steps / sparsity / rank / completion time, and the
    planned time where steps are aligned), the round's idle fraction and the fleet accuracy after it."""
    parts = []
    for r in results:
        nodes = sorted(r.configs)
        if not nodes:
            continue
        rows = {}
        for node in nodes:
            for rnd, sp, rank, steps, t, planned in r.configs[node]:
                plan = f" (plan {planned:.0f} s)" if planned else ""
                rows.setdefault(rnd, {})[node] = f"{steps} / {sp:.2f} / {rank} / {t:.0f} s{plan}"
        parts += [f"## {r.method}", "", "local steps / sparsity / rank / completion time per node", "",
                  "| round | " + " | ".join(nodes) + " | idle | accuracy after the round |",
                  "|---|" + "---|" * (len(nodes) + 2)]
        for i, rnd in enumerate(sorted(rows)):
            idle = f"{r.per_round_idle[i]:.1%}" if i < len(r.per_round_idle) else "n/a"
            acc = r.start_accuracy.get(rnd + 1)
            parts.append(f"| {rnd} | " + " | ".join(rows[rnd].get(n, "-") for n in nodes)
                         + f" | {idle} | {'n/a' if acc is None else f'{acc:.3f}'} |")
        parts.append("")
    return "\n".join(parts)


def _plots(results: dict[str, MethodResult], out: Path, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results.values():
        if r.curve:
            ax.plot([t for t, _ in r.curve], [a for _, a in r.curve], marker="o", ms=3, label=r.method)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.3f}")
    ax.set(xlabel="virtual time (s)", ylabel="test accuracy (fleet mean)", title="Accuracy vs virtual time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results.values():
        if r.per_round_idle:
            ax.plot(range(1, len(r.per_round_idle) + 1), r.per_round_idle, marker="o", ms=3, label=r.method)
    ax.set(xlabel="round", ylabel="idle fraction", title="Idle fraction per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "idle_fraction.png", dpi=120)
    plt.close(fig)

    for r in results.values():
        if not r.configs:
            continue
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
        for node, seq in sorted(r.configs.items()):
            a1.plot([s[0] for s in seq], [s[1] for s in seq], marker="o", ms=3, label=node)
            a2.plot([s[0] for s in seq], [s[2] for s in seq], marker="o", ms=3, label=node)
            a3.plot([s[0] for s in seq], [s[3] for s in seq], marker="o", ms=3, label=node)
        a1.set(xlabel="round", ylabel="sparsity", title=f"{r.method}: sparsity per node")
        a2.set(xlabel="round", ylabel="LoRA rank", title=f"{r.method}: rank per node")
        a3.set(xlabel="round", ylabel="local steps", title=f"{r.method}: local steps per node")
        a1.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"configs_{r.method}.png", dpi=120)
        plt.close(fig)
