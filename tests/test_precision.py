"""Mixed precision (issue 16): f under bf16 autocast, the solver's small system and the losses in float32.
The fixed point under bf16 and the bf16 trajectory store are tested in tests/test_store.py."""
from __future__ import annotations

import doctest

import pytest
import torch
from conftest import AutocastSpyDEQ, ToyDEQ, toy_batches, toy_trajectories

import cdeq
import cdeq.precision
from cdeq.consistency import ConsistencyDEQ, DistillConfig, OnlineTeacher, Storage, distill
from cdeq.precision import amp_layers
from cdeq.training import Objective, OptimConfig, TrainLoop, epoch_stream


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_module_example_runs():
    assert doctest.testmod(cdeq.precision, raise_on_error=True).attempted > 0


def test_the_anderson_system_stays_float32_under_any_autocast(monkeypatch):
    """Under amp_layers and under the caller's own autocast: f runs in bf16, every bmm and the
    bordered system of the solver in float32."""
    model = AutocastSpyDEQ()
    u = model.inject(torch.randn(8, 8))
    dtypes: list[torch.dtype] = []
    bmm, solve_ex = torch.bmm, torch.linalg.solve_ex

    def spy_bmm(*args, **kw):
        out = bmm(*args, **kw)
        dtypes.append(out.dtype)
        return out

    def spy_solve(a, b, **kw):
        dtypes.extend([a.dtype, b.dtype])
        return solve_ex(a, b, **kw)

    monkeypatch.setattr(torch, "bmm", spy_bmm)
    monkeypatch.setattr(torch.linalg, "solve_ex", spy_solve)
    for scope in (lambda: amp_layers(model, "bf16"), lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        dtypes.clear()
        model.seen.clear()
        with torch.no_grad(), scope():
            z, _ = cdeq.solve(lambda z: model.layer(z, u), model.init_state(u), max_iter=6, tol=0.0, m=3)
        assert z.dtype == torch.float32
        assert dtypes and set(dtypes) == {torch.float32}
        assert all(on and dtype == torch.bfloat16 for on, dtype in model.seen)


def test_amp_layers_restores_and_rejects_what_it_cannot_autocast():
    model = ToyDEQ()
    with amp_layers(model, "bf16"):
        assert model.amp == "bf16"
    assert model.amp is None
    with amp_layers(model, None):
        assert model.amp is None
    with pytest.raises(ValueError, match="holds no DEQModel"):
        with amp_layers(torch.nn.Linear(2, 2), "bf16"):
            pass
    with pytest.raises(ValueError, match="amp: expected None or one of"):
        with amp_layers(model, "fp16"):
            pass
    with pytest.raises(ValueError, match="amp: expected None or one of"):
        OptimConfig(amp="float16")


def test_training_steps_autocast_f_and_keep_the_loss_float32():
    """A teacher trained with OptimConfig(amp="bf16"): its layer ran in bf16, its loss is float32,
    validation ran in full precision, and the flag is off afterwards."""
    teacher = AutocastSpyDEQ()
    batches = toy_batches(ToyDEQ(), n=64, batch=16)
    losses: list[torch.dtype] = []

    def step(model, batch):
        x, y = batch
        u = model.inject(x)
        z, _ = cdeq.solve(lambda z: model.layer(z, u), model.init_state(u), max_iter=4, tol=0.0)
        loss = torch.nn.functional.cross_entropy(model.readout(model.layer(z, u)), y)
        losses.append(loss.dtype)
        return loss, {}

    def evaluate(model):
        model.seen.append(("validation", model.amp))
        return {}

    loop = TrainLoop(teacher, Objective(teacher, step), epoch_stream(lambda e: batches),
                     OptimConfig(steps=3, amp="bf16"), evaluate=evaluate, progress=False)
    loop.run()
    training = [s for s in teacher.seen if s[0] != "validation"]
    assert len(training) == 3 * 6  # per step: 4 solver calls, the residual check, the readout's
    assert all(s == (True, torch.bfloat16) for s in training)
    assert ("validation", None) in teacher.seen
    assert losses == [torch.float32] * 3 and teacher.amp is None


@pytest.mark.parametrize("online", [False, True])
def test_distillation_under_bf16_stays_close_to_float32(online):
    """The student's calls of f (and the online teacher's) run in bf16; the states of the student it
    trains are close to the float32 student's (same seed, same k)."""
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=128, batch=32)
    storage = Storage("target") if online else Storage()
    traj = toy_trajectories(teacher, batches, steps=6, storage=storage)
    students = []
    for amp in (None, "bf16"):
        student = ConsistencyDEQ(teacher, init="linear")
        teacher_in_step = OnlineTeacher(teacher, steps=6, solver_options={"m": 5}, amp=amp) if online else None
        distill(student, traj, DistillConfig(steps=20, batch_size=16, rollout_steps=2, amp=amp), progress=False,
                online=teacher_in_step)
        students.append(student)
    assert students[1].backbone.amp is None
    assert not all(torch.equal(a, b) for a, b in zip(students[0].parameters(), students[1].parameters()))
    x = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        for nfe in (1, 2):
            exact, mixed = (s.state(x, nfe) for s in students)
            assert relative(mixed, exact) < 1e-2


def test_a_graph_layer_runs_under_bf16_with_its_sparse_product_in_float32():
    """CPU has no bf16 sparse kernel: IGNN's adjacency product leaves autocast, its dense ones stay."""
    from cdeq.models.ignn import IGNN

    g = torch.Generator().manual_seed(0)
    edges = torch.randint(0, 30, (2, 90), generator=g)
    model = IGNN(edges, num_nodes=30, in_features=5, num_classes=3, hidden=16).eval()
    x = torch.randn(1, 30, 5, generator=g)
    with torch.no_grad():
        u = model.inject(x)
        exact, _ = cdeq.solve(lambda z: model.layer(z, u), model.init_state(u), max_iter=40, tol=1e-6)
        with amp_layers(model, "bf16"):
            mixed, _ = cdeq.solve(lambda z: model.layer(z, u), model.init_state(u), max_iter=40, tol=1e-3)
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, exact)
    assert relative(mixed, exact) < 2e-2
