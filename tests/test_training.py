"""The one training loop: schedule, checkpoints, resume after a kill, best-model selection, hooks."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cdeq.io import load_checkpoint, random_state, restore_random_state, save_checkpoint
from cdeq.training import BEST, CHECKPOINT, METRICS, Objective, OptimConfig, TrainLoop, epoch_stream, lr_factor


def fit(model, loss_fn, batches, cfg, run_dir, **options):
    """A supervised run through :class:`TrainLoop` (what the tasks' teacher training does)."""
    loop = TrainLoop(model, Objective(model, loss_fn), epoch_stream(batches), cfg, run_dir, progress=False, **options)
    return loop.run()


class _Killed(RuntimeError):
    pass


def _problem(seed: int = 0):
    """A small regression with dropout (so the RNG state matters) and 3 batches per epoch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)

    def batches(epoch: int):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(1000 + epoch))
        for idx in order.split(8):
            yield x[idx], y[idx]

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    return model, batches


def _loss(kill_at: int | None = None):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if kill_at is not None and calls["n"] == kill_at:
            raise _Killed(f"killed during step {kill_at}")
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {"calls": float(calls["n"])}

    return loss_fn


def test_lr_factor_warmup_then_cosine():
    cfg = OptimConfig(steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.5)
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        OptimConfig(steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(steps=1, lr=0.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)
    with pytest.raises(TypeError, match="OptimConfig"):
        TrainLoop(nn.Linear(2, 2), nn.Identity(), epoch_stream(lambda e: []), {"steps": 1})


def test_fit_trains_and_writes_checkpoint_and_metrics(tmp_path):
    make, batches = _problem()
    model = make()
    cfg = OptimConfig(steps=30, lr=5e-2, checkpoint_every=7, log_every=5)
    metrics = fit(model, _loss(), batches, cfg, tmp_path)
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert losses[-1] < losses[0] / 2
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)  # weights_only=True
    assert ckpt["step"] == 30 and ckpt["epoch"] == 9 and ckpt["offset"] == 3
    assert set(ckpt) >= {"model", "optimizer", "rng", "config", "history"}
    on_disk = json.loads((tmp_path / METRICS).read_text())
    assert on_disk["steps"] == 30 and on_disk["config"]["lr"] == 5e-2
    restored = make()
    restored.load_state_dict(ckpt["model"])
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


# mid-epoch, right after an epoch boundary, and with a checkpoint inside a history entry's window
@pytest.mark.parametrize("kill_at, log_every", [(5, 1), (7, 1), (5, 3)])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, kill_at, log_every):
    make, batches = _problem()
    cfg = OptimConfig(steps=10, lr=1e-2, warmup=2, checkpoint_every=2, log_every=log_every)
    straight = make()
    fit(straight, _loss(), batches, cfg, tmp_path / "a")

    killed = make()
    with pytest.raises(_Killed):
        fit(killed, _loss(kill_at=kill_at), batches, cfg, tmp_path / "b")
    saved = load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"]
    assert saved == 2 * ((kill_at - 1) // 2)
    resumed = make()  # a fresh process: new model, resumed from the checkpoint
    fit(resumed, _loss(), batches, cfg, tmp_path / "b")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    hist_a = json.loads((tmp_path / "a" / METRICS).read_text())["history"]
    hist_b = json.loads((tmp_path / "b" / METRICS).read_text())["history"]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]


def test_resume_refuses_another_config(tmp_path):
    make, batches = _problem()
    fit(make(), _loss(), batches, OptimConfig(steps=2, lr=1e-2), tmp_path)
    with pytest.raises(ValueError, match="resume"):
        fit(make(), _loss(), batches, OptimConfig(steps=3, lr=1e-2), tmp_path)


def test_select_keeps_the_best_validation_model(tmp_path):
    make, batches = _problem()
    model = make()
    scores = iter([0.3, 0.9, 0.5, 0.1])
    snapshots = {}

    def evaluate(m):
        value = next(scores)
        snapshots[value] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"acc": value}

    cfg = OptimConfig(steps=6, lr=1e-2, eval_every=2)
    metrics = fit(model, _loss(), batches, cfg, tmp_path, evaluate=evaluate, select="acc")
    assert metrics["best"] == {"step": 4, "value": 0.9}
    assert (tmp_path / BEST).exists()
    for k, v in model.state_dict().items():  # the best weights are loaded at the end
        assert torch.equal(v, snapshots[0.9][k])


def test_random_state_survives_a_checkpoint_file(tmp_path):
    """The state a checkpoint keeps loads with weights_only and restores the same draws; a bare
    CPU state (what checkpoints held before) is still accepted."""
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "c.pt", {"rng": random_state()})
    expected = torch.rand(4)
    torch.manual_seed(6)
    restore_random_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(5)
    old = torch.get_rng_state()
    torch.rand(2)
    restore_random_state(old)
    assert torch.equal(torch.rand(4), expected)


def test_random_state_restores_cuda_generators_when_the_devices_match(monkeypatch):
    """On a GPU, dropout draws from each device's generator: those states are kept and restored,
    unless the machine has another number of devices."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1], dtype=torch.uint8)] * 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = random_state()
    assert len(state["cuda"]) == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    restore_random_state(state)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restore_random_state(state)
    assert restored == [state["cuda"]]


def test_after_step_hook_runs_once_per_step_and_the_floor_is_a_setting(tmp_path):
    make, batches = _problem()
    seen = []

    class Recording(TrainLoop):
        def after_step(self):
            seen.append(self.optimizer.param_groups[0]["lr"])

    model = make()
    cfg = OptimConfig(steps=5, lr=1.0, min_lr_ratio=0.1)
    Recording(model, Objective(model, _loss()), epoch_stream(batches), cfg, progress=False).run()
    assert seen == pytest.approx([lr_factor(s, cfg) for s in range(5)])
    assert seen[-1] > 0.1


def test_a_run_without_a_terminal_prints_one_summary_line(tmp_path, capsys):
    make, batches = _problem()
    model = make()
    TrainLoop(model, Objective(model, _loss()), epoch_stream(batches), OptimConfig(steps=12, lr=1e-2),
              name="quiet").run()  # progress=None: a bar only on a terminal, and pytest's stderr is not one
    out, err = capsys.readouterr()
    assert out.count("[quiet] 12 steps") == 1 and "quiet" not in err
