"""LocalTrainer.run_round on tiny models: learning, sparsity, payload, global updates, resume, export, stop."""

from __future__ import annotations

import logging

import pytest
import structlog
import torch

from edge_node.config import TrainSettings
from edge_node.data import BatchStream, mean_batch_width
from edge_node.engine import EVAL_BATCHES, MODEL_STEP_S, LocalTrainer, Pace, RoundInterrupted
from edge_node.model import layer_geometry
from shared.updates import GroupScores, LoraUpdate, UpdateError
from tests.edge_node.tiny import cached_model_folder, lm_rows, random_batch, sentiment_rows, write_csv

pytestmark = pytest.mark.slow  # local training rounds: seconds each
QUIET = structlog.wrap_logger(structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(
    logging.WARNING))
# The trainer runs here without a coordinator: unless a test sends a slice with the fleet's importance, a cut ranks
# groups by the node's own importance (one gradient pass before its first steps).
SETTINGS = TrainSettings(batch_size=16, learning_rate=1e-2)


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("d") / "node.csv", sentiment_rows(240, seed=1))


def _trainer(data, kind="bert", task="seq_cls", **kw) -> LocalTrainer:
    return LocalTrainer(str(cached_model_folder(kind, task)), str(data), task=task, train=kw.pop("train", SETTINGS),
                        device="cpu", log=QUIET, **kw)


def test_rounds_learn_prune_monotone_and_report(cls_data):
    tr = _trainer(cls_data)
    assert tr.rank == 8 and tr.sparsity == 0.0 and tr.labels == ["neg", "pos"]
    results = []
    for target, rank in [(0.0, 8), (0.15, 4), (0.3, 8), (0.3, 2), (0.2, 4)]:
        res = tr.run_round(target_sparsity=target, rank=rank, local_steps=15, global_update=None)
        results.append(res)
        assert res.rank == rank and res.samples == 15 * 16
        assert res.sparsity >= target - 1e-9 and res.sparsity == pytest.approx(tr.sparsity)
        assert res.compute_s > 0 and res.peak_memory_mb > 0
        assert res.steps == 15 and res.examples == len(tr.train_idx) > 0  # what the coordinator weighs and paces
        assert 0 < res.train_s < res.compute_s and 0 < res.metrics["train_cpu_s"] <= res.metrics["cpu_s"]
        assert LoraUpdate.from_bytes(res.payload).modules.keys() == res.update.modules.keys()
        assert {"val_accuracy", "val_loss", "params", "heads_kept", "channels_kept"} <= res.metrics.keys()
    sparsities = [r.sparsity for r in results]
    assert sparsities == sorted(sparsities) and sparsities[-1] == sparsities[-2]  # monotone; 0.2 < 0.3 keeps it
    assert results[-1].loss_end < results[0].loss_start - 0.05
    assert results[-1].metrics["val_accuracy"] >= 0.7
    assert results[-1].metrics["params"] < results[0].metrics["params"]


def test_global_update_is_applied_and_random_pruning(cls_data):
    a, b = _trainer(cls_data, seed=1), _trainer(cls_data, seed=2)
    ra = a.run_round(target_sparsity=0.3, rank=4, local_steps=10, global_update=None)
    b.prune(0.2, random_groups=True)  # the pruning benchmark's ablation
    rb = b.run_round(target_sparsity=0.2, rank=4, local_steps=0, global_update=ra.update)
    assert rb.sparsity >= 0.2 and rb.samples == 0
    # b starts its round from a's update: its starting loss is a's ending loss only if the structures agree,
    # so compare the task head, which is never pruned
    torch.testing.assert_close(rb.update.dense["classifier.weight"], ra.update.dense["classifier.weight"])


