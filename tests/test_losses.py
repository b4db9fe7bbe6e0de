"""DistillConfig's validation and each term of ConsistencyLoss against a hand computation (Eq. 5-11, 14)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyDEQ

from cdeq.consistency import ConsistencyDEQ, ConsistencyLoss, DistillBatch, DistillConfig
from cdeq.pipeline.settings import DEFAULTS, distill_config
from cdeq.training import OptimConfig

B, D = 4, 32


@pytest.mark.parametrize("field, value, message", [
    ("lambda_global", 1.5, "lambda_global"), ("lambda_task", -0.1, "lambda_task"), ("ema", 1.0, "ema"),
    ("distance", "l1", "distance"), ("huber_delta", 0.0, "huber_delta"), ("rollout_steps", -1, "rollout_steps"),
    ("rollout_weight", -1.0, "rollout_weight"), ("anchor_weight", -1.0, "anchor_weight"),
    ("task_max_k", -1, "task_max_k"), ("batch_size", 0, "batch_size"), ("normalize", 1, "normalize"),
    ("steps", 0, "steps"), ("lr", 0.0, "lr"), ("rollout_steps", 2.5, "rollout_steps"),
])
def test_distill_config_rejects_a_bad_value_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**{field: value})


def test_distill_config_is_frozen_an_optim_config_and_holds_the_pipelines_defaults():
    cfg = DistillConfig()
    assert isinstance(cfg, OptimConfig) and cfg.min_lr_ratio == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert distill_config(DEFAULTS, seed=0) == cfg  # one set of defaults: `cdeq run` distils with these


# -- a toy batch and its hand computation --------------------------------------------------------
@pytest.fixture()
def setting():
    """A plain student at initialisation (W = [I | 0]: h = f, the target equals the student) and a
    batch with k = 0, 1, 2, 5 over random states."""
    teacher = ToyDEQ()
    student = ConsistencyDEQ(teacher, structure="plain", example=torch.zeros(1, 8))
    g = torch.Generator().manual_seed(3)
    k = torch.tensor([0, 1, 2, 5])
    batch = DistillBatch(x=torch.randn(B, 8, generator=g), y=torch.tensor([0, 1, 2, 3]), k=k,
                         z_k=torch.randn(B, D, generator=g), z_prev=torch.randn(B, D, generator=g),
                         z_prev2=torch.randn(B, D, generator=g), z_star=torch.randn(B, D, generator=g),
                         anchor_u=torch.rand(B, generator=g))
    return teacher, student, batch


def f(teacher, z, x):
    return torch.tanh(z @ teacher.W.t() + teacher.U(x))


def c_skip(t, eps=0.01, T=1.0, gamma=1.0):  # Eq. 5
    return ((t - eps) / (T - eps)) ** gamma


def train_time(k, eps=0.01, T=1.0, rho=0.25):  # Eq. 6
    return eps + (1 - math.exp(-rho * k)) * (T - eps)


def g_by_hand(teacher, z, x, ks):
    """g = c_skip(t) z + c_out(t) h(z), h = f, one time per row."""
    c = torch.tensor([c_skip(train_time(int(k))) for k in ks]).reshape(-1, 1)
    return c * z + (1 - c) * f(teacher, z, x)


def mse(a, b, scale):
    return float(((a - b) ** 2).mean() / scale)


def test_each_term_matches_a_hand_computation(setting):
    teacher, student, batch = setting
    cfg = DistillConfig(lambda_global=0.7, lambda_task=0.3, rollout_steps=2, rollout_weight=3.0, anchor_weight=2.0,
                        task_max_k=1)
    loss_fn = ConsistencyLoss(student, cfg)
    with torch.no_grad():
        loss, terms = loss_fn(batch)
        scale = float((batch.z_star ** 2).mean())
        x, k = batch.x, batch.k
        out = g_by_hand(teacher, batch.z_k, x, k)
        glob = mse(out, batch.z_star, scale)
        prev = g_by_hand(teacher, batch.z_prev, x, (k - 1).clamp_min(0))
        local = mse(out[1:], prev[1:], scale)  # the rows with k >= 1
        z1 = f(teacher, torch.zeros(B, D), x)  # t_0 = eps: c_skip = 0
        b = math.exp(-0.25)
        t1 = 0.01 + (1 - b) * 0.99  # B.3 with beta = e^{-rho}
        z2 = c_skip(t1) * z1 + (1 - c_skip(t1)) * f(teacher, z1, x)
        roll = (mse(z1, batch.z_star, scale) + mse(z2, batch.z_star, scale)) / 2
        task = [F.cross_entropy(teacher.head(out[:2]), batch.y[:2])]  # k <= task_max_k = 1
        task += [F.cross_entropy(teacher.head(z), batch.y) for z in (z1, z2)]
        task = float(torch.stack(task).mean())
        anchor = mse(f(teacher, batch.z_star, x), batch.z_star, scale)  # h(z*, t) = f(z*) at any t
    assert float(terms["global_traj"]) == pytest.approx(glob, rel=1e-5)
    assert float(terms["local"]) == pytest.approx(local, rel=1e-5)
    assert float(terms["global_rollout"]) == pytest.approx(roll, rel=1e-5)
    assert float(terms["task"]) == pytest.approx(task, rel=1e-5)
    assert float(terms["anchor"]) == pytest.approx(anchor, rel=1e-5)
    total = 0.7 * (glob + 3.0 * roll) / 4.0 + 0.3 * local + 0.3 * task + 2.0 * anchor
    assert float(loss) == pytest.approx(total, rel=1e-5)


def test_terms_switch_off_with_their_settings(setting):
    _, student, batch = setting
    cfg = DistillConfig(lambda_global=1.0, lambda_task=0.0, rollout_steps=0, anchor_weight=0.0)
    loss, terms = ConsistencyLoss(student, cfg)(dataclasses.replace(batch, z_prev2=None, anchor_u=None))
    assert set(terms) == {"global_traj"}
    assert float(loss.detach()) == pytest.approx(float(terms["global_traj"]))


def test_huber_distance_and_no_normalisation(setting):
    teacher, student, batch = setting
    cfg = DistillConfig(lambda_global=1.0, lambda_task=0.0, rollout_steps=0, anchor_weight=0.0, distance="huber",
                        huber_delta=0.05, normalize=False)
    _, terms = ConsistencyLoss(student, cfg)(batch)
    with torch.no_grad():
        out = g_by_hand(teacher, batch.z_k, batch.x, batch.k)
        expect = F.huber_loss(out, batch.z_star, delta=0.05)
    assert float(terms["global_traj"]) == pytest.approx(float(expect), rel=1e-5)


def test_ema_target_moves_by_one_minus_mu_and_stays_in_eval_mode(setting):
    _, student, _ = setting
    loss_fn = ConsistencyLoss(student, DistillConfig(ema=0.75))
    with torch.no_grad():
        student.proj[0].weight.add_(1.0)
    before = loss_fn.target.proj[0].weight.clone()
    loss_fn.update_target()
    expect = 0.75 * before + 0.25 * student.proj[0].weight
    assert torch.allclose(loss_fn.target.proj[0].weight, expect)
    loss_fn.train()
    assert student.training and not loss_fn.target.training and not student.teacher.training
    assert not any(p.requires_grad for p in loss_fn.target.parameters())
