"""Run all six methods on a declared set of fleet configurations and judge FedSpine against each baseline.

    python -m benchmarks.fleet.evaluate                       # the evaluation set (benchmarks/fleet/evaluation.toml)
    python -m benchmarks.fleet.evaluate --set development     # the development set (tuning happens there only)
    python -m benchmarks.fleet.evaluate --only eval-3 --out results/evaluation

Every method runs with the same system mechanisms (coordinator/strategies/base.py); they differ only in their
algorithm.  Per configuration it writes ``<out>/<name>/`` (``fedspine simulate``'s metrics, summary and plots) and
a table; ``<out>/summary.md`` has every configuration's table, FedSpine's time-to-target ratio against each baseline
with the geometric mean, min and max over the configurations, and the issue-32 bars, each met or not.  The target
accuracy of a configuration follows the rule declared in the set's file.  A configuration whose folder already has
a finished report is not run again unless ``--rerun`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from coordinator.config import METHODS
from coordinator.report import MethodResult, analyse, idle_power, reach_target, worst_drop
from coordinator.simulate import main as simulate
from coordinator.strategies import STRATEGIES
from shared.config import load_toml

HERE = Path(__file__).resolve().parent
SETS = {"evaluation": HERE / "evaluation.toml", "development": HERE / "development.toml"}
PRUNE_BASELINES = ("prune_ft", "ft_prune", "uniform")
DENSE_BASELINES = ("fedlora", "hetlora")
def load_set(spec: str) -> tuple[dict, list[dict], dict]:
    """(size shared by all, the configurations, the declared rule) of a set name or TOML path."""
    data = load_toml(SETS.get(spec, spec))
    size, configs = data["size"], data["config"]
    rule = data.get("rule", {"target_share": 0.95})
    for c in configs:
        missing = {"name", "seed", "alpha", "tiers"} - c.keys()
        if missing:
            raise SystemExit(f"configuration {c.get('name', '?')} lacks {sorted(missing)}")
    return size, configs, rule


def simulate_args(size: dict, cfg: dict, out: Path, methods: str, broker: str) -> list[str]:
    s = {**size, **cfg.get("size", {})}
    args = ["--method", methods, "--broker", broker, "--out", str(out), "--seed", str(cfg["seed"]),
            "--alpha", str(cfg["alpha"]), "--nodes", str(len(cfg["tiers"])), "--tiers", ",".join(cfg["tiers"]),
            "--test-batches", str(math.ceil(s["test_size"] / s["batch_size"]))]  # the whole test split each round
    for key in ("rounds", "local_steps", "batch_size", "max_length", "samples_per_node", "test_size", "lr",
                "target_sparsity"):
        args += [f"--{key.replace('_', '-')}", str(s[key])]
    return args


def judge(folder: Path, share: float) -> dict:
    """Every method's figures in one configuration's folder, against the declared target rule."""
    idle_w = idle_power(folder / "fleet.json")
    results: dict[str, MethodResult] = {}
    for m in METHODS:
        metrics = folder / m / "coordinator" / "metrics.jsonl"
        if metrics.exists():
            results[m] = analyse(m, metrics, idle_w)
    finals = [r.curve[-1][1] for r in results.values() if r.curve]
    target = share * max(finals) if finals else None
    for r in results.values():
        if target is not None:
            reach_target(r, target)
    return {"target": target, "results": results}


def ratio(base: MethodResult, spine: MethodResult) -> tuple[float | None, str]:
    """Time to target of ``base`` over FedSpine's, with censoring: a method that never reached the target is
    counted at its whole run's virtual time (so the ratio is a bound, marked '≥' or '≤')."""
    b, f = base.time_to_target_s, spine.time_to_target_s
    if b == 0 or f == 0:  # the base model already met it: every method sat on the one-class floor
        return None, "target met before training"
    if b is not None and f is not None:
        return b / f, ""
    if b is None and f is not None:
        return base.virtual_time_s / f, "≥"
    if b is not None and f is None:
        return b / spine.virtual_time_s, "≤"
    return None, "neither reached the target"


def geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def config_table(name: str, cfg: dict, judged: dict) -> list[str]:
    res, target = judged["results"], judged["target"]

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"### {name}: seed {cfg['seed']}, α {cfg['alpha']}, {len(cfg['tiers'])} nodes ({', '.join(cfg['tiers'])}); "
             f"target accuracy {f(target, '.3f')}", "",
             "| method | final acc | time to target (s) | compute to target (device s) | energy to target (kJ) | "
             "worst drop | node sparsities | params | latency ms |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in res.items():
        sp = ", ".join(f"{v:.2f}" for _, v in sorted(r.node_sparsity.items()))
        lines.append(f"| {m} | {f(r.final_accuracy, '.3f')} | {f(r.time_to_target_s, '.0f')} | "
                     f"{f(r.compute_to_target_s, '.0f')} | {f(r.energy_to_target_j and r.energy_to_target_j / 1e3, '.2f')} "
                     f"| {worst_drop(r.curve):.3f} | {sp} | {f(r.params, ',')} | {f(r.latency_ms, '.1f')} |")
    return lines + [""]


