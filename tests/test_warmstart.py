"""ConsistencyDEQ.solve (the student as a warm start for the teacher's solver) and the adaptive
budget of ConsistencyDEQ.infer(tol=...), on the toy DEQ of conftest."""
from __future__ import annotations

import copy

import pytest
import torch

import cdeq
from cdeq.consistency import ConsistencyDEQ, DistillConfig, distill
from conftest import ToyDEQ, count_layer_calls, toy_batches, toy_trajectories


@pytest.fixture(scope="module")
def distilled():
    """A briefly distilled student: it ends near its own fixed point, not quite the teacher's."""
    torch.manual_seed(0)
    teacher = ToyDEQ()
    train = toy_trajectories(teacher, toy_batches(teacher, n=512, seed=1), steps=12)
    student = ConsistencyDEQ(teacher)
    distill(student, train, DistillConfig(steps=150, lambda_task=0.0, rollout_steps=2, anchor_weight=0.0),
            progress=False)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    return student, x


def anderson_from_z0(teacher, x, tol):
    u = teacher.inject(x)
    return cdeq.solve(lambda z: teacher.layer(z, u), teacher.init_state(u), max_iter=50, tol=tol)


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_warm_start_reaches_tol_in_fewer_nfe_than_anderson_from_z0(distilled, tol):
    """The mean NFE per sample (student steps included) to reach tol; the printed table is the one
    docs/inference.md reports (seeding Anderson's window with the student's (z, h(z)) pairs)."""
    student, x = distilled
    _, cold = anderson_from_z0(student.teacher, x, tol)
    rows = {"anderson from z0": cold}
    for warm in (1, 2):
        for seed in (False, True):
            rows[f"warm {warm}, seed_history={seed}"] = student.solve(x, tol=tol, warm=warm, seed_history=seed)[1]
    for name, info in rows.items():
        assert bool(info.converged.all()), name
        print(f"tol {tol:g}: {name}: mean NFE {info.steps.float().mean().item():.2f}")
    assert rows["warm 1, seed_history=False"].steps.float().mean() < cold.steps.float().mean()


def test_solve_counts_every_network_call_and_returns_the_teachers_equilibrium(distilled):
    student, x = distilled
    teacher_calls, student_calls = count_layer_calls(student.teacher), count_layer_calls(student.backbone)
    try:
        z, info = student.solve(x, tol=1e-6, warm=2, max_nfe=30, m=4)
    finally:
        del student.teacher.layer, student.backbone.layer  # the instance attributes count_layer_calls set
    assert isinstance(info, cdeq.SolverInfo)
    assert student_calls[0] == 2 and teacher_calls[0] == info.nfe - 2 + 1  # + the solver's check call
    assert student.nfe == info.nfe <= 30
    assert int(info.steps.max()) == info.nfe and int(info.steps.min()) > 2
    assert bool(info.converged.all()) and float(info.rel_residual.max()) <= 1e-6
    _, exact = anderson_from_z0(student.teacher, x, 1e-7)
    z_star, _ = cdeq.solve(lambda s: student.teacher.layer(s, student.teacher.inject(x)), z, max_iter=50, tol=1e-7)
    torch.testing.assert_close(z, z_star, rtol=0, atol=1e-4)


def test_warm_zero_is_the_teachers_solver_from_its_z0(distilled):
    student, x = distilled
    z, info = student.solve(x, tol=1e-4, warm=0)
    z_ref, ref = anderson_from_z0(student.teacher, x, 1e-4)
    assert torch.equal(z, z_ref) and info.nfe == ref.nfe and torch.equal(info.steps, ref.steps)


def test_solve_rejects_bad_budgets(distilled):
    student, x = distilled
    with pytest.raises(ValueError, match="warm: expected an int >= 0"):
        student.solve(x, warm=-1)
    with pytest.raises(ValueError, match="max_nfe: expected an int > warm=3"):
        student.solve(x, warm=3, max_nfe=3)
    with pytest.raises(ValueError, match="seed_history=True: needs warm >= 1"):
        student.solve(x, warm=0, seed_history=True)
    with pytest.raises(ValueError, match="unknown option"):
        student.solve(x, solver="broyden", seed_history=True)
    with pytest.raises(TypeError, match="seed_history=True or history=..., not both"):
        student.solve(x, seed_history=True, history=[])


