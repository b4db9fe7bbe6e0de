"""C-DEQ student, schedules and distillation (Eq. 5-11, Algorithms 1-2) on the toy DEQs of conftest."""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdeq
from cdeq.consistency import DistillConfig, equilibrium_error, teacher_error
from cdeq.consistency.distill import check_state_shapes, distill
from cdeq.consistency.losses import relative_error
from cdeq.consistency.schedule import TimeSchedule
from cdeq.consistency.student import ConsistencyDEQ, anderson_step, batch_dot, batch_sq_norm
from cdeq.consistency.trajectories import sample_trajectories
from cdeq.state import as_tuple
from conftest import ToyDEQ, ToyGraphDEQ, ToyTupleDEQ, count_layer_calls, toy_batches, toy_trajectories


# ------------------------------------------------------------------------------------------------
def test_time_maps_and_coefficients_match_eq5_eq6_b3():
    s = TimeSchedule(eps=0.02, T=2.0, gamma=1.5, rho=0.3, beta=0.6)
    for t in [0.02, 0.5, 1.3, 2.0]:
        expect = ((t - 0.02) / (2.0 - 0.02)) ** 1.5
        assert s.c_skip(t) == pytest.approx(expect)
        assert s.c_out(t) == pytest.approx(1 - expect)
    for k in [0, 1, 5, 40]:
        assert s.train_time(k) == pytest.approx(0.02 + (1 - math.exp(-0.3 * k)) * 1.98)
    ks = torch.tensor([0, 1, 5])
    assert torch.allclose(s.train_time(ks), torch.tensor([s.train_time(int(k)) for k in ks]), atol=1e-6)
    times = s.inference_times(4)
    assert times == pytest.approx([0.02 + (1 - 0.6**j) * 1.98 for j in range(4)])
    assert times[0] == 0.02
    aligned = TimeSchedule(eps=0.02, T=2.0, rho=0.3)  # beta = e^{-rho}: inference step j at t_j of Eq. 6
    assert aligned.inference_times(5) == pytest.approx([aligned.train_time(j) for j in range(5)])
    assert s.c_skip(2.0) == 1.0 and s.c_skip(0.02) == 0.0


def test_schedule_rejects_bad_values():
    s = TimeSchedule()
    with pytest.raises(ValueError, match="t: times must lie in"):
        s.c_skip(s.T + 0.5)
    with pytest.raises(ValueError, match="nfe"):
        s.inference_times(0)
    with pytest.raises(ValueError, match="schedule"):
        s.inference_times(2, [s.eps, s.T + 1])
    with pytest.raises(ValueError, match="schedule: expected 3"):
        s.inference_times(3, [s.eps, s.T])
    for bad in [dict(eps=1.0, T=1.0), dict(gamma=0.5), dict(rho=0.0), dict(beta=1.0)]:
        with pytest.raises(ValueError):
            TimeSchedule(**bad)


def test_student_starts_as_teacher_and_meets_boundary_condition():
    teacher = ToyDEQ()
    student = ConsistencyDEQ(teacher, schedule=TimeSchedule(eps=0.01, T=1.0))
    x = torch.randn(5, 8)
    u = student.inject(x)
    z = torch.randn(5, 32)
    for t in [0.01, 0.4, 1.0]:  # W = [I | 0]: h = f whatever the time
        assert torch.allclose(student.h(z, t, u), teacher.layer(z, teacher.inject(x)), atol=1e-6)
    with torch.no_grad():
        student.proj[0].weight.normal_()  # boundary condition holds for any h
        hz = student.h(z, 1.0, u)
        assert torch.equal(student.g(z, 1.0, hz), z)
        assert torch.equal(student.g(z, 1.0, hz, z + 1, hz), z)
        assert student.g(z, 0.01, hz) is hz  # c_skip(eps) = 0, c_out = 1: the first step is P itself
    with pytest.raises(ValueError, match="times must lie in"):
        student.h(z, 1.5, u)
    with pytest.raises(ValueError, match="nfe"):
        student.infer(x, nfe=0)
    with pytest.raises(ValueError, match="structure"):
        ConsistencyDEQ(teacher, structure="broyden")


