"""Tasks: batches and labels, loss and metric, a two-step "tiny" training per task, reloading the
teacher, and the teacher report. Tasks whose data set is not on this machine are skipped."""
from __future__ import annotations

import json
import math

import pytest
import torch

import cdeq.data
from cdeq import tasks
from cdeq.io import load_checkpoint
from cdeq.tasks.base import IGNORE
from cdeq.tasks.report_teacher import teacher_report
from cdeq.training import CHECKPOINT, METRICS

_TASKS: dict[str, tasks.Task] = {}


def _task(name: str) -> tasks.Task:
    if not cdeq.data.describe(name).present:
        pytest.skip(f"data set {name!r} is not on this machine (fetch it with `python -m cdeq.data fetch {name}`)")
    if name not in _TASKS:
        _TASKS[name] = tasks.get(name, preset="tiny")
    return _TASKS[name]


def test_registry_rejects_unknown_names():
    assert tasks.available() == ["cora", "citeseer", "fashion-mnist", "mnist", "gutenberg", "wikitext-2"]
    with pytest.raises(ValueError, match="unknown task"):
        tasks.get("imagenet")


def test_unknown_preset_is_an_error():
    task = _task("cora")
    with pytest.raises(ValueError, match="preset"):
        task.recipe("huge")


def test_graph_batches_mask_labels_outside_the_split():
    task = _task("cora")
    batches = {split: list(task.batches(split)) for split in ("train", "val", "test")}
    for split, [(x, y)] in batches.items():
        assert x.shape == (1, 2708, 1433) and y.shape == (1, 2708)
        assert int((y != IGNORE).sum()) == {"train": 140, "val": 500, "test": 1000}[split]
    assert torch.allclose(batches["train"][0][0].sum(-1)[0][:5], torch.ones(5))  # row-normalised
    with pytest.raises(ValueError, match="split"):
        next(task.batches("dev"))


def test_image_batches_split_and_shuffle_deterministically():
    task = _task("mnist")
    x, y = next(task.batches("train", batch_size=16, shuffle=True, seed=3))
    x2, y2 = next(task.batches("train", batch_size=16, shuffle=True, seed=3))
    x3, _ = next(task.batches("train", batch_size=16, shuffle=True, seed=4))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (16,)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert sum(len(b[1]) for b in task.batches("val", batch_size=1000)) == 5000
    assert abs(float(x.mean())) < 0.5  # standardised


def test_text_batches_are_shifted_segments():
    task = _task("gutenberg")
    x, y = next(task.batches("test", batch_size=3, seq_len=8))
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x[1, 0:1], task.data.test[8:9])  # non-overlapping segments


def test_loss_ignores_masked_labels_and_metrics_are_right():
    task = _task("cora")
    _, y = next(task.batches("test"))
    perfect = torch.nn.functional.one_hot(y.clamp_min(0), int(task.data.num_classes)).float() * 10
    assert task.evaluate(lambda x: perfect, "test") == 1.0
    wrong = perfect.clone()
    wrong[y == IGNORE] = -wrong[y == IGNORE]  # changes only labels that do not count
    assert torch.allclose(task.loss(perfect, y), task.loss(wrong, y))
    text = _task("gutenberg")
    uniform = lambda x: torch.zeros(*x.shape, text.vocab_size)  # noqa: E731
    assert text.evaluate(uniform, "test", limit=2) == pytest.approx(text.vocab_size, rel=1e-4)


@pytest.mark.parametrize("name", ["cora", "citeseer", "fashion-mnist", "mnist", "gutenberg"])
def test_tiny_teacher_two_step_training_and_reload(tmp_path, name):
    task = _task(name)
    metrics = task.train_teacher(tmp_path, preset="tiny", progress=False)
    assert metrics["steps"] == 2
    value = metrics["test"][task.metric]
    assert 0.0 <= value <= 1.0 if task.metric == "accuracy" else 1.0 < value < 2 * task.vocab_size
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt["step"] == 2 and ckpt["meta"]["preset"] == "tiny"
    assert json.loads((tmp_path / METRICS).read_text())["test"] == metrics["test"]
    teacher = task.load_teacher(tmp_path)
    recipe = task.recipe("tiny")
    again = task.evaluate(lambda x: teacher(x)[0], "test", batch_size=recipe["batch_size"],
                          limit=recipe.get("test_batches"), **task.batch_options(recipe))
    assert again == pytest.approx(value, rel=1e-5)


def test_tiny_explicit_training(tmp_path):
    task = _task("cora")
    metrics = task.train_explicit(tmp_path, preset="tiny", progress=False)
    assert metrics["steps"] == 2 and metrics["meta"]["model"] == "GCN"


def test_teacher_report_on_a_tiny_teacher(tmp_path):
    task = _task("cora")
    task.train_teacher(tmp_path, preset="tiny", progress=False)
    rep = teacher_report(task, task.load_teacher(tmp_path), budgets=(1, 2))
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["nfe_mean"] >= 1
    assert set(rep["anderson"]) == set(rep["fixed_point"]) == {"1", "2"}
    # The IGNN layer is a contraction: two fixed-point steps leave a smaller residual than one.
    fp = rep["fixed_point"]
    assert fp["2"]["rel_residual_mean"] < fp["1"]["rel_residual_mean"]
    assert not math.isnan(rep["rel_residual_mean"])
