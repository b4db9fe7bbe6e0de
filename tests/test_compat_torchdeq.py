"""cdeq.compat.torchdeq: three TorchDEQ programs, ported here, run with only the import prefix
changed and match TorchDEQ 0.1.0 (forward and gradients, float64, same weights and settings);
TorchDEQ's defaults, flags and return values; what cdeq does differently warns once."""
from __future__ import annotations

import argparse
import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdeq.compat import torchdeq as compat
from cdeq.compat.torchdeq import _args

F64 = torch.float64
PREFIXES = ["torchdeq", "cdeq.compat.torchdeq"]


def lib(prefix: str) -> SimpleNamespace:
    """The library under ``prefix``, imported module by module as a TorchDEQ program does."""
    if prefix == "torchdeq":
        pytest.importorskip("torchdeq")
    mods = {name: importlib.import_module(f"{prefix}.{name}") for name in ("core", "norm", "loss", "utils")}
    return SimpleNamespace(get_deq=mods["core"].get_deq, reset_deq=mods["core"].reset_deq, **mods)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).norm() <= rtol * b.norm().clamp_min(1e-30))


def grads(model: nn.Module) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def run_both(build, step) -> list:
    """``step(lib, build(lib))`` under each library, on the same weights (same seed), float64."""
    out = []
    for prefix in PREFIXES:
        L = lib(prefix)
        torch.manual_seed(0)
        model = build(L).double()
        torch.manual_seed(1)
        result = step(L, model)
        out.append((result, grads(model)))
    return out


def assert_match(out) -> None:
    (ref, ref_grads), (got, got_grads) = out
    for a, b in zip(got, ref):
        assert close(a, b), (a, b)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        assert close(got_grads[name], ref_grads[name]), name


# 1. The "Deep Implicit Layers" tutorial, chapter 4: a conv DEQ with group norms, an Anderson
# forward solve and implicit differentiation, inside a small classifier.
class ConvLayer(nn.Module):
    def __init__(self, channels: int = 8, inner: int = 12, groups: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, c) for c in (inner, channels, channels))
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))