def test_anderson_step_float32_near_convergence_matches_float64():
    """The expanded inner products stay accurate when r_k ~ r_{k-1} (the ridge dominates the error)."""
    torch.manual_seed(0)
    z, zp = torch.randn(4, 3, 50, dtype=torch.float64), torch.randn(4, 3, 50, dtype=torch.float64)
    r = torch.randn(4, 3, 50, dtype=torch.float64)
    hz, hp = z + r, zp + r * (1 + 1e-2 * torch.randn_like(r))
    ref = anderson_step(z, hz, zp, hp, lam=1e-4)
    ours = anderson_step(z.float(), hz.float(), zp.float(), hp.float(), lam=1e-4)
    # forming d keeps the error ~2e-4 here; expanding ||d||^2 into inner products gave 7e-3
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-3)


def test_batch_dot_and_sq_norm_are_per_sample_over_all_parts():
    torch.manual_seed(0)
    a = (torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    b = (torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    want = torch.stack([sum((p[i] * q[i]).sum() for p, q in zip(a, b)) for i in range(3)])
    torch.testing.assert_close(batch_dot(a, b), want)
    torch.testing.assert_close(batch_sq_norm(a), batch_dot(a, a))
    torch.testing.assert_close(batch_sq_norm(a[0]), a[0].flatten(1).square().sum(1))


def test_anderson_step_with_exact_h_is_two_step_anderson():
    """Eq. 7 with h = f on a linear problem == classic Anderson with a two-iterate history."""
    torch.manual_seed(0)
    n = 6
    A = torch.randn(n, n, dtype=torch.float64)
    A = 0.7 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(3, n, dtype=torch.float64)
    f = lambda z: z @ A.t() + b  # noqa: E731
    for beta in (1.0, 0.6):
        _, info = cdeq.solve(f, torch.zeros(3, n, dtype=torch.float64), solver="anderson", m=2, tau=beta, lam=0.0,
                             max_iter=4, tol=0.0, return_states="all")
        zs = info.states
        for k in (1, 2, 3):
            z, zp = zs[k], zs[k - 1]
            ours = anderson_step(z, f(z), zp, f(zp), beta_aa=beta, lam=0.0)
            # Walker & Ni's difference form of AA(1): gamma = <r_k, dr> / <dr, dr>
            r, rp = f(z) - z, f(zp) - zp
            dr, dz = r - rp, z - zp
            gamma = (r * dr).sum(1, keepdim=True) / (dr * dr).sum(1, keepdim=True)
            classic = z + beta * r - gamma * (dz + beta * dr)
            assert torch.allclose(ours, classic, atol=1e-10)
            assert torch.allclose(ours, zs[k + 1], atol=1e-10)


@pytest.mark.parametrize("structure", ["anderson", "plain"])
def test_inference_costs_one_network_evaluation_per_step(structure):
    student = ConsistencyDEQ(ToyDEQ(), structure=structure)
    x = torch.randn(4, 8)
    student.build(x)
    calls = count_layer_calls(student.backbone)
    for J in (1, 2, 5):
        calls[0] = 0
        z = student.infer(x, nfe=J)
        assert calls[0] == J and student.nfe == J
        assert z.shape == (4, 32)
    calls[0] = 0
    assert student.predict(x, nfe=3).shape == (4, 4) and calls[0] == 3


def _perturbed_student(teacher: nn.Module, x: torch.Tensor) -> ConsistencyDEQ:
    student = ConsistencyDEQ(teacher, example=x)
    with torch.no_grad():
        for lin in student.proj:
            lin.weight.add_(0.1 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(1)))
    return student


@pytest.mark.parametrize("teacher_cls, d_in", [(ToyDEQ, 8), (ToyTupleDEQ, 6)])
def test_fused_inference_matches_the_eager_steps(teacher_cls, d_in):
    x = torch.randn(6, d_in, generator=torch.Generator().manual_seed(0))
    student = _perturbed_student(teacher_cls(), x)
    eager = student.infer(x, nfe=4)
    student.fused = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would fail here
        fused = student.infer(x, nfe=4)
    assert student.fused and student.nfe == 4
    for a, b in zip(as_tuple(eager), as_tuple(fused)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_inference_falls_back_to_eager_when_it_cannot_compile(monkeypatch):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    student = _perturbed_student(ToyDEQ(), x)
    eager = student.infer(x, nfe=3)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr("cdeq.consistency.student.fused_inference_step", lambda: no_compiler)
    student.fused = True
    with pytest.warns(RuntimeWarning, match="could not be compiled .*no C\\+\\+ compiler.*running it eager"):
        out = student.infer(x, nfe=3)
    assert not student.fused and torch.equal(out, eager)


def test_schedule_must_be_a_time_schedule():
    with pytest.raises(TypeError, match="schedule: expected a TimeSchedule"):
        ConsistencyDEQ(ToyDEQ(), schedule={"eps": 0.05})


def test_nfe1_is_h_at_z0_and_custom_schedule():
    teacher = ToyDEQ()
    student = ConsistencyDEQ(teacher, schedule=TimeSchedule(eps=0.05))
    x = torch.randn(4, 8)
    with torch.no_grad():
        u = teacher.inject(x)
        assert torch.allclose(student.infer(x, nfe=1), teacher.layer(teacher.init_state(u), u), atol=1e-6)
    out = student.infer(x, nfe=2, schedule=[0.05, 0.5])
    assert out.shape == (4, 32)
    with pytest.raises(ValueError, match="schedule"):
        student.infer(x, nfe=2, schedule=[0.05, 1.5])


def test_state_dict_round_trip_builds_w():
    teacher = ToyDEQ()
    a = ConsistencyDEQ(teacher, example=torch.randn(2, 8))
    with torch.no_grad():
        a.proj[0].weight.add_(0.1 * torch.randn_like(a.proj[0].weight))
    b = ConsistencyDEQ(teacher)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    assert torch.allclose(a.infer(x, nfe=3), b.infer(x, nfe=3))


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled():
    torch.manual_seed(0)
    teacher = ToyDEQ()
    train = toy_trajectories(teacher, toy_batches(teacher, n=1024, seed=1))
    test = toy_trajectories(teacher, toy_batches(teacher, n=512, seed=2))
    out = {"teacher": teacher, "test": test}
    for structure in ("anderson", "plain"):
        student = ConsistencyDEQ(teacher, structure=structure)
        cfg = DistillConfig(steps=600, lambda_task=0.0, rollout_steps=4, anchor_weight=0.0)
        distill(student, train, cfg, progress=False)
        out[structure] = equilibrium_error(student.state, test, [1, 2, 4])
    return out


def test_distilled_student_beats_teacher_at_one_step_and_improves_with_steps(distilled):
    teacher_err = teacher_error(distilled["test"], [1, 2, 4])
    err = distilled["anderson"]
    assert err[1] * 3 <= teacher_err[1], (err, teacher_err)
    assert err[1] > err[2] > err[4], err


def test_plain_ablation_runs_beside(distilled):
    teacher_err = teacher_error(distilled["test"], [1])
    plain = distilled["plain"]
    assert plain[1] * 2 <= teacher_err[1], (plain, teacher_err)
    assert plain[4] < plain[1]


def test_distill_rejects_other_teacher_and_wrong_shapes():
    teacher = ToyDEQ()
    traj = toy_trajectories(teacher, toy_batches(teacher, n=64, batch=32), steps=4)
    other = ConsistencyDEQ(ToyDEQ(seed=1))
    with pytest.raises(ValueError, match="another teacher"):
        distill(other, traj, DistillConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="wrong shape"):
        check_state_shapes(torch.zeros(2, 31), traj)
    with pytest.raises(TypeError, match="DistillConfig"):
        distill(ConsistencyDEQ(teacher), traj, {"steps": 1})


def test_distill_resumes_after_a_kill(tmp_path, monkeypatch):
    teacher = ToyDEQ()
    traj = toy_trajectories(teacher, toy_batches(teacher, n=128, batch=64), steps=6)
    cfg = DistillConfig(steps=12, checkpoint_every=4, rollout_steps=2)
    ref = ConsistencyDEQ(teacher)
    distill(ref, traj, cfg, run_dir=tmp_path / "ref", progress=False)

    student = ConsistencyDEQ(teacher)
    sample, calls = traj.sample, [0]

    def dying_sample(*a, **k):
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt("killed")
        return sample(*a, **k)

    monkeypatch.setattr(traj, "sample", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        distill(student, traj, cfg, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(traj, "sample", sample)
    resumed = ConsistencyDEQ(teacher)
    history = distill(resumed, traj, cfg, run_dir=tmp_path / "run", progress=False)
    assert history[-1]["step"] == 12
    for (name, p), q in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="other settings"):
        distill(ConsistencyDEQ(teacher), traj, dataclasses.replace(cfg, lr=0.5), run_dir=tmp_path / "run",
                progress=False)


class DropoutToyDEQ(ToyDEQ):
    """ToyDEQ with dropout on the input, drawn from torch's global random stream in training."""

    def inject(self, x):
        return super().inject(F.dropout(x, 0.5, self.training))


def test_distill_does_not_depend_on_the_global_random_state_before_it():
    """Two distillations with the same seed give the same student whatever the process drew
    before (in an ablation the 10th student of a grid must equal the first student of a run)."""
    teacher = DropoutToyDEQ()
    traj = toy_trajectories(teacher, toy_batches(teacher, n=128, batch=64), steps=6)
    students = []
    for before in (1, 2):
        torch.manual_seed(before)
        students.append(ConsistencyDEQ(teacher))
        distill(students[-1], traj, DistillConfig(steps=6, rollout_steps=2, seed=3), progress=False)
    for (name, p), q in zip(students[0].named_parameters(), students[1].parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(students[0].backbone.U.weight, teacher.U.weight)  # it did train


def test_tuple_state_student_runs_infer_predict_distill():
    teacher = ToyTupleDEQ()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    traj = sample_trajectories(teacher, batches, steps=5)
    student = ConsistencyDEQ(teacher)
    distill(student, traj, DistillConfig(steps=5, batch_size=8), progress=False)
    assert len(student.proj) == 2
    z = student.infer(batches[0][0], nfe=3)
    assert isinstance(z, tuple) and z[0].shape == (16, 3, 4) and z[1].shape == (16, 5, 2)
    assert student.predict(batches[0][0], nfe=2).shape == (16, 3)
    assert set(equilibrium_error(student.state, traj, (1, 2))) == {1, 2}


def test_one_graph_student_runs_infer_predict_distill():
    teacher = ToyGraphDEQ()
    x = torch.randn(1, 20, 5)
    y = torch.randint(0, 3, (20,))
    y[::4] = -100
    traj = sample_trajectories(teacher, [(x, y)], steps=6)
    student = ConsistencyDEQ(teacher)
    history = distill(student, traj, DistillConfig(steps=6, batch_size=4), progress=False)
    assert "task" in history[-1]
    assert student.infer(x, nfe=2).shape == (1, 20, 8)
    assert student.predict(x, nfe=2).shape == (1, 20, 3)


def test_anchor_ties_the_students_fixed_point_to_the_teachers():
    """L_anchor = d(h(z_K, t), z_K): with it, h at the teacher's fixed point stays near it at every
    time and many inference steps end closer to z_K; without it nothing pins h there."""
    torch.manual_seed(0)
    teacher = ToyDEQ()
    train = toy_trajectories(teacher, toy_batches(teacher, n=512, seed=1))
    test = toy_trajectories(teacher, toy_batches(teacher, n=256, seed=2))
    x, z_star = test.inputs(0, list(range(64))), test.states(0, list(range(64)), test.steps, augmented=False)
    anchor_err, steps_err = {}, {}
    for w in (0.0, 10.0):
        torch.manual_seed(0)
        student = ConsistencyDEQ(teacher)
        distill(student, train, DistillConfig(steps=200, lambda_task=0.0, rollout_steps=4, anchor_weight=w),
                progress=False)
        with torch.no_grad():
            u = student.inject(x)
            anchor_err[w] = max(float(relative_error(student.h(z_star, t, u), z_star).mean()) for t in (0.01, 0.5, 1.0))
        steps_err[w] = equilibrium_error(student.state, test, [8])[8]
    assert anchor_err[10.0] * 2 < anchor_err[0.0], anchor_err
    assert steps_err[10.0] < steps_err[0.0], steps_err
    with pytest.raises(ValueError, match="anchor_weight"):
        DistillConfig(anchor_weight=-1.0)