def summary(configs: list[dict], judged: dict[str, dict], rule: dict) -> tuple[list[str], dict]:
    """The bars of issue 32 over the configurations run so far."""
    per_base: dict[str, list[tuple[str, float | None, str]]] = {m: [] for m in (*PRUNE_BASELINES, *DENSE_BASELINES)}
    acc_ok: dict[str, int] = {m: 0 for m in per_base}
    size_ok = {m: [] for m in DENSE_BASELINES}
    oscillating = []
    for c in configs:
        j = judged.get(c["name"])
        if j is None or "fedspine" not in j["results"]:
            continue
        res, spine = j["results"], j["results"]["fedspine"]
        for m, r in res.items():
            if worst_drop(r.curve) > 0.05:
                oscillating.append(f"{m} in {c['name']} ({worst_drop(r.curve):.3f})")
        for m in per_base:
            if m not in res:
                continue
            per_base[m].append((c["name"], *ratio(res[m], spine)))
            tol = 0.005 if m in PRUNE_BASELINES else 0.01
            if spine.final_accuracy is not None and res[m].final_accuracy is not None and (
                    spine.final_accuracy >= res[m].final_accuracy - tol if m in PRUNE_BASELINES
                    else abs(spine.final_accuracy - res[m].final_accuracy) <= tol):
                acc_ok[m] += 1
            if m in DENSE_BASELINES and spine.params and res[m].params and spine.latency_ms and res[m].latency_ms:
                size_ok[m].append((1 - spine.params / res[m].params, res[m].latency_ms / spine.latency_ms,
                                   spine.final_sparsity))
    n = sum(1 for c in configs if c["name"] in judged)
    lines = ["| FedSpine vs | time-to-target ratio per configuration | geometric mean | min | max | "
             "final accuracy held |", "|---|---|---|---|---|---|"]
    out = {}
    for m, rows in per_base.items():
        known = [x for _, x, _ in rows if x is not None]
        g = geomean(known)
        out[m] = {"ratios": rows, "geomean": g, "accuracy_held": acc_ok[m], "configurations": n}
        cells = ", ".join(f"{name} {mark}{x:.2f}" if x is not None else f"{name} n/a ({mark})" for name, x, mark in rows)
        lines.append(f"| {m} | {cells} | {'n/a' if g is None else f'{g:.2f}x'} | "
                     f"{'n/a' if not known else f'{min(known):.2f}'} | {'n/a' if not known else f'{max(known):.2f}'} | "
                     f"{acc_ok[m]} of {n} |")
    lines += ["", "Bars (issue 32):"]
    for m in PRUNE_BASELINES:
        g = out[m]["geomean"]
        met = g is not None and g >= 1.2 and acc_ok[m] >= math.ceil(0.75 * n)  # 6 of 8
        lines.append(f"- vs {m}: time to target ≥ 1.2x (geometric mean) and final accuracy no lower (0.5-point "
                     f"tolerance) in ≥ 6 of 8: {'met' if met else 'not met'} ({'n/a' if g is None else f'{g:.2f}x'}, "
                     f"accuracy held in {acc_ok[m]} of {n})")
    for m in DENSE_BASELINES:
        g = out[m]["geomean"]
        smaller = [s for s, _, _ in size_ok[m]]
        faster = [x for _, x, _ in size_ok[m]]
        pruned = [p for _, _, p in size_ok[m] if p is not None]  # of the attention and FFN weights: the sparsity
        met = (g is not None and g >= 1.2 and acc_ok[m] == n and bool(smaller) and min(smaller) >= 0.30
               and min(faster) >= 1.35)
        lines.append(f"- vs {m}: time to target ≥ 1.2x with final accuracy within 1 point, models ≥ 30 % smaller and "
                     f"≥ 1.35x faster: {'met' if met else 'not met'} ({'n/a' if g is None else f'{g:.2f}x'}; accuracy "
                     f"within 1 point in {acc_ok[m]} of {n}; smaller by "
                     f"{', '.join(f'{s:.0%}' for s in smaller) or 'n/a'} (the whole model, embeddings included; its "
                     f"attention and FFN weights by {', '.join(f'{p:.0%}' for p in pruned) or 'n/a'}); export latency ratio "
                     f"{', '.join(f'{x:.2f}x' for x in faster) or 'n/a'})")
    lines.append(f"- no method oscillates (a drop over 5 points after reaching 90 % of its final accuracy): "
                 f"{'met' if not oscillating else 'not met: ' + '; '.join(oscillating)}")
    out["oscillating"] = oscillating
    return lines, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="evaluation", help="evaluation, development or a TOML file of the same form")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--out", default=None, help="default results/<set>")
    ap.add_argument("--broker", default="embedded")
    ap.add_argument("--rerun", action="store_true", help="run configurations that already have a report again")
    a = ap.parse_args(argv)
    size, configs, rule = load_set(a.set)
    if a.only:
        wanted = set(a.only.split(","))
        configs = [c for c in configs if c["name"] in wanted]
    out = Path(a.out or f"results/{Path(a.set).stem}")
    out.mkdir(parents=True, exist_ok=True)
    judged, sections = {}, []
    for i, c in enumerate(configs, start=1):
        folder = out / c["name"]
        if a.rerun or not (folder / "summary.json").exists():
            print(f"[{time.strftime('%H:%M:%S')}] {c['name']} ({i}/{len(configs)}): running", flush=True)
            simulate(simulate_args(size, c, folder, a.methods, a.broker))
        judged[c["name"]] = judge(folder, float(rule["target_share"]))
        sections += config_table(c["name"], c, judged[c["name"]])
        (folder / "judged.json").write_text(json.dumps(
            {"target": judged[c["name"]]["target"],
             "methods": {m: {**asdict(r), "worst_drop": worst_drop(r.curve)}
                         for m, r in judged[c["name"]]["results"].items()}}, indent=2))
    bars, figures = summary(configs, judged, rule)
    algos = ["Each method's algorithm (every system mechanism is the same for all of them):", ""] + \
        [f"- {m}: {' '.join(cls.__doc__.split())}" for m, cls in STRATEGIES.items()] + [""]
    text = "\n".join([f"# Fleet evaluation: {Path(a.set).stem}", "", *algos, *sections, "## FedSpine against each "
                      "baseline", "", *bars, ""])
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(figures, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
