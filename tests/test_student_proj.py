"""ConsistencyDEQ(proj_rank=r): W of Eq. 8 as the identity plus a rank-r map and the time column.

It starts as the teacher's f, trains, saves and loads, exports, runs fused and on the meta device,
rejects bad ranks by name, and enters the pipeline's student keys only when set."""
from __future__ import annotations

import pytest
import torch

from cdeq import pipeline
from cdeq.cli import main
from cdeq.consistency import ConsistencyDEQ, DistillConfig, distill, equilibrium_error
from cdeq.consistency.student import FullProjection, LowRankProjection
from cdeq.state import as_tuple, map_state
from conftest import ToyDEQ, ToyGraphDEQ, ToyTupleDEQ, assert_onnx_matches_eager, toy_batches, toy_trajectories

FAMILIES = {"toy": (ToyDEQ, (4, 8), "linear"), "tuple": (ToyTupleDEQ, (4, 6), "zeros"),
            "graph": (ToyGraphDEQ, (1, 20, 5), "linear")}


def low_rank_student(family: str, rank: int = 2, perturb: bool = True):
    """A built student of ``rank``; ``perturb`` moves W off [I | 0] so h differs from f."""
    cls, shape, init = FAMILIES[family]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    student = ConsistencyDEQ(cls(), init=init, proj_rank=rank, example=x).eval()
    if perturb:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in student.proj.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return student, x


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank", [1, 3])
def test_h_starts_as_the_teachers_f(family, rank):
    student, x = low_rank_student(family, rank, perturb=False)
    assert all(isinstance(p, LowRankProjection) and p.rank == rank for p in student.proj)
    u = student.teacher.inject(x)
    z = map_state(lambda p: torch.randn(p.shape, generator=torch.Generator().manual_seed(3)),
                  student.teacher.init_state(u))
    for t in (student.schedule.eps, 0.5, torch.full((x.shape[0],), 0.7)):
        for h, f in zip(as_tuple(student.h(z, t, u)), as_tuple(student.teacher.layer(z, u))):
            assert torch.equal(h, f)


