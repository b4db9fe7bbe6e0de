"""DEQConfig validation, TorchDEQ command lines through add_deq_args, DEQ.from_config."""
import argparse

import pytest
import torch
from torch import nn

import cdeq
from cdeq.config import UnknownOptionError


def parse(line):
    return cdeq.DEQConfig.from_args(cdeq.add_deq_args(argparse.ArgumentParser()).parse_args(line.split()))


def test_unknown_option_names_it_suggests_the_closest_and_lists_all():
    with pytest.raises(UnknownOptionError) as e:
        cdeq.DEQConfig(f_slover="anderson")
    msg = str(e.value)
    assert msg.startswith("DEQConfig: unknown option 'f_slover'. Did you mean 'f_solver'? Valid options: f_solver, ")
    assert "jac_loss_weight" in msg and "norm_clip" in msg
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownOptionError, match="unknown option 'zzz'. Valid options"):
        cdeq.DEQConfig(zzz=1)


@pytest.mark.parametrize("field,value,message", [
    ("f_max_iter", -1, "f_max_iter: expected an integer >= 0, got -1"),
    ("b_max_iter", 2.5, "b_max_iter: expected an integer >= 1, got 2.5"),
    ("phantom_steps", True, "phantom_steps: expected an integer >= 1, got True"),
    ("f_tol", "small", "f_tol: expected a number in [0.0, inf), got 'small'"),
    ("gamma", 0, "gamma: expected a number in (0.0, 1.0], got 0"),
    ("jac_loss_freq", 2.0, "jac_loss_freq: expected a number in [0.0, 1.0], got 2.0"),
    ("f_stop_mode", "relative", "f_stop_mode: expected one of ('rel', 'abs'), got 'relative'"),
    ("norm_type", "batch_norm", "norm_type: expected one of ('weight', 'spectral', 'none'), got 'batch_norm'"),
    ("checkpoint", "yes", "checkpoint: expected True or False, got 'yes'"),
    ("f_options", [("m", 5)], "f_options: expected a dict of solver keyword options"),
    ("return_steps", 5, "return_steps: expected a sequence of solver steps, got 5"),
    ("return_steps", [3, -1], "return_steps: expected an integer >= 0, got -1"),
    ("f_solver", "newton", "f_solver: expected one of ('anderson', 'broyden', 'fixed_point'"),
    ("b_solver", "andersen", "(did you mean 'anderson'?)"),
])
def test_bad_values_name_the_field_and_what_was_expected(field, value, message):
    with pytest.raises(ValueError) as e:
        cdeq.DEQConfig(**{field: value})
    assert message in str(e.value)


def test_torchdeq_names_are_mapped():
    cfg = cdeq.DEQConfig(f_solver="fixed_point_iter", b_solver="simple_fixed_point_iter", norm_type="spectral_norm")
    assert (cfg.f_solver, cfg.b_solver, cfg.norm_type) == ("fixed_point", "fixed_point", "spectral")


def test_torchdeq_implicit_command_line():
    cfg = parse("--ift --f_solver anderson --b_solver broyden --f_max_iter 20 --f_tol 1e-2 --b_max_iter 30 "
                "--b_tol 0.001 --eval_f_max_iter 40 --norm_type spectral_norm --norm_no_scale --norm_clip "
                "--norm_clip_value 0.9 --jac_loss_weight 2.0 --jac_loss_freq 0.5 --indexing 5 10 --gamma 0.9")
    assert cfg.backward == "implicit" and cfg.f_solver == "anderson" and cfg.b_solver == "broyden"
    assert (cfg.f_max_iter, cfg.f_tol, cfg.b_max_iter, cfg.b_tol, cfg.eval_max_iter) == (20, 1e-2, 30, 1e-3, 40)
    assert (cfg.norm_type, cfg.norm_scale, cfg.norm_clip) == ("spectral", False, 0.9)
    assert (cfg.jac_loss_weight, cfg.jac_loss_freq, cfg.return_steps, cfg.gamma) == (2.0, 0.5, (5, 10), 0.9)


