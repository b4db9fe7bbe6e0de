"""apply_norm / reset_norm / remove_norm (torchdeq paper Eq. 13-16)."""
import pytest
import torch
from torch import nn

import cdeq
from cdeq import norm as norm_module

F64 = torch.float64


def layers():
    torch.manual_seed(0)
    return [nn.Linear(6, 4).double(), nn.Conv1d(3, 5, 3).double(), nn.Conv2d(2, 4, 3).double()]


def inputs_for(layer):
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 6, dtype=F64)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, 3, 8, dtype=F64)
    return torch.randn(2, 2, 6, 6, dtype=F64)


def singular_max(w):
    return torch.linalg.matrix_norm(w.detach().reshape(w.shape[0], -1), ord=2)


@pytest.mark.parametrize("kind", ["weight", "spectral"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_apply_with_scale_keeps_the_function_and_remove_bakes_it_in(kind, index):
    layer = layers()[index]
    x = inputs_for(layer)
    before = layer(x)
    cdeq.apply_norm(layer, kind=kind)
    assert "weight" not in dict(layer.named_parameters())
    assert {"weight_v", "weight_g"} <= set(dict(layer.named_parameters()))
    assert torch.allclose(layer(x), before, atol=1e-10)
    with torch.no_grad():  # a training step changes the direction V and the scale g
        layer.weight_v.add_(0.3 * torch.randn_like(layer.weight_v))
        layer.weight_g.mul_(0.7)
    cdeq.reset_norm(layer)
    normalised = layer(x)
    assert not torch.allclose(normalised, before)
    cdeq.remove_norm(layer)
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "weight_v")
    assert torch.allclose(layer(x), normalised, atol=1e-12)
    cdeq.reset_norm(layer)  # no norm left: a no-op
    assert torch.allclose(layer(x), normalised, atol=1e-12)


def test_weight_norm_rows_have_norm_g_and_clip_bounds_the_factor():
    layer = nn.Linear(5, 3).double()
    cdeq.apply_norm(layer, kind="weight", scale=False)
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(3, dtype=F64))
    cdeq.remove_norm(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4, 0, 0, 0], [0.1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]))
    cdeq.apply_norm(layer, kind="weight", clip=0.5)
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[10.0], [0.02], [1.0]]))
    cdeq.reset_norm(layer)
    # factor min(t, g/||V_i||) per row (Eq. 16): min(0.5, 2) = 0.5, min(0.5, 0.2) = 0.2, min(0.5, 1) = 0.5
    assert torch.allclose(layer.weight.norm(dim=1), torch.tensor([2.5, 0.02, 0.5], dtype=F64))


def test_spectral_norm_with_clip_bounds_the_largest_singular_value():
    torch.manual_seed(1)
    layer = nn.Linear(8, 8).double()
    with torch.no_grad():
        layer.weight.mul_(5.0)
    sigma_v = singular_max(layer.weight)
    cdeq.apply_norm(layer, kind="spectral", clip=0.1)
    with torch.no_grad():
        layer.weight_g.fill_(100.0)  # a large learned scale: the clip must hold the weight down
    cdeq.reset_norm(layer)
    assert singular_max(layer.weight) <= 0.1 * sigma_v * (1 + 1e-6)
    with torch.no_grad():
        layer.weight_g.fill_(0.25)  # a small scale: sigma(W) = min(t sigma(V), g) = g
    cdeq.reset_norm(layer)
    assert abs(singular_max(layer.weight).item() - 0.25) < 1e-6


def test_spectral_norm_without_scale_has_unit_spectral_norm():
    layer = nn.Conv2d(3, 4, 3).double()
    cdeq.apply_norm(layer, kind="spectral", scale=False)
    assert "weight_g" not in dict(layer.named_parameters())
    assert abs(singular_max(layer.weight).item() - 1.0) < 1e-6