def test_a_slice_above_the_training_rank_is_evaluated_as_sent_and_trained_from_its_leading_components(cls_data):
    """The coordinator sends the global slice at the deployed rank: the round's test
    figures are of that model, and training is the same as from the slice cut to the node's rank."""
    donor = _trainer(cls_data, seed=1)
    sent = donor.run_round(target_sparsity=0.0, rank=8, local_steps=10, global_update=None).update
    low = sent.leading(2)
    probe = _trainer(cls_data, seed=2, test_path=str(cls_data))  # the same test batches as a and b
    probe.run_round(target_sparsity=0.0, rank=8, local_steps=0, global_update=sent)  # evaluates the rank-8 model
    at_sent = probe.evaluate("test", SETTINGS.test_batches)
    a, b = (_trainer(cls_data, seed=2, test_path=str(cls_data)) for _ in range(2))
    ra = a.run_round(target_sparsity=0.2, rank=2, local_steps=6, global_update=sent)
    rb = b.run_round(target_sparsity=0.2, rank=2, local_steps=6, global_update=low)
    assert ra.metrics["test_loss"] == pytest.approx(at_sent["loss"], abs=1e-5)
    # the rank-2 truncation is another model: its loss differs by ten times the tolerance above
    assert abs(rb.metrics["test_loss"] - at_sent["loss"]) > 1e-4
    assert ra.rank == rb.rank == 2 and ra.steps == rb.steps == 6
    for name, m in ra.update.modules.items():  # same start, same generator stream: the same training
        torch.testing.assert_close(m.delta(), rb.update.modules[name].delta(), atol=1e-5, rtol=1e-4)
    assert ra.loss_start == pytest.approx(rb.loss_start, abs=1e-5)


def test_causal_lm_llama_gqa_round(tmp_path):
    data = write_csv(tmp_path / "lm.csv", lm_rows(160))
    tr = _trainer(data, kind="llama", task="causal_lm")
    r1 = tr.run_round(target_sparsity=0.0, rank=8, local_steps=15, global_update=None)
    r2 = tr.run_round(target_sparsity=0.5, rank=4, local_steps=15, global_update=None)
    assert r2.sparsity >= 0.5 and r2.loss_end < r1.loss_start
    assert "val_perplexity" in r2.metrics and r2.metrics["heads_kept"] == 2  # one KV group per layer


def test_resume_merge_and_stop(cls_data, tmp_path):
    tr = _trainer(cls_data, test_path=str(cls_data))
    tr.run_round(target_sparsity=0.4, rank=4, local_steps=5, global_update=None)
    assert tr.has_test and "accuracy" in tr.evaluate("test", 2)
    tr.save_resume(tmp_path / "state")
    again = _trainer(cls_data, test_path=str(cls_data))
    again.load_resume(tmp_path / "state")
    assert again.kept_maps() == tr.kept_maps() and again.rank == 4
    assert again.sparsity == pytest.approx(tr.sparsity)
    assert again.evaluate("val")["loss"] == pytest.approx(tr.evaluate("val")["loss"], abs=1e-6)
    again.base_model = "0" * 64  # the model folder was replaced by another copy: its state does not carry over
    with pytest.raises(ValueError, match="resume state was made on base model"):
        again.load_resume(tmp_path / "state")
    merged = tr.merged_model()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, tr.model.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # the data's class names travel with the model: an export (and a pipeline over it) names them, not LABEL_0
    from transformers import AutoConfig

    from edge_node.export import export_pruned_model

    assert merged.config.id2label == {0: "neg", 1: "pos"}
    export_pruned_model(merged, tmp_path / "export")
    assert AutoConfig.from_pretrained(tmp_path / "export", trust_remote_code=True).label2id == {"neg": 0, "pos": 1}
    with pytest.raises(RoundInterrupted):
        tr.run_round(target_sparsity=0.5, rank=4, local_steps=5, global_update=None, should_stop=lambda: True)