def test_torchdeq_phantom_command_lines():
    cfg = parse("--grad 5 --tau 0.6 --f_solver broyden")
    assert (cfg.backward, cfg.phantom_steps, cfg.tau, cfg.f_solver) == ("phantom", 5, 0.6, "broyden")
    assert cfg.norm_type == "weight" and cfg.norm_clip is None and cfg.eval_max_iter is None
    cfg = parse("--f_max_iter 30 --n_states 3 --eval_factor 1.5")
    assert cfg.return_steps == (10, 20, 30) and cfg.eval_max_iter == 45


def test_bptt_command_line_runs_as_bptt():
    cfg = parse("--f_max_iter 0 --grad 12 --tau 1.0 --f_solver fixed_point_iter")
    deq = cdeq.DEQ.from_config(cfg)
    w = torch.tensor(0.5, requires_grad=True)
    z, info = deq(lambda z: w * z + 1, torch.zeros(1, 1))
    assert info.nfe == 0 and z.item() == pytest.approx(2 - 2 ** -11)  # z_12 = sum_{j<12} w^j
    z.backward()
    assert w.grad.item() == pytest.approx(sum(j * 0.5 ** (j - 1) for j in range(1, 12)))  # d/dw sum_j w^j


def test_conflicting_flags_are_errors():
    with pytest.raises(ValueError, match="--indexing and --n_states: give one of them, not both"):
        parse("--indexing 3 --n_states 2")
    with pytest.raises(ValueError, match="--ift asks for the implicit backward but --backward is 'unroll'"):
        parse("--ift --backward unroll")
    with pytest.raises(SystemExit):
        parse("--norm_type layer_norm")


def test_unroll_command_line_with_checkpointing():
    cfg = parse("--backward unroll --mem_gc --f_max_iter 8")
    assert (cfg.backward, cfg.checkpoint, cfg.f_solver) == ("unroll", True, None)
    assert cdeq.DEQ.from_config(cfg).config.checkpoint


def test_config_applies_its_norm():
    layer = cdeq.DEQConfig(norm_type="spectral", norm_clip=0.5, norm_scale=False).apply_norm(nn.Linear(3, 3))
    assert hasattr(layer, "weight_u") and "weight_g" in dict(layer.named_buffers())
    assert layer.__dict__["_cdeq_norm"]["weight"].clip == 0.5
    plain = cdeq.DEQConfig(norm_type="none").apply_norm(nn.Linear(3, 3))
    assert isinstance(plain.weight, nn.Parameter)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 1e300, 10 ** 400])
def test_check_number_rejects_values_that_are_not_finite(value):
    from cdeq.config import check_number

    for kw in ({}, {"low_open": True}, {"high": float("inf"), "high_open": True}):
        with pytest.raises(ValueError, match=r"^rollout_weight: expected a finite number in .*got "):
            check_number("rollout_weight", value, 0.0, **kw)
    with pytest.raises(ValueError, match="f_tol: expected a finite number"):
        cdeq.DEQConfig(f_tol=value)
    check_number("rollout_weight", 3.0e38, 0.0)  # float32's range is still accepted


def test_n_states_beyond_the_solver_steps_is_an_error():
    with pytest.raises(ValueError, match=r"--n_states 2 with --f_max_iter 0: .* at most 0 distinct ones exist"):
        parse("--f_max_iter 0 --grad 3 --n_states 2")
    assert parse("--f_max_iter 3 --n_states 3").return_steps == (1, 2, 3)


def test_per_sample_is_a_validated_deq_option():
    assert cdeq.DEQ(per_sample=False).config.per_sample is False
    with pytest.raises(ValueError, match="per_sample: expected True or False, got 'no'"):
        cdeq.DEQConfig(per_sample="no")