class TutorialNet(nn.Module):
    def __init__(self, L: SimpleNamespace) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer = ConvLayer()
        self.head = nn.Linear(8, 3)
        self.deq = L.get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-10, ift=True, b_max_iter=150, b_tol=1e-10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        # TorchDEQ's lam is absolute: a small one lets its Anderson reach tol 1e-10 (cdeq's is relative)
        z_out, info = self.deq(lambda z: self.layer(z, x), torch.zeros_like(x), solver_kwargs={"lam": 1e-20})
        return self.head(z_out[-1].mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore:cdeq.compat.torchdeq. Anderson's lam is relative")
def test_tutorial_chapter4_deq_matches_torchdeq():
    images, labels = torch.randn(3, 1, 6, 6, dtype=F64), torch.tensor([0, 2, 1])

    def step(L, model):
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
        return [logits]

    assert_match(run_both(TutorialNet, step))


# 2. deq-zoo's IGNN on synthetic chains: the state is (hidden, nodes), so dim 0 is not a batch.
def chains(n_chains: int = 3, length: int = 5, classes: int = 3) -> tuple:
    """Chains of nodes whose first node alone carries its class (one-hot); every node's label is it."""
    n = n_chains * length
    features, labels = torch.zeros(classes, n, dtype=F64), torch.arange(n) // length % classes
    adj = torch.zeros(n, n, dtype=F64)
    for c in range(n_chains):
        features[labels[c * length], c * length] = 1.0
        for i in range(c * length, (c + 1) * length - 1):
            adj[i, i + 1] = adj[i + 1, i] = 1.0
    adj += torch.eye(n, dtype=F64)
    d = adj.sum(1).rsqrt()
    return features, d[:, None] * adj * d[None, :], labels


class IGNN(nn.Module):
    def __init__(self, L: SimpleNamespace, classes: int = 3, hidden: int = 8, kappa: float = 0.9) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(hidden, hidden))
        with torch.no_grad():  # ||W||_inf <= kappa (the normalised adjacency has spectral radius 1)
            self.W.mul_(kappa / self.W.abs().sum(1).max())
        self.omega = nn.Linear(classes, hidden)
        nn.init.constant_(self.omega.bias, 1.0)  # a positive injection: no row of f(0) is exactly 0
        self.head = nn.Linear(hidden, classes)
        self.deq = L.get_deq(f_solver="fixed_point_iter", f_max_iter=300, f_tol=1e-11, ift=True,
                             b_max_iter=300, b_tol=1e-11)

    def forward(self, features: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        b = self.omega(features.t()).t() @ adj  # (hidden, nodes)
        z_out, _ = self.deq(lambda z: F.relu(self.W @ z @ adj + b), torch.zeros_like(b))
        return self.head(z_out[-1].t())


def test_ignn_on_chains_matches_torchdeq_though_rows_are_coupled():
    features, adj, labels = chains()

    def step(L, model):
        logits = model(features, adj)
        F.cross_entropy(logits, labels).backward()
        return [logits]

    assert_match(run_both(IGNN, step))


def test_ignn_rows_with_a_zero_first_residual_reach_the_fixed_point():
    """With relu(b) = 0 in some hidden rows, their first residual is exactly 0. cdeq's per-sample
    stopping would freeze them (a warning); TorchDEQ keeps each row's lowest-residual iterate, the
    first; the compat layer stops on the whole batch and returns the fixed point."""
    features, adj, _ = chains()
    torch.manual_seed(0)
    model = IGNN(lib("cdeq.compat.torchdeq")).double()
    with torch.no_grad():
        model.omega.bias.fill_(-1.0)
        b = model.omega(features.t()).t() @ adj
        f = lambda z: F.relu(model.W @ z @ adj + b)  # noqa: E731
        assert (f(torch.zeros_like(b)) == 0).all(dim=1).any()
        z_out, info = model.deq(f, torch.zeros_like(b))
    assert (f(z_out[-1]) - z_out[-1]).norm() < 1e-10


# 3. deq-zoo's DEQ-INR: an implicit neural representation of an image, Fourier features of the
# pixel coordinates injected into a weight-normalised MLP layer; phantom gradients on two sampled
# states and the fixed-point correction loss.
class INR(nn.Module):
    def __init__(self, L: SimpleNamespace, freqs: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.register_buffer("B", 3.0 * torch.randn(2, freqs))
        self.inject = nn.Linear(2 * freqs, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)
        with torch.no_grad():
            self.mix.weight.mul_(0.5)
        L.norm.apply_norm(self.mix, "weight_norm")
        parser = argparse.ArgumentParser()
        L.utils.add_deq_args(parser)  # TorchDEQ's returns None
        args = parser.parse_args("--f_max_iter 60 --f_tol 1e-12 --n_states 2 --grad 2 --tau 0.8".split())
        self.deq = L.get_deq(args)
        self.L = L

    def forward(self, coords: torch.Tensor) -> list:
        self.L.reset_deq(self)
        proj = coords @ self.B
        u = self.inject(torch.cat([proj.sin(), proj.cos()], dim=1))
        z_out, _ = self.deq(lambda z: torch.tanh(self.mix(z) + u), torch.zeros_like(u))
        return [torch.sigmoid(self.out(z)) for z in z_out]


def test_deq_inr_matches_torchdeq_with_phantom_gradients_and_correction():
    grid = torch.linspace(-1, 1, 5, dtype=F64)
    coords = torch.cartesian_prod(grid, grid)
    target = torch.rand(len(coords), 3, dtype=F64)

    def step(L, model):
        preds = model(coords)
        loss = L.loss.fp_correction(F.mse_loss, (preds, target), gamma=0.7)
        loss.backward()
        return [loss, *preds]

    out = run_both(INR, step)
    assert len(out[0][0]) == len(out[1][0]) == 3  # the loss and two sampled states
    assert_match(out)


# TorchDEQ's defaults, return values and flags.
def test_defaults_and_return_values_are_torchdeqs():
    deq = compat.get_deq()
    assert (deq.core, deq.f_solver, deq.f_max_iter, deq.f_tol, deq.f_stop_mode) == (
        "sliced", "fixed_point_iter", 40, 1e-3, "abs")
    assert (deq.b_solver, deq.b_max_iter, deq.b_tol, deq.grad, deq.ift) == ("fixed_point_iter", 40, 1e-6, [1], False)
    x = torch.randn(4, 3, dtype=F64)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731
    z_out, info = deq(f, torch.zeros(4, 3, dtype=F64))
    assert isinstance(z_out, list) and len(z_out) == 1 and z_out[-1].shape == (4, 3)
    assert set(info) == {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"}
    assert info["abs_lowest"].max() < 1e-3 and info["abs_trace"].shape[0] == 4
    deq.eval()
    z_out, info = deq(f, torch.zeros(4, 3, dtype=F64), solver_kwargs={"f_max_iter": 3}, sradius_mode=True)
    assert info["nstep"].max() <= 3 and info["sradius"].shape == (4,) and info["sradius"].max() < 0.5


def test_tuple_states_are_unpacked_and_returned_as_lists():
    x = torch.randn(2, 3)
    deq = compat.get_deq(f_tol=1e-8, f_max_iter=100, ift=True)
    z_out, _ = deq(lambda a, b: (torch.tanh(0.3 * b + x), 0.5 * a), (torch.zeros(2, 3), torch.zeros(2, 3)))
    a, b = z_out[-1]
    assert torch.allclose(b, 0.5 * a, atol=1e-6)


def test_every_torchdeq_flag_parses_with_torchdeqs_defaults():
    torchdeq_utils = pytest.importorskip("torchdeq.utils")
    ours = vars(compat.add_deq_args(argparse.ArgumentParser()).parse_args([]))
    theirs = argparse.ArgumentParser()
    torchdeq_utils.add_deq_args(theirs)
    assert ours == vars(theirs.parse_args([]))
    flags = ("--core indexing --norm_target_norm 2 --sn_n_power_iters 3 --sup_gap 2 --sup_loc 1 3 "
             "--jac_incremental 100 --sradius_mode --grad 2 3 --n_states 2 --f_max_iter 10")
    args = compat.add_deq_args(argparse.ArgumentParser()).parse_args(flags.split())
    assert (args.grad, args.sup_loc, args.core) == ([2, 3], [1, 3], "indexing")
    deq = compat.get_deq(args)
    assert deq.core == "indexing" and deq.steps == [5, 10]


def test_sampled_states_and_their_phantom_steps_follow_torchdeq():
    x = torch.randn(2, 3, dtype=F64)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=F64)
    for core in ("sliced", "indexing"):
        assert len(compat.get_deq(core=core, n_states=2, grad=[1, 2])(f, z0)[0]) == 2
        assert len(compat.get_deq(core=core, grad=4, sup_gap=2)(f, z0)[0]) == 2
        assert len(compat.get_deq(core=core, grad=4, sup_loc=[1])(f, z0)[0]) == 2
    z_out, _ = compat.get_deq(f_max_iter=0, n_states=2, grad=3)(f, z0)  # BPTT-3, twice
    assert len(z_out) == 2 and torch.allclose(z_out[0], f(f(f(z0))))
    with pytest.raises(ValueError, match=r"grad: expected 1 value or one per sampled state \(2"):
        compat.get_deq(n_states=2, grad=[1, 2, 3])
    with pytest.raises(ValueError, match="core: expected one of"):
        compat.get_deq(core="stacked")


def test_norm_flags_reach_cdeqs_norm():
    layer = nn.Linear(4, 4).double()
    args = compat.add_deq_args(argparse.ArgumentParser()).parse_args(
        "--norm_type spectral_norm --norm_no_scale --norm_target_norm 0.5 --sn_n_power_iters 3".split())
    compat.apply_norm(layer, args=args)
    assert torch.allclose(torch.linalg.matrix_norm(layer.weight.detach(), 2), torch.tensor(0.5, dtype=F64), atol=1e-6)
    assert layer.__dict__["_cdeq_norm"]["weight"].power_iters == 3
    assert compat.apply_norm(nn.Linear(2, 2), norm_type="none") is None


def test_torchdeq_program_with_a_custom_parameter_uses_register_norm_module():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 4))

    compat.register_norm_module(Mix, "weight_norm", "kernel", 0)
    model = nn.Sequential(Mix(), nn.Linear(4, 4))
    compat.apply_norm(model, filter_out=["1"])
    assert {n for n, _ in model.named_parameters()} == {"0.kernel_v", "0.kernel_g", "1.weight", "1.bias"}