def test_logit_adjustment_shifts_the_training_loss_by_the_shards_class_prior_and_nothing_else(tmp_path):
    rows = sentiment_rows(240, seed=4)
    skewed = write_csv(tmp_path / "skew.csv",
                       [r for r in rows if r["label"] == "pos"] + [r for r in rows if r["label"] == "neg"][:20])
    plain, la = _trainer(skewed, seed=5), _trainer(skewed, seed=5)
    assert la.logit_shift is not None  # on by default (engine.LOGIT_ADJUSTMENT)
    plain.logit_shift, la.logit_shift = None, la._logit_shift(1.5)
    counts = torch.bincount(torch.as_tensor([la.data.targets[i] for i in la.train_idx]), minlength=2).float()
    assert counts[0] < counts[1] / 4  # the shard floods "pos"
    torch.testing.assert_close(la.logit_shift, 1.5 * torch.log((counts + 1) / (counts + 1).sum()))
    batch = next(BatchStream(la.data, la.train_idx, 16, la.stream.pad_id, False, 1))
    la.model.eval()
    plain.model.eval()
    with torch.no_grad():
        loss, logits = la._forward_loss(batch, adjusted=True)
        plain_loss, plain_logits = plain._forward_loss(batch, adjusted=True)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits + la.logit_shift, batch["labels"]))
        torch.testing.assert_close(plain_loss, torch.nn.functional.cross_entropy(plain_logits, batch["labels"]))
        torch.testing.assert_close(logits, plain_logits)  # the model's logits are the plain ones
        assert abs(loss.item() - plain_loss.item()) > 1e-3
        torch.testing.assert_close(la._forward_loss(batch)[0], plain_loss)  # evaluation: the plain loss
    assert la.evaluate("val")["loss"] == pytest.approx(plain.evaluate("val")["loss"], abs=1e-6)
    # training on the shifted loss moves the model differently: the minority class keeps more of its logit
    ra = la.run_round(target_sparsity=0.0, rank=4, local_steps=12, global_update=None)
    rp = plain.run_round(target_sparsity=0.0, rank=4, local_steps=12, global_update=None)
    assert any(not torch.equal(ra.update.modules[n].B, rp.update.modules[n].B) for n in ra.update.modules)
    neg = [i for i in la.train_idx if la.data.targets[i] == 0]
    probe = next(BatchStream(la.data, neg, 16, la.stream.pad_id, False, 2))
    with torch.no_grad():
        margin = [(t.model.eval()(**t._to_device(probe)).logits.diff(dim=1)).mean().item() for t in (la, plain)]
    assert margin[0] < margin[1]  # pos − neg on the flooded shard's negatives is smaller after adjusted training
    # a causal LM has no classes to shift
    lm = _trainer(write_csv(tmp_path / "lm.csv", lm_rows(40)), kind="llama", task="causal_lm")
    assert lm.logit_shift is None


def test_half_precision_base_and_checkpointing_on_cpu(cls_data):
    tr = _trainer(cls_data, dtype="bfloat16", gradient_checkpointing=True)
    res = tr.run_round(target_sparsity=0.3, rank=4, local_steps=3, global_update=None)
    assert res.sparsity >= 0.3
    assert all(m.A.dtype == torch.float32 for m in res.update.modules.values())
    all_finite = all(torch.isfinite(m.B).all() for m in res.update.modules.values())
    assert all_finite


def test_importance_is_reported_and_the_fleet_view_steers_pruning(cls_data):
    tr = _trainer(cls_data)
    first = tr.run_round(target_sparsity=0.0, rank=4, local_steps=6, global_update=None)
    report = LoraUpdate.from_bytes(first.payload).importance  # travels with the update, unpruned numbering
    geo = {str(g.index): g for g in layer_geometry(tr.model)}
    assert set(report) == {f"{i}.{k}" for i in geo for k in ("heads", "channels")}
    for key, g in report.items():
        layer, _, kind = key.partition(".")
        assert g.size == (geo[layer].n_kv_heads if kind == "heads" else geo[layer].intermediate)
        assert g.idx.tolist() == list(range(g.size)) and torch.linalg.vector_norm(g.score).item() == pytest.approx(1.0)
    # A fleet view that ranks groups in reverse order of this node's own scores decides when given full weight.
    fleet = {key: GroupScores(idx=g.idx, score=g.score.max() - g.score + 1e-3, size=g.size) for key, g in report.items()}
    glob = LoraUpdate(first.update.modules, first.update.dense, fleet)
    tr.run_round(target_sparsity=0.3, rank=4, local_steps=2, global_update=glob)
    fleet_top = {}
    for i, k in tr.kept_maps().items():
        for kind, have in (("heads", k.heads), ("channels", k.channels)):
            fleet_top[f"{i}.{kind}"] = set(torch.topk(fleet[f"{i}.{kind}"].score, k=len(have)).indices.tolist())
            assert set(have) == fleet_top[f"{i}.{kind}"], (i, kind)
    # Without the fleet's view the node prunes by its own scores (the same first round): other channels survive.
    own = _trainer(cls_data)
    own.run_round(target_sparsity=0.0, rank=4, local_steps=6, global_update=None)
    own.run_round(target_sparsity=0.3, rank=4, local_steps=2, global_update=None)
    assert all(set(k.channels) != fleet_top[f"{i}.channels"] for i, k in own.kept_maps().items())