def test_adaptive_infer_freezes_each_sample_at_its_first_small_step(distilled):
    """Row i of infer(tol=...) is row i of the fixed-budget rollout after info.steps[i] steps, and
    that is the first step whose relative change met tol."""
    student, x = distilled
    tol = 0.01
    out = student.infer(x, nfe=6, tol=tol)
    used = student.info.steps
    assert int(used.max()) == student.nfe and 2 < float(used.float().mean()) < 6
    traj = student.rollout(x, 6)
    prev = [student.initial_state(student.inject(x))] + traj
    change = torch.stack([(b - a).norm(dim=1) / b.norm(dim=1) for a, b in zip(prev, traj)])  # (6, B)
    first = torch.where((change <= tol).any(0), (change <= tol).float().argmax(0) + 1, 6)
    assert torch.equal(used, first)
    expected = torch.stack([traj[int(k) - 1][i] for i, k in enumerate(used)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_adaptive_infer_stops_the_batch_early_and_zero_tol_is_the_fixed_budget(distilled):
    student, x = distilled
    student.infer(x, nfe=8, tol=0.5)
    assert student.nfe < 8 and bool(student.info.converged.all())
    torch.testing.assert_close(student.infer(x, nfe=3, tol=0.0), student.infer(x, nfe=3), rtol=0, atol=0)
    for bad in (-1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="tol: expected a finite relative change"):
            student.infer(x, nfe=2, tol=bad)


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_a_prefix_method_gives_every_budget_from_one_solve(solver):
    """The evaluation grid's one-pass path: the iterates of one solve of the largest budget equal
    separate solves of each budget (the teacher's solvers, and the warm start)."""
    from cdeq.pipeline.evaluate import PrefixMethod, TeacherSolver, WarmStarted

    teacher = ToyDEQ()
    x = toy_batches(teacher, n=16, batch=16)[0][0]
    student = ConsistencyDEQ(teacher, init="linear")
    student.build(x)
    budgets = [1, 2, 4, 8, 12, 16, 32]
    methods = [TeacherSolver(teacher, solver, **({"m": 5} if solver == "anderson" else {}))]
    if solver == "anderson":
        methods.append(WarmStarted(student, m=5))
    with torch.no_grad():
        for method in methods:
            assert isinstance(method, PrefixMethod)
            for k, z in zip(budgets, method.states(x, budgets)):
                assert torch.allclose(z, method.state(x, k), rtol=1e-5, atol=1e-6), (type(method).__name__, k)
            # budget 1 alone takes a shortcut; with a larger budget it is the solve's first kept iterate
            assert torch.allclose(method.states(x, [1])[0], method.states(x, [1, 2])[0], rtol=1e-5, atol=1e-6)


@pytest.fixture
def fresh_teacher(distilled):
    """A copy of the distilled student's teacher with a DEQ, so warm starts set on it stay in the test."""
    student, _ = distilled
    return copy.deepcopy(student.teacher).set_deq(cdeq.DEQ(f_max_iter=60, f_tol=1e-5))


def test_a_model_with_a_warm_start_solves_from_the_students_estimate(distilled, fresh_teacher):
    student, x = distilled
    model = fresh_teacher
    n_params, keys = len(list(model.parameters())), set(model.state_dict())
    _, cold = model.equilibrium(x)
    model.set_warm_start(student, nfe=1)
    z0, _ = model.equilibrium(x, max_iter=0)
    torch.testing.assert_close(z0, student.infer(x, nfe=1), rtol=0, atol=0)
    z, warm = model.equilibrium(x)
    assert bool(warm.converged.all()) and warm.steps.float().mean() < cold.steps.float().mean()
    assert len(list(model.parameters())) == n_params and set(model.state_dict()) == keys
    model.set_warm_start(None)
    z_cold, again = model.equilibrium(x)
    assert torch.equal(again.steps, cold.steps)
    torch.testing.assert_close(z, z_cold, rtol=0, atol=1e-4)


def test_training_from_a_warm_start_gets_the_implicit_gradient_of_the_same_equilibrium(distilled, fresh_teacher):
    """The implicit backward depends on z* alone: starting the solve elsewhere must not change it."""
    student, x = distilled
    model = fresh_teacher.set_deq(cdeq.DEQ(f_max_iter=100, f_tol=1e-9, b_tol=1e-9, b_max_iter=100))

    def grads():
        model.zero_grad()
        logits, _ = model(x)
        logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    model.requires_grad_(True)  # the distilled student froze its teacher, whose copy this is
    student.zero_grad(set_to_none=True)
    cold = grads()
    model.set_warm_start(student, nfe=2)
    warm = grads()
    assert all(p.grad is None for p in student.parameters())  # the estimate is a constant of the solve
    for a, b in zip(cold, warm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_set_warm_start_rejects_bad_arguments(distilled, fresh_teacher):
    student, x = distilled
    with pytest.raises(TypeError, match="estimator must have a state"):
        fresh_teacher.set_warm_start(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nfe: expected an integer >= 1, got 0"):
        fresh_teacher.set_warm_start(student, nfe=0)
    narrow = ToyDEQ(d=16).set_deq(cdeq.DEQ()).set_warm_start(student)
    with pytest.raises(ValueError, match=r"warm start's state\(x, 1\): expected shape \(128, 16\)"):
        narrow.equilibrium(x)