def test_what_cdeq_does_differently_warns_once_saying_what_it_does():
    _args.WARNED.clear()
    x = torch.randn(2, 3)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731
    with pytest.warns(UserWarning, match="hook_ift runs cdeq's one implicit backward"):
        compat.get_deq(hook_ift=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.get_deq(hook_ift=True)  # once only
    with pytest.warns(UserWarning, match="Broyden line search .ls=True. is not implemented: cdeq's Broyden takes full"):
        compat.get_deq(f_solver="broyden")(f, torch.zeros(2, 3), solver_kwargs={"ls": True})
    with pytest.warns(UserWarning, match="solver option 'beta' is not one cdeq's 'anderson' takes; it is ignored"):
        compat.get_deq(f_solver="anderson")(f, torch.zeros(2, 3), solver_kwargs={"beta": 0.5})
    with pytest.warns(UserWarning, match="apply_norm: Sequential has no module of a registered type"):
        compat.apply_norm(nn.Sequential(nn.Embedding(3, 2)))
    with pytest.raises(NotImplementedError, match="a custom class is not supported"):
        compat.register_norm("my_norm", object)


def test_solver_kwargs_translate_per_call():
    x = torch.randn(2, 3, dtype=F64)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731
    deq = compat.get_deq(f_max_iter=50, f_tol=1e-10).eval()
    _, info = deq(f, torch.zeros(2, 3, dtype=F64), solver_kwargs={"tau": 0.5, "return_final": True})
    assert info["rel_trace"].shape == (2, 50)  # return_final: the whole budget
    z, states, info = compat.get_solver("simple_fixed_point_iter")(f, torch.zeros(2, 3, dtype=F64), max_iter=7,
                                                                   indexing=[3])
    assert info["nstep"].tolist() == [7, 7] and len(states) == 1


def test_variational_dropout_keeps_its_mask_until_reset():
    drop = compat.VariationalDropout1d(0.5, token_first=True)  # (B, L, D): one draw per (sample, feature)
    x = torch.ones(2, 5, 4)
    y = drop(x)
    assert torch.equal(drop(x), y) and (y == y[:, :1]).all()
    torch.manual_seed(3)
    compat.reset_dropout(drop)
    assert drop.mask is None and drop(x).shape == x.shape
    with pytest.raises(ValueError, match="call reset_dropout"):
        drop(torch.ones(3, 5, 4))


def test_the_migration_guide_examples_run_as_printed(capsys):
    import re
    from pathlib import Path

    guide = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-torchdeq.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert len(blocks) == 3
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the examples warn about nothing
            exec(compile(block, f"docs/migrating-from-torchdeq.md: example {i + 1}", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "tensor(True) torch.Size([8]) torch.Size([16, 16])"
    assert printed[1].startswith("True ") and printed[1].endswith(" torch.Size([8])")
    assert printed[2] == "True"


def test_backward_writer_gets_the_implicit_backward_statistics():
    w = torch.tensor(0.5, dtype=F64, requires_grad=True)
    reports = []
    deq = compat.get_deq(f_max_iter=100, f_tol=1e-12, ift=True, b_max_iter=100, b_tol=1e-12)
    z_out, _ = deq(lambda z: w * z + 1, torch.zeros(2, 1, dtype=F64), backward_writer=reports.append)
    z_out[-1].sum().backward()
    assert len(reports) == 1 and reports[0]["rel_lowest"].max() <= 1e-12 and reports[0]["nstep"].item() >= 1
    assert torch.allclose(w.grad, torch.tensor(8.0, dtype=F64))  # d/dw of 2 / (1 - w), twice
