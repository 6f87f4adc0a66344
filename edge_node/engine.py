"""One local round on the node, as its round config says: apply the global slice, cut to the target sparsity, LoRA
fine-tune (tracking importance while a cut is still to come), evaluate, build the update."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from edge_node.config import TrainSettings
from edge_node.data import (
    BatchStream,
    encode_causal,
    encode_classification,
    fixed_batches,
    mean_batch_width,
    read_records,
    split_indices,
)
from edge_node.exchange import apply_update, build_update
from edge_node.importance import ImportanceTracker, blend, fleet_report
from edge_node.model import (
    attach_lora,
    base_model_digest,
    change_rank,
    current_rank,
    layer_geometry,
    load_base_model,
    load_tokenizer,
    lora_layers,
    pick_device,
    pick_dtype,
    set_lora,
    task_head_params,
    unwrap,
)
from edge_node.pruning import (
    LayerKept,
    apply_plan,
    kept_from_json,
    kept_maps,
    kept_to_json,
    plan_prune,
    restore_structure,
    sparsity,
)
from shared.updates import LORA_ALPHA, GroupScores, LoraUpdate, UpdateError

INITIAL_RANK = 8
RESUME_VERSION = 2
VAL_FRACTION = 0.1  # of the node's data, held out for loss_start / loss_end
EVAL_BATCHES = 4  # validation batches evaluated at the start and end of a round (the bandit's loss term)
IMPORTANCE_BETA = 0.9  # moving average of the importance scores over steps (the spec's β)
# The local steps train on logits + LOGIT_ADJUSTMENT·log(the node's class prior): the logit-adjusted loss (Menon et al.,
# 2021; FedLC in federated learning), so that a node whose data lacks or floods a class learns which class a text is
# rather than its own label mix (docs/method.md).  Evaluation and exported models use the plain logits.
LOGIT_ADJUSTMENT = 1.0
# The modeled clock of a simulated device (``fedspine simulate``; a real device runs on the wall clock): a local step
# costs MODEL_STEP_S per token and per parameter of the model's matrices (embeddings aside: a lookup), so a pruned
# model is cheaper by the parameters it lost, plus MODEL_STEP_FIXED_S that pruning does not reduce (the optimiser,
# the framework); tracking importance adds IMPORTANCE_SHARE of the first part, and an evaluation batch costs
# FORWARD_SHARE of it (forward only).  Fitted to `python -m benchmarks.pruning.run --step-cost --batch 8 --length 32`
# (all-MiniLM-L6-v2, one torch thread of the development machine; docs/experiments/modeled-clock.md).  The measured
# CPU time it replaces moved 10-30 % with the machine's load, and with it the paced step counts and every result.
MODEL_STEP_S = 7.1e-11
MODEL_STEP_FIXED_S = 0.075
IMPORTANCE_SHARE = 0.05
FORWARD_SHARE = 1 / 3


class RoundInterrupted(TimeoutError):
    """The node was asked to stop in the middle of a round."""


@dataclass(frozen=True)
class Pace:
    """A paced round (ours): local steps run until the round's planned completion, not to a fixed count.

    The coordinator plans each node's steps from the timing of its last round, so that every node finishes with
    the slowest one; a node that runs slower or faster this round (another load on the device, thermal throttling,
    a simulated device sharing its cores) would miss that finish by all of its error.  Paced, it measures its own
    steps as it goes and stops at the step boundary nearest ``finish_s``: at least ``min_steps`` and at most
    ``max_steps``.  ``clock()`` reads the device clock in seconds (the round counts from its first reading, less
    the test evaluation, which is not round work); the work after the steps is taken to cost what the round's
    first validation pass did, which the last one repeats.
    """

    finish_s: float
    min_steps: int
    max_steps: int
    clock: Callable[[], float]

    def __post_init__(self) -> None:
        if not 0 <= self.min_steps <= self.max_steps:
            raise ValueError(f"paced steps need 0 <= min_steps {self.min_steps} <= max_steps {self.max_steps}")


@dataclass
class RoundResult:
    update: LoraUpdate  # after the round's cut and steps, in unpruned coordinates
    payload: bytes  # update.to_bytes()
    loss_start: float  # validation loss before training (eval_batches of the val split)
    loss_end: float  # same batches after the cut and the steps
    samples: int  # training samples processed this round
    compute_s: float  # wall time of the cut and the training
    sparsity: float  # removed prunable params / all prunable params
    rank: int
    metrics: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    steps: int = 0  # local steps run
    examples: int = 0  # local training examples
    train_s: float = 0.0  # wall time of the local steps (metrics["train_cpu_s"]: their CPU time on this thread)


def _get_logger(log):
    if log is not None:
        return log
    try:
        from shared.logs import get_logger

        return get_logger("edge_node.engine")
    except ImportError:  # pragma: no cover - logs module always ships with the package
        import structlog

        return structlog.get_logger("edge_node.engine")


class LocalTrainer:
    """The node's model, data and optimiser state across rounds (the data never leaves this object)."""

    def __init__(self, model_path: str, data_path: str, *, task: str = "seq_cls", train: TrainSettings | None = None,
                 device: str = "auto", dtype: str = "auto", gradient_checkpointing: bool = False, seed: int = 0,
                 test_path: str | None = None, labels: Sequence[str] | None = None, log=None) -> None:
        self.train = train or TrainSettings()
        self.task = task
        self.seed = seed
        self.log = _get_logger(log)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.causal = task == "causal_lm"
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed + 7)
        self.tokenizer = load_tokenizer(model_path)
        self.base_model = base_model_digest(model_path)  # announced on joining: the fleet's must be one
        self.labels: list[str] = []
        data = self._encode(read_records(data_path), labels, where=str(data_path))
        self.train_idx, self.val_idx = split_indices(len(data), VAL_FRACTION, seed)
        self.data = data
        self.logit_shift = self._logit_shift()  # None: plain cross-entropy in the local steps
        model = load_base_model(model_path, task, dtype=self.dtype, labels=self.labels or None)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = attach_lora(model, rank=INITIAL_RANK, alpha=LORA_ALPHA, task=task).to(self.device)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tracker = ImportanceTracker(self.model, beta=IMPORTANCE_BETA)
        self.work_s = 0.0  # the modeled clock (MODEL_STEP_S): seconds of work on the reference device so far
        self.fleet_scores: dict[str, GroupScores] = {}  # the fleet's averaged importance, from the last global update
        pad = self.tokenizer.pad_token_id
        bs = self.train.batch_size
        self.stream = BatchStream(data, self.train_idx, bs, pad, self.causal, seed)
        self.val_batches = fixed_batches(data, self.val_idx, bs, pad, self.causal, None)
        self.test_batches: list[dict[str, torch.Tensor]] = []
        if test_path:
            test = self._encode(read_records(test_path), self.labels or None, where=str(test_path))
            # A fixed permutation (the same on every node) so that a few test batches are a fair sample even when
            # the file is sorted by label.
            order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0)).tolist()
            self.test_batches = fixed_batches(test, order, bs, pad, self.causal, None)
        fp16_cuda = self.dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None  # fp16 needs loss scaling, bf16 not
        self.rounds = 0
        self.log.info("trainer_ready", model=Path(model_path).name, base_model=self.base_model, task=task, device=str(self.device),
                      dtype=str(self.dtype).replace("torch.", ""), train=len(self.train_idx), val=len(self.val_idx),
                      test=sum(len(b["input_ids"]) for b in self.test_batches), labels=len(self.labels),
                      layers=len(layer_geometry(self.model)))

    def _encode(self, rows, labels, where: str):
        if self.causal:
            return encode_causal(rows, self.tokenizer, self.train.max_length, where=where)
        enc, names = encode_classification(rows, self.tokenizer, self.train.max_length, labels, where=where)
        if not self.labels:
            self.labels = names
        return enc

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def sparsity(self) -> float:
        return sparsity(self.model)

    @property
    def rank(self) -> int:
        return current_rank(self.model)

    @property
    def has_test(self) -> bool:
        return bool(self.test_batches)

    def kept_maps(self) -> dict[int, LayerKept]:
        return kept_maps(self.model)

    # ---- steps --------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype != torch.float32:  # half base, fp32 LoRA and task head: matmuls in the base dtype
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward_loss(self, batch: dict[str, torch.Tensor], adjusted: bool = False):
        """The model's loss and logits on ``batch``; ``adjusted``: the training loss, logit-adjusted where
        LOGIT_ADJUSTMENT is on (``_logit_shift``)."""
        batch = self._to_device(batch)
        with self._autocast():
            out = self.model(**batch)
        if not adjusted or self.logit_shift is None:
            return out.loss, out.logits
        return F.cross_entropy(out.logits.float() + self.logit_shift, batch["labels"]), out.logits

    def _logit_shift(self, tau: float = LOGIT_ADJUSTMENT) -> torch.Tensor | None:
        """tau · log of this node's class prior over its training examples, with one pseudo-count per class so that
        a class the node lacks gets a finite, strongly negative shift (None when tau is 0 or for a causal LM)."""
        if tau <= 0 or self.causal:
            return None
        targets = torch.as_tensor([self.data.targets[i] for i in self.train_idx], dtype=torch.long)
        counts = torch.bincount(targets, minlength=len(self.labels)).float() + 1.0
        return (tau * torch.log(counts / counts.sum())).to(self.device)  # once, not in every step

    @torch.no_grad()
    def _work(self, batch: dict[str, torch.Tensor], share: float = 1.0) -> None:
        """Advance the modeled clock by ``share`` of a local step on ``batch`` (MODEL_STEP_S)."""
        params = sum(p.numel() for n, p in self.model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
        self.work_s += share * MODEL_STEP_S * batch["input_ids"].numel() * params

    @torch.no_grad()  # evaluation keeps no graph: on a Jetson that graph is memory the next steps need
    def _evaluate(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        self.model.eval()
        loss_sum = correct = count = 0.0
        for batch in batches:
            self._work(batch, FORWARD_SHARE)
            loss, logits = self._forward_loss(batch)
            labels = batch["labels"]
            n = int((labels[:, 1:] != -100).sum()) if self.causal else labels.numel()
            loss_sum += float(loss) * n
            count += n
            if not self.causal:
                correct += float((logits.argmax(-1).cpu() == labels).sum())
        if count == 0:
            return {"loss": float("nan")}
        out = {"loss": loss_sum / count, "examples": float(sum(len(b["input_ids"]) for b in batches))}
        if not self.causal:
            out["accuracy"] = correct / count
        else:
            out["perplexity"] = float(torch.exp(torch.tensor(min(out["loss"], 50.0))))
        return out

    def evaluate(self, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        if split not in ("val", "test"):
            raise ValueError(f"split {split!r} must be val or test")
        batches = self.val_batches if split == "val" else self.test_batches
        return self._evaluate(batches[:max_batches] if max_batches is not None else batches)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.train.learning_rate, weight_decay=0.0)

    def _train_step(self, opt: torch.optim.Optimizer, track: bool, timing: dict[str, float],
                    batch: dict[str, torch.Tensor] | None = None) -> tuple[float, int]:
        """One local step on ``batch`` (default: the next training batch); without ``opt``, forward and backward
        only (the gradients stay for the caller)."""
        batch = next(self.stream) if batch is None else batch
        self._work(batch, 1.0 + (IMPORTANCE_SHARE if track else 0.0))
        self.work_s += MODEL_STEP_FIXED_S
        t0 = time.perf_counter()
        loss, _ = self._forward_loss(batch, adjusted=True)
        if self.scaler is not None and opt is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        t1 = time.perf_counter()
        if track:
            self.tracker.update(self.model)
        t2 = time.perf_counter()
        if opt is not None:
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        timing["step"] += time.perf_counter() - t0 - (t2 - t1)
        timing["importance"] += t2 - t1
        return float(loss.detach()), len(batch["input_ids"])

    def calibrate(self, steps: int = 5) -> dict[str, float]:
        """Time local steps and a round's evaluation before the first round, changing nothing.

        The coordinator sizes every node's local steps to the fleet's slowest node from the timing of the node's
        last round; before round 1 it has only this.  Runs one untimed warm-up step, then ``steps`` forward and
        backward passes on training batches drawn as training draws them, from a stream of their own (no
        optimiser step: weights, optimiser, the training data order and random state stay as they were), and
        the two validation passes of a round.  Validation batches would not do for the steps: their padding
        need not match the training batches' (on one benchmark node their steps took a quarter less time).  A
        few training batches are still a small sample of the padded widths (on the benchmark's nodes five of them
        were 5 % narrower to 7 % wider than a round's), so the step time is scaled to the mean width of many
        batches (``width_scale``), a step's work being about proportional to its tokens.
        Returns seconds per step and of the round's fixed part, wall and this thread's CPU time ("*_cpu_s"), as
        ``RoundResult`` reports them.
        """
        if steps < 1:
            raise ValueError(f"calibration needs steps >= 1 ({steps})")
        stream = BatchStream(self.data, self.train_idx, self.train.batch_size, self.stream.pad_id, self.causal,
                             self.seed + 7919)
        devices = [self.device] if self.device.type == "cuda" else []
        work_before = self.work_s  # the modeled clock is read for the same spans, and left as it was
        with torch.random.fork_rng(devices=devices):
            self.model.train()
            times, widths = [], []
            for _ in range(steps + 1):
                batch = next(stream)
                widths.append(batch["input_ids"].shape[1])
                t, c, k = time.perf_counter(), time.thread_time(), self.work_s
                self._train_step(None, track=False, timing={"step": 0.0, "importance": 0.0}, batch=batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append((time.perf_counter() - t, time.thread_time() - c, self.work_s - k))
            self.model.zero_grad(set_to_none=True)
            t, c, k = time.perf_counter(), time.thread_time(), self.work_s
            self._evaluate(self.val_batches[:EVAL_BATCHES])
            fixed = (2 * (time.perf_counter() - t), 2 * (time.thread_time() - c), 2 * (self.work_s - k))
        self.work_s = work_before
        timed = times[1:]
        typical = mean_batch_width(self.data, self.train_idx, self.train.batch_size, self.seed + 104729)
        scale = typical / (sum(widths[1:]) / steps)
        return {"step_s": scale * sum(w for w, _, _ in timed) / steps,
                "step_cpu_s": scale * sum(c for _, c, _ in timed) / steps,
                "step_work_s": scale * sum(k for _, _, k in timed) / steps,
                "fixed_s": fixed[0], "fixed_cpu_s": fixed[1], "fixed_work_s": fixed[2], "width_scale": scale}

    # ---- the round ----------------------------------------------------------------------------------------
    def run_round(self, *, target_sparsity: float, rank: int, local_steps: int, global_update: LoraUpdate | None,
                  importance: bool = True, should_stop: Callable[[], bool] | None = None,
                  pace: Pace | None = None) -> RoundResult:
        """One local round as the coordinator configured it: apply the global slice, cut to ``target_sparsity``
        (ranked by the fleet's importance the slice carries), run the local steps (exactly ``local_steps``, or as
        ``pace`` says; tracking importance when ``importance``), evaluate and build the update."""
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity {target_sparsity} outside [0, 1)")
        if rank < 1 or local_steps < 0:
            raise ValueError(f"rank {rank} must be >= 1 and local_steps {local_steps} >= 0")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start, cpu_start, work_start = time.perf_counter(), time.thread_time(), self.work_s
        clock = pace.clock if pace is not None else (lambda: 0.0)  # unpaced: the readings go unused
        clock_start = clock()
        most = pace.max_steps if pace is not None else local_steps
        sent = global_update.rank if global_update is not None else 0
        test = None  # the global model at this node's structure, as it was sent: (metrics, wall s, CPU s, clock s)
        if self.test_batches and sent > rank:
            # Sent above our training rank (the model as deployed): evaluated at that rank, then cut to ours below.
            # A throwaway generator for the restarted (zero) components, which do not change the model: the
            # node's own stream stays as it would be without this evaluation.
            test = self._test_pass(clock, lambda: apply_update(self.model, global_update, rank=sent, alpha=LORA_ALPHA,
                                                               generator=torch.Generator().manual_seed(0)))
        if global_update is not None:
            apply_update(self.model, global_update, rank=rank, alpha=LORA_ALPHA, generator=self.gen, leading=True)
            self.fleet_scores = dict(global_update.importance)
        else:
            change_rank(self.model, rank, LORA_ALPHA, generator=self.gen)
        if self.test_batches and test is None:
            test = self._test_pass(clock)
        metrics, t_eval, cpu_eval, clock_eval = test if test is not None else ({}, 0.0, 0.0, 0.0)
        clock_start += clock_eval  # the round's clock skips the test evaluation
        eval_batches = self.val_batches[:EVAL_BATCHES]
        clock_val = clock()
        loss_start = self._evaluate(eval_batches)["loss"]
        tail = clock() - clock_val  # the final validation pass repeats it
        # Cut first, then tune: this round's steps recover from the cut.
        pruned = target_sparsity > self.sparsity + 1e-9
        if pruned:
            self.prune(target_sparsity)
        self.model.train()
        opt = self._optimizer()
        timing = {"step": 0.0, "importance": 0.0}
        samples = steps = 0
        t_train, cpu_train, work_train = time.perf_counter(), time.thread_time(), self.work_s
        clock_train = clock()
        for _ in range(most):
            if pace is not None and steps >= pace.min_steps and steps > 0:
                now = clock()
                per_step = (now - clock_train) / steps
                if now - clock_start + tail + per_step / 2 >= pace.finish_s:  # one more step ends further off
                    break
            if should_stop is not None and should_stop():
                raise RoundInterrupted(f"stopped after {steps} of {most} local steps")
            _, n = self._train_step(opt, track=importance, timing=timing)
            samples += n
            steps += 1
        t_train, cpu_train, work_train = (time.perf_counter() - t_train, time.thread_time() - cpu_train,
                                          self.work_s - work_train)
        end = self._evaluate(eval_batches)  # the same batches as loss_start: one pass gives loss and accuracy
        loss_end = end["loss"]
        metrics.update({f"val_{k}": v for k, v in end.items()})
        # Report this round's smoothed importance with the update (the coordinator averages it over the fleet).
        report = importance and self.tracker.complete()
        update = build_update(self.model, fleet_report(self.tracker.scores, self.model) if report else None)
        compute_s = time.perf_counter() - t_start - t_eval
        # CPU time of this thread: with one torch thread it is the round's compute, unaffected by other
        # processes competing for the cores (what a simulated device's virtual clock should use).
        metrics["cpu_s"] = time.thread_time() - cpu_start - cpu_eval
        metrics["train_cpu_s"] = cpu_train
        metrics["work_s"], metrics["train_work_s"] = self.work_s - work_start, work_train  # the modeled clock's
        payload = update.to_bytes()
        achieved = self.sparsity
        kept = kept_maps(self.model)
        metrics.update(
            params=float(sum(p.numel() for n, p in unwrap(self.model).named_parameters() if "lora_" not in n)),
            heads_kept=float(sum(len(k.heads) for k in kept.values())),
            channels_kept=float(sum(len(k.channels) for k in kept.values())),
            step_ms=1000 * timing["step"] / max(steps, 1), importance_ms=1000 * timing["importance"] / max(steps, 1),
            importance_skipped=float(self.tracker.skipped), pruned=float(pruned),
        )
        self.rounds += 1
        result = RoundResult(update=update, payload=payload, loss_start=loss_start, loss_end=loss_end,
                             samples=samples, compute_s=compute_s, sparsity=achieved, rank=current_rank(self.model),
                             metrics=metrics, peak_memory_mb=self._peak_memory_mb(), steps=steps,
                             examples=len(self.train_idx), train_s=t_train)
        self.log.info("local_round", steps=steps, loss_start=round(loss_start, 4), loss_end=round(loss_end, 4),
                      sparsity=round(achieved, 4), rank=result.rank, compute_s=round(compute_s, 3),
                      importance_ms=round(metrics["importance_ms"], 2), step_ms=round(metrics["step_ms"], 2))
        return result

    def _test_pass(self, clock: Callable[[], float], prepare: Callable[[], None] | None = None
                   ) -> tuple[dict[str, float], float, float, float]:
        """The round's test figures and what they took: evaluation only, not round work, so the caller keeps
        the wall, CPU and pace-clock seconds (``prepare`` included) out of the round's compute and clock."""
        t0, c0, k0, work = time.perf_counter(), time.thread_time(), clock(), self.work_s
        if prepare is not None:
            prepare()
        metrics = {f"test_{k}": v for k, v in self.evaluate("test", self.train.test_batches).items()}
        self.work_s = work  # the modeled clock skips it
        return metrics, time.perf_counter() - t0, time.thread_time() - c0, clock() - k0

    def prune(self, target: float, random_groups: bool = False) -> None:
        """Cut the model to ``target`` sparsity, the groups ranked by the fleet's averaged importance (from the last
        global slice; the node's own where the fleet has not scored a group), so that a node whose data lacks a
        class does not cut what the class needs.  ``random_groups``: random groups at the same counts (the
        benchmark's ablation)."""
        scores = None
        if not random_groups:
            if not self.tracker.complete():  # no own scores at this structure yet: one gradient pass gives them
                self.model.train()
                self._train_step(None, track=True, timing={"step": 0.0, "importance": 0.0})
                self.model.zero_grad(set_to_none=True)
            scores = blend(self.tracker.scores, self.model, self.fleet_scores, 1.0)
        plan = plan_prune(self.model, target, scores, generator=self.gen)
        apply_plan(self.model, plan)
        self.tracker.slice(plan)

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # ---- export and resume --------------------------------------------------------------------------------
    def merged_model(self):
        """A copy of the pruned backbone with LoRA merged in (plain transformers modules, eval mode)."""
        merged = copy.deepcopy(self.model).merge_and_unload()
        return merged.eval()

    def save_resume(self, directory: str | Path) -> None:
        """Persist the pruned structure, LoRA factors, task head and importance (safetensors + json)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(self.model).items():
            tensors[f"lora.{name}.A"] = layer.lora_A["default"].weight.detach().float().cpu().contiguous()
            tensors[f"lora.{name}.B"] = layer.lora_B["default"].weight.detach().float().cpu().contiguous()
        for name, p in task_head_params(self.model).items():
            tensors[f"dense.{name}"] = p.detach().float().cpu().contiguous()
        tensors.update(self.tracker.state())
        meta = {"version": RESUME_VERSION, "task": self.task, "labels": self.labels, "base_model": self.base_model,
                "rank": self.rank,
                "alpha": LORA_ALPHA, "rounds": self.rounds,
                "kept": kept_to_json(kept_maps(self.model))}
        tmp = d / "state.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, d / "state.safetensors")
        (d / "state.json.tmp").write_text(json.dumps(meta))
        os.replace(d / "state.json.tmp", d / "state.json")

    def load_resume(self, directory: str | Path) -> None:
        d = Path(directory)
        if not (d / "state.json").exists() or not (d / "state.safetensors").exists():
            return
        meta = json.loads((d / "state.json").read_text())
        if meta.get("version") != RESUME_VERSION or meta.get("task") != self.task:
            raise ValueError(f"resume state in {d} does not match (version/task {meta.get('version')}/"
                             f"{meta.get('task')})")
        if not self.causal and meta.get("labels") != self.labels:
            raise ValueError(f"resume state labels {meta.get('labels')} differ from the data's {self.labels}")
        if meta.get("base_model") not in (None, self.base_model):  # the model folder was replaced since
            raise ValueError(f"resume state was made on base model {meta['base_model'][:12]}…, not this folder's "
                             f"{self.base_model[:12]}…")
        restore_structure(self.model, kept_from_json(meta["kept"]))
        tensors = load_file(str(d / "state.safetensors"))
        for name, layer in lora_layers(self.model).items():
            A, B = tensors.get(f"lora.{name}.A"), tensors.get(f"lora.{name}.B")
            if A is None or B is None or A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                raise UpdateError(f"resume state: LoRA factors of {name} missing or mis-shaped")
            set_lora(layer, A, B, float(meta["alpha"]))
        with torch.no_grad():
            for name, p in task_head_params(self.model).items():
                if f"dense.{name}" in tensors:
                    p.copy_(tensors[f"dense.{name}"].to(p.device, p.dtype))
        self.tracker.load_state(tensors, self.device)
        self.rounds = int(meta.get("rounds", 0))