@pytest.mark.parametrize("shape, feature_dim", [((3, 5, 6), -1), ((3, 6), -1), ((3, 6, 4, 2), 1)])
@pytest.mark.parametrize("t", [0.3, torch.tensor([0.1, 0.5, 0.9])])
def test_low_rank_w_is_the_dense_w_it_stands_for(shape, feature_dim, t):
    """[I + up down | w_t] with bias b, applied as a full W, gives the same output on every layout."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(*shape, generator=g)
    c = shape[feature_dim]
    low = LowRankProjection(c, 2, feature_dim, p)
    full = FullProjection(c, feature_dim, p)
    with torch.no_grad():
        for q in low.parameters():
            q.copy_(torch.randn(q.shape, generator=g))
        full.weight.copy_(torch.cat([torch.eye(c) + low.up @ low.down, low.time[:, None]], dim=1))
        full.bias.copy_(low.bias)
    torch.testing.assert_close(low(p, t), full(p, t), rtol=1e-5, atol=1e-5)


def test_low_rank_w_has_fewer_parameters_and_the_rank_it_was_given():
    teacher, x = ToyDEQ(), torch.randn(4, 8)
    full = ConsistencyDEQ(teacher, example=x)
    low = ConsistencyDEQ(teacher, proj_rank=4, example=x)
    c = 32
    assert sum(p.numel() for p in full.proj.parameters()) == c * (c + 1) + c
    assert sum(p.numel() for p in low.proj.parameters()) == 2 * 4 * c + 2 * c
    assert low.describe()["proj_rank"] == 4 and full.describe()["proj_rank"] is None


def test_a_short_distillation_drops_the_loss_and_w_keeps_its_rank():
    torch.manual_seed(0)
    teacher = ToyDEQ()
    traj = toy_trajectories(teacher, toy_batches(teacher, n=256, batch=64), steps=8)
    student = ConsistencyDEQ(teacher, init="linear", proj_rank=3)
    before = equilibrium_error(student.state, traj, (1, 2))
    history = distill(student, traj, DistillConfig(steps=120, batch_size=32, lambda_task=0.0, rollout_steps=2,
                                                   log_every=10), progress=False)
    after = equilibrium_error(student.state, traj, (1, 2))
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert after[1] < 0.5 * before[1] and after[2] < before[2]
    proj = student.proj[0]
    assert proj.up.abs().max() > 0 and torch.linalg.matrix_rank(proj.up @ proj.down) <= 3


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_builds_the_low_rank_w(family, tmp_path):
    student, x = low_rank_student(family, rank=2)
    torch.save(student.state_dict(), tmp_path / "student.pt")
    cls, _, init = FAMILIES[family]
    fresh = ConsistencyDEQ(cls(), init=init, proj_rank=2)
    fresh.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    assert fresh.built and all(p.rank == 2 for p in fresh.proj)
    for a, b in zip(as_tuple(fresh.eval().infer(x, nfe=3)), as_tuple(student.infer(x, nfe=3))):
        assert torch.equal(a, b)


def test_loading_a_w_of_another_form_names_proj_rank():
    low, _ = low_rank_student("toy", rank=2)
    full = ConsistencyDEQ(ToyDEQ(), example=torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"saved W has proj_rank=2, this student proj_rank=None"):
        ConsistencyDEQ(ToyDEQ()).load_state_dict(low.state_dict())
    with pytest.raises(ValueError, match=r"saved W has proj_rank=None, this student proj_rank=4"):
        ConsistencyDEQ(ToyDEQ(), proj_rank=4).load_state_dict(full.state_dict())
    with pytest.raises(ValueError, match=r"saved W has proj_rank=2, this student proj_rank=3"):
        ConsistencyDEQ(ToyDEQ(), proj_rank=3).load_state_dict(low.state_dict())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_ranks_are_rejected_by_name(bad):
    with pytest.raises(ValueError, match=r"proj_rank: expected None \(a full W\) or an int >= 1"):
        ConsistencyDEQ(ToyDEQ(), proj_rank=bad)


def test_a_rank_above_a_parts_channels_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"proj_rank: expected at most the channels of every state part, got 4 "
                                         r"for part 0 of 3 channels"):
        ConsistencyDEQ(ToyTupleDEQ(), proj_rank=4, example=torch.randn(2, 6))


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_matches_eager(family):
    student, x = low_rank_student(family)
    module = student.as_module(nfe=3)
    out = module(x)
    torch.testing.assert_close(out, student.predict(x, nfe=3), rtol=0, atol=0)
    torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_runtime_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    student, x = low_rank_student("toy")
    assert_onnx_matches_eager(ort, student.as_module(nfe=4), x)


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_budget_runs_on_the_meta_device(family):
    student, x = low_rank_student(family)
    student.to("meta")
    z = student.infer(x.to("meta"), nfe=4)
    assert all(p.device.type == "meta" for p in as_tuple(z)) and student.nfe == 4


def test_fused_inference_matches_the_eager_steps():
    student, x = low_rank_student("graph")
    eager = student.infer(x, nfe=4)
    student.fused = True
    torch.testing.assert_close(student.infer(x, nfe=4), eager, rtol=1e-5, atol=1e-6)


def test_the_pipeline_setting_enters_the_student_keys_only_when_set(tmp_path, capsys):
    def run(**changes):
        return pipeline.Run(pipeline.PipelineConfig(task="cora", out=str(tmp_path), settings=changes))

    assert "proj_rank" not in run().student_options()
    assert run(student_proj_rank=8).student_options()["proj_rank"] == 8
    assert main(["run", "cora", "--preset", "small", "--set", "student_proj_rank=8", "--show-config"]) == 0
    assert "student_proj_rank = 8" in capsys.readouterr().out
