"""Trustworthy runs: a stage's result does not depend on what ran before it, damaged artefacts are
named and recomputed, one writer per run directory, a stop saves a checkpoint and resumes exactly,
and the table names the commit of every stage."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch
from torch import nn

from cdeq import pipeline
from cdeq.cli import main
from cdeq.io import load_checkpoint
from cdeq.lock import RunLock
from cdeq.training import Interrupted, Objective, OptimConfig, TrainLoop, epoch_stream

cora_present = pytest.mark.skipif(
    not __import__("cdeq.data", fromlist=["describe"]).describe("cora").present,
    reason="Cora is not available (run `python -m cdeq.data fetch cora`)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Cora run's teacher and trajectories (every later stage is computed by the tests)."""
    out = tmp_path_factory.mktemp("trust") / "cora"
    config = pipeline.PipelineConfig(task="cora", preset="tiny", out=str(out), command="test")
    run = pipeline.Run(config)
    run.train_teacher()
    run.sample()
    return config


def copy_upstream(config, dest):
    out = config.out
    for stage in os.listdir(out):
        if stage.startswith(("teacher-", "trajectories-")):
            shutil.copytree(os.path.join(out, stage), dest / stage)
    return dataclasses.replace(config, out=str(dest))


@cora_present
def test_each_stage_computed_alone_equals_the_stage_computed_after_the_others(tiny, tmp_path):
    after = pipeline.Run(copy_upstream(tiny, tmp_path / "after"))
    after.distill("anderson")
    after.distill("plain")
    hyper_after, _ = after.train_hyperdeq()
    torch.manual_seed(12345)  # whatever the process drew before
    alone, _ = pipeline.Run(copy_upstream(tiny, tmp_path / "alone")).train_hyperdeq()
    for name, value in hyper_after.state_dict().items():
        assert torch.equal(value, alone.state_dict()[name]), name


@cora_present
def test_a_damaged_artefact_is_named_and_its_stage_recomputed(tiny, tmp_path, capsys):
    config = copy_upstream(tiny, tmp_path / "run")
    run = pipeline.Run(config)
    student, _ = run.distill("anderson")
    stage = run.stages["cdeq"]
    record = json.loads((stage.dir / "done.json").read_text())
    assert {"model.pt", "checkpoint.pt"} <= set(record["artefacts"]) and record["commit"] == run.commit
    with open(stage.dir / "model.pt", "r+b") as f:  # 128 bytes overwritten inside the weights
        f.seek(200)
        f.write(bytes(128))
    rerun = pipeline.Run(config)
    again, _ = rerun.distill("anderson")
    log = capsys.readouterr().out
    assert "[cdeq] damaged files" in log and "model.pt" in log and "[cdeq] done" in log
    for name, value in student.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert rerun.stage_commits()[stage.dir.name] == run.commit


@cora_present
def test_a_damaged_best_checkpoint_retrains_the_teacher_to_the_same_weights(tiny, tmp_path, capsys):
    config = copy_upstream(tiny, tmp_path / "run")
    teacher_dir = next(p for p in (tmp_path / "run").iterdir() if p.name.startswith("teacher-"))
    before = load_checkpoint(teacher_dir / "best.pt")["model"]
    with open(teacher_dir / "best.pt", "r+b") as f:
        f.truncate(300)
    pipeline.Run(config).train_teacher()
    assert "[teacher] damaged files" in capsys.readouterr().out
    after = load_checkpoint(teacher_dir / "best.pt")["model"]
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


@cora_present
def test_a_second_writer_fails_at_once_naming_the_holder(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    with RunLock(out):
        code = main(["run", "cora", "--preset", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"PID {os.getpid()}" in err
    assert not any(p.name.startswith("teacher-") for p in out.iterdir())  # no stage started


def test_infinite_settings_are_usage_errors(capsys):
    for setting in ("distill_lr=inf", "anchor_weight=inf", "rollout_weight=1e300"):
        with pytest.raises(SystemExit):
            main(["run", "cora", "--set", setting, "--show-config"])
        assert "finite number" in capsys.readouterr().err


def test_sigint_saves_a_checkpoint_at_a_step_boundary_and_a_rerun_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]
    cfg = OptimConfig(steps=9, lr=1e-2, checkpoint_every=100)

    def train(run_dir, stop_at=None):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        calls = [0]

        def loss(m, batch):
            calls[0] += 1
            if calls[0] == stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # mid-step: the loop finishes the step, then stops
            return ((m(batch[0]) - batch[1]) ** 2).mean(), {}
        TrainLoop(model, Objective(model, loss), epoch_stream(lambda e: data), cfg, run_dir, progress=False).run()
        return model

    straight = train(tmp_path / "a")
    with pytest.raises(Interrupted, match="stopped at step 5; its checkpoint is in .*b, from which the same training resumes"):
        train(tmp_path / "b", stop_at=5)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 5
    resumed = train(tmp_path / "b")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