def test_weight_is_computed_once_per_forward_of_the_deq(monkeypatch):
    calls = []
    compute = norm_module._Normalization.compute
    monkeypatch.setattr(norm_module._Normalization, "compute", lambda self, m: calls.append(1) or compute(self, m))
    torch.manual_seed(0)
    layer = cdeq.apply_norm(nn.Linear(4, 4).double(), kind="spectral")
    calls.clear()
    x = torch.randn(2, 4, dtype=F64)
    deq = cdeq.DEQ(f_solver="fixed_point", f_max_iter=10, f_tol=0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        cdeq.reset_norm(layer)
        z, info = deq(lambda z: torch.tanh(0.5 * layer(z)) + x, torch.zeros(2, 4, dtype=F64))
        z.sum().backward()
        assert info.nfe == 10
        opt.step()
        opt.zero_grad()
    assert len(calls) == 2
    assert layer.weight_v.grad is None  # zeroed by the optimiser, but it was reached:
    cdeq.reset_norm(layer)
    deq(lambda z: torch.tanh(0.5 * layer(z)) + x, torch.zeros(2, 4, dtype=F64))[0].sum().backward()
    assert layer.weight_v.grad.abs().sum() > 0 and layer.weight_g.grad.abs().sum() > 0


def test_a_stale_weight_is_recomputed_when_reset_norm_was_forgotten():
    layer = cdeq.apply_norm(nn.Linear(3, 3).double())
    x = torch.randn(1, 3, dtype=F64)
    with torch.no_grad():
        layer.weight_g.mul_(2.0)  # an optimiser step, without reset_norm afterwards
    expected = x @ (2.0 * layer.weight_v).T + layer.bias
    assert torch.allclose(layer(x), expected)


def test_exclude_by_name_and_type_and_skip_vector_weights():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)))
    cdeq.apply_norm(net, exclude=("2.0", nn.Conv1d))
    names = dict(net.named_parameters())
    assert "0.weight_v" in names and "1.weight" in names and "2.0.weight" in names and "2.1.weight" in names
    cdeq.apply_norm(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))), exclude=("1",))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"kind: expected one of \('weight', 'spectral'\), got 'spectal' \(did you mean 'spectral'\?\)"):
        cdeq.apply_norm(nn.Linear(2, 2), kind="spectal")
    with pytest.raises(ValueError, match="clip: expected a positive threshold t"):
        cdeq.apply_norm(nn.Linear(2, 2), clip=0.0)
    with pytest.raises(ValueError, match="has no module with a weight of 2 or more dimensions"):
        cdeq.apply_norm(nn.LayerNorm(3))
    with pytest.raises(TypeError, match="exclude: expected module names"):
        cdeq.apply_norm(nn.Linear(2, 2), exclude=(3,))
    layer = cdeq.apply_norm(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="already normalised; call remove_norm first"):
        cdeq.apply_norm(layer)


def test_deepcopy_of_a_normalised_module_after_a_forward_with_grad():
    import copy

    layer = cdeq.apply_norm(nn.Linear(4, 4).double(), kind="spectral")
    x = torch.randn(2, 4, dtype=F64)
    cdeq.reset_norm(layer)
    y = layer(x)  # the cached weight is a non-leaf tensor now
    twin = copy.deepcopy(layer)
    assert type(twin).__name__ == "Linear" and isinstance(twin, nn.Linear)
    assert torch.allclose(twin.eval()(x), layer.eval()(x))
    with torch.no_grad():
        twin.weight_g.mul_(2.0)
    assert torch.allclose(twin(x) - twin.bias, 2 * (layer(x) - layer.bias))
    y.sum().backward()
    assert layer.weight_v.grad is not None and twin.weight_v.grad is None
    cdeq.remove_norm(twin)
    assert type(twin) is nn.Linear and type(layer).__name__ == "Linear" and type(layer) is not nn.Linear


class Kernel(nn.Module):
    """A module whose linear map is a parameter named ``kernel``, outputs along its dim 1."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(5, 3, dtype=F64))

    def forward(self, x):
        return x @ self.kernel


def test_rules_and_registered_modules_normalise_named_parameters_along_their_dim():
    torch.manual_seed(1)
    net = nn.Sequential(Kernel(), nn.Linear(3, 3).double())
    x = torch.randn(2, 5, dtype=F64)
    cdeq.apply_norm(net, kind="weight_norm", scale=False, target_norm=2.0,
                    rules={Kernel: ("kernel", 1)})
    assert {n for n, _ in net.named_parameters()} == {"0.kernel_v", "1.weight", "1.bias"}
    assert torch.allclose(net[0].kernel.norm(dim=0), torch.full((3,), 2.0, dtype=F64))
    cdeq.remove_norm(net)
    assert isinstance(net[0].kernel, nn.Parameter) and net(x).shape == (2, 3)
    norm_module.register_norm_module(Kernel, "kernel", 1)
    try:
        layer = cdeq.apply_norm(Kernel(), kind="spectral", power_iters=3)
        assert layer.kernel_g.shape == (1,) and layer.__dict__["_cdeq_norm"]["kernel"].power_iters == 3
    finally:
        norm_module._RULES.pop(Kernel)
    with pytest.raises(ValueError, match=r"module '0' \(Kernel\) has no parameter 'weight' to normalise"):
        cdeq.apply_norm(nn.Sequential(Kernel()), rules={Kernel: ("weight", 0)})
    with pytest.raises(ValueError, match="power_iters: expected an int >= 1, got 0"):
        cdeq.apply_norm(nn.Linear(2, 2), kind="spectral", power_iters=0)