def test_fleet_importance_of_the_wrong_model_is_refused_before_anything_changes(cls_data):
    tr = _trainer(cls_data)
    res = tr.run_round(target_sparsity=0.0, rank=4, local_steps=2, global_update=None)
    bad = LoraUpdate(res.update.modules, res.update.dense,
                     {"0.channels": GroupScores(idx=torch.tensor([0, 1]), score=torch.ones(2), size=7)})
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" in n}
    with pytest.raises(UpdateError, match="importance.0.channels"):
        tr.run_round(target_sparsity=0.0, rank=4, local_steps=2, global_update=bad)
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if "lora_" in n)


def test_the_round_cuts_before_its_steps_and_tracks_importance_only_when_asked(cls_data):
    """The node does what its config says: a cut (target above its sparsity) comes before the steps, which then
    recover from it; ``importance=False`` (a method that will not cut again) tracks and reports no scores."""
    tr = _trainer(cls_data)
    seen = []
    real = tr.prune

    def spy(target, random_groups=False):
        seen.append((tr.tracker.steps, tr.sparsity))
        return real(target, random_groups)

    tr.prune = spy
    first = tr.run_round(target_sparsity=0.0, rank=4, local_steps=5, global_update=None)
    assert seen == [] and LoraUpdate.from_bytes(first.payload).importance  # no cut; scores reported
    res = tr.run_round(target_sparsity=0.2, rank=4, local_steps=5, global_update=None, importance=False)
    assert seen == [(5, 0.0)] and res.sparsity >= 0.2 - 1e-9  # cut first, on the first round's 5 steps of scores
    assert tr.tracker.steps == 5 and not LoraUpdate.from_bytes(res.payload).importance  # nothing tracked since
    assert res.loss_end == pytest.approx(tr.evaluate("val", EVAL_BATCHES)["loss"], rel=1e-5)


