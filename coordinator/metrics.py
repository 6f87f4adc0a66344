"""Round metrics as JSON lines (one object per node and round, one per round, one per export) and a summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class MetricsWriter:
    """Append-only JSONL; every line carries ``kind`` (node, round, export, region) and a timestamp."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _write(self, kind: str, rec: dict) -> None:
        self._fh.write(json.dumps(_clean({"kind": kind, "ts": time.time(), **rec}), sort_keys=True) + "\n")
        self._fh.flush()

    def node_round(self, rec: dict) -> None:
        self._write("node", rec)

    def round_summary(self, rec: dict) -> None:
        self._write("round", rec)

    def region(self, rec: dict) -> None:
        """A region's part of the run's end (hierarchical): its final sync (``final``) or its nodes' exports."""
        self._write("region", rec)

    def export(self, report) -> None:
        self._write("export", {"run_id": report.run_id, "node_id": report.node_id, "node": report.node_id, "status": report.status,
                               "error": report.error, "path": report.path, "size_bytes": report.size_bytes,
                               "params": report.params, "sparsity": report.sparsity, "latency_ms": report.latency_ms,
                               "metrics": dict(report.metrics)})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(path: str | Path) -> str:
    """A plain-text table of the run: per method and round the accepted nodes, idle fraction, mean loss,
    accuracy, sparsity and upload volume; then the final evaluation (if any) and the exports."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    nodes = [r for r in rows if r.get("kind") == "node" and r.get("status") == "ok"]
    trained = [r for r in nodes if not r.get("eval_only")]
    # Classification reports accuracy; a causal LM reports perplexity (and no accuracy)
    metric = "perplexity" if any("m_test_perplexity" in n for n in nodes) and \
        not any("m_test_accuracy" in n for n in nodes) else "accuracy"
    head, fmt = ("test_ppl", ".2f") if metric == "perplexity" else ("test_acc", ".3f")
    lines = [f"{'method':>10} {'round':>5} {'accepted':>8} {'idle':>6} {'loss_end':>9} {head:>8} "
             f"{'sparsity':>8} {'up_MB':>8}"]
    for r in (r for r in rows if r.get("kind") == "round"):
        mine = [n for n in trained if n.get("round") == r["round"] and n.get("method") == r.get("method")]
        loss, score, sp = (_mean(mine, k) for k in ("loss_end", f"m_test_{metric}", "sparsity"))
        up = sum(n.get("upload_bytes") or 0 for n in mine) / 1e6
        lines.append(f"{str(r.get('method', '-')):>10} {r['round']:>5} {r.get('accepted', len(mine)):>8} "
                     f"{r.get('idle_fraction') or 0.0:>6.1%} {loss:>9.4f} {score:>8{fmt}} {sp:>8.3f} {up:>8.3f}")
    final = list({n["node"]: n for n in nodes if n.get("eval_only")}.values())  # the last one per node
    if final:
        at = f"round {final[-1]['round']} " if final[-1].get("final") else ""
        lines.append(f"final evaluation ({at}final aggregate): {len(final)} nodes, test {metric} "
                     f"{_mean(final, f'm_test_{metric}'):{fmt}}, sparsity {_mean(final, 'sparsity'):.3f}")
    if any(f"m_test_{metric}" in n for n in nodes):
        lines.append(f"test {metric}: each node's first [train] test_batches batches of its test_path (the same "
                     "examples every round and in the final evaluation)")
    exports = {e["node_id"]: e for e in rows if e.get("kind") == "export"}  # the last report per node
    for e in exports.values():
        if e.get("status") != "ok":
            lines.append(f"export {e['node_id']}: {e.get('status')}: {e.get('error') or '-'}")
            continue
        m = e.get("metrics") or {}
        score, whole = m.get(f"test_{metric}"), m.get(metric)
        score = score if isinstance(score, (int, float)) else float("nan")
        whole = f", whole test file ({int(m.get('examples', 0))} examples) {whole:{fmt}}" \
            if isinstance(whole, (int, float)) else ""
        lines.append(f"export {e['node_id']}: {e['status']} {(e.get('size_bytes') or 0) / 1e6:.1f} MB, "
                     f"{e.get('latency_ms') or 0.0:.1f} ms, sparsity {e.get('sparsity') or 0.0:.2f}, "
                     f"test {metric} {score:{fmt}}{whole}")
    return "\n".join(lines)