def test_calibration_times_steps_and_changes_nothing(cls_data):
    """The startup timing (first-round step sizing) leaves weights, data order and random state as they were."""
    a, b = _trainer(cls_data, seed=3), _trainer(cls_data, seed=3)
    rng = torch.get_rng_state()
    a.model.train()
    drops = {mod: mod.p for mod in a.model.modules() if isinstance(mod, torch.nn.Dropout)}
    for mod in drops:  # dropout draws random numbers: the calibration must not consume them
        mod.p = 0.1
    c = a.calibrate(steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for mod, p in drops.items():
        mod.p = p
    assert set(c) == {"step_s", "step_cpu_s", "step_work_s", "fixed_s", "fixed_cpu_s", "fixed_work_s",
                      "width_scale"} and all(v > 0 for v in c.values())
    assert a.work_s == 0.0  # the modeled clock read the same spans and was left as it was
    # the steps' time is scaled from the widths of the batches it timed to the typical batch width
    cal = BatchStream(a.data, a.train_idx, SETTINGS.batch_size, a.stream.pad_id, a.causal, a.seed + 7919)
    timed = [next(cal)["input_ids"].shape[1] for _ in range(3)][1:]
    typical = mean_batch_width(a.data, a.train_idx, SETTINGS.batch_size, a.seed + 104729)
    assert c["width_scale"] == pytest.approx(typical / (sum(timed) / 2))
    assert all(p.grad is None for p in a.model.parameters())
    ra = a.run_round(target_sparsity=0.15, rank=4, local_steps=6, global_update=None)
    rb = b.run_round(target_sparsity=0.15, rank=4, local_steps=6, global_update=None)
    assert ra.loss_end == rb.loss_end and ra.update.modules.keys() == rb.update.modules.keys()
    for name, m in ra.update.modules.items():
        assert torch.equal(m.A, rb.update.modules[name].A) and torch.equal(m.rows, rb.update.modules[name].rows)
    with pytest.raises(ValueError, match="steps"):
        a.calibrate(steps=0)


def test_the_modeled_clock_counts_tokens_times_parameters_and_repeats_exactly(cls_data):
    """A simulated device's clock (engine.MODEL_STEP_S): a step costs tokens x matrix parameters, a pruned model is
    cheaper by the parameters it lost, the test pass is not round work, and the same run gives the same times."""
    a, b = _trainer(cls_data, seed=5), _trainer(cls_data, seed=5)
    batch = next(a.stream)
    params = sum(p.numel() for n, p in a.model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
    a._work(batch)
    assert a.work_s == pytest.approx(MODEL_STEP_S * batch["input_ids"].numel() * params)
    a.work_s = 0.0
    ra = a.run_round(target_sparsity=0.0, rank=4, local_steps=3, global_update=None)
    rb = b.run_round(target_sparsity=0.0, rank=4, local_steps=3, global_update=None)
    assert ra.metrics["work_s"] == rb.metrics["work_s"] > ra.metrics["train_work_s"] > 0
    dense_step = ra.metrics["train_work_s"] / 3
    pa = a.run_round(target_sparsity=0.4, rank=4, local_steps=3, global_update=None)
    pruned_step = pa.metrics["train_work_s"] / 3
    kept = sum(p.numel() for n, p in a.model.named_parameters() if p.dim() == 2 and "embeddings" not in n)
    assert pruned_step < dense_step and kept < params  # widths differ by batch, so the ratio only roughly follows


class StepClock:
    """A device clock that advances 1 s per local step and 0.5 s per evaluation pass, whatever the host does."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self.now = 0.0
        step, evaluate = trainer._train_step, trainer._evaluate

        def timed_step(*a, **kw):
            self.now += 1.0
            return step(*a, **kw)

        def timed_eval(*a, **kw):
            self.now += 0.5
            return evaluate(*a, **kw)

        trainer._train_step, trainer._evaluate = timed_step, timed_eval

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("finish_s", "steps"), [(10.2, 9), (10.6, 10), (3.0, 4), (200.0, 12)],
                         ids=["nearest-below", "nearest-above", "at-least-min", "at-most-max"])
def test_a_paced_round_stops_at_the_step_nearest_its_planned_finish(cls_data, finish_s, steps):
    """Validation costs 0.5 s before the steps and 0.5 s after, a step 1 s: ending after k steps takes 1 + k s.
    The test evaluation before them (0.5 s) is not round work, and the round is run with a different plan
    (local_steps) to show that the pace, not the plan, decides."""
    tr = _trainer(cls_data, test_path=str(cls_data), train=TrainSettings(batch_size=16, test_batches=1))
    clock = StepClock(tr)
    res = tr.run_round(target_sparsity=0.0, rank=4, local_steps=6, global_update=None,
                       pace=Pace(finish_s=finish_s, min_steps=4, max_steps=12, clock=clock))
    assert res.steps == steps and res.samples == 16 * steps
    assert clock.now == 0.5 + 0.5 + steps + 0.5  # the test pass, validation, the steps, validation


def test_pace_refuses_an_empty_step_range():
    with pytest.raises(ValueError, match="min_steps"):
        Pace(finish_s=1.0, min_steps=5, max_steps=4, clock=lambda: 0.0)


def test_evaluation_builds_no_autograd_graph(cls_data, monkeypatch):
    """Every round evaluates twice (and the final sync and export once more): with gradients on, each pass kept a
    graph it never used, and every node logged torch's "Converting a tensor with requires_grad=True to a scalar"
    warning as a warning line of its own."""
    tr = _trainer(cls_data)
    seen, forward = [], tr._forward_loss

    def recording(batch, adjusted=False):
        loss, logits = forward(batch, adjusted)
        seen.append(loss.requires_grad)
        return loss, logits

    monkeypatch.setattr(tr, "_forward_loss", recording)
    tr.evaluate("val")
    assert seen and not any(seen)
