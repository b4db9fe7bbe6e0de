"""The DEQ models' protocol (shapes, tuple state, causality, well-posedness) and the baselines."""
from __future__ import annotations

import pytest
import torch

import cdeq
from cdeq import models
from cdeq.models.ignn import normalized_adjacency, perron_frobenius, project_rows_l1
from cdeq.norm import reset_norm


def _ring(n: int) -> torch.Tensor:
    src = torch.arange(n)
    dst = (src + 1) % n
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])


def _spectral_radius(model: models.DEQModel, x) -> float:
    model.eval()
    reset_norm(model)
    with torch.no_grad():
        u = model.inject(x)
        z, _ = cdeq.solve(lambda s: model.layer(s, u), model.init_state(u), solver="anderson", max_iter=30, tol=0)
    return float(cdeq.spectral_radius(lambda s: model.layer(s, u), z, iters=30).max())


# ----------------------------------------------------------------------------- IGNN
def test_normalized_adjacency_is_symmetric_with_unit_pf_eigenvalue():
    adj = normalized_adjacency(_ring(6), 6).to_dense()
    assert torch.allclose(adj, adj.T)
    assert torch.allclose(torch.diagonal(adj), torch.full((6,), 1 / 3))
    assert abs(perron_frobenius(normalized_adjacency(_ring(6), 6)) - 1.0) < 1e-5


def test_normalized_adjacency_rejects_bad_edges():
    with pytest.raises(ValueError, match="edge_index"):
        normalized_adjacency(torch.tensor([[0, 7], [7, 0]]), 5)


def test_project_rows_l1_is_the_euclidean_projection():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[0] = torch.tensor([0.1, -0.1, 0.0, 0.05, 0.0])  # already inside: unchanged
    p = project_rows_l1(w, 1.0)
    assert torch.equal(p[0], w[0])
    assert torch.all(p.abs().sum(dim=1) <= 1.0 + 1e-6)
    # Closest feasible point: no random point of the ball is closer to w than p.
    for i in range(1, 6):
        cand = torch.randn(2000, 5)
        cand = cand / cand.abs().sum(dim=1, keepdim=True) * torch.rand(2000, 1)
        assert (cand - w[i]).norm(dim=1).min() >= (p[i] - w[i]).norm() - 1e-6


def test_ignn_protocol_shapes_and_well_posedness():
    torch.manual_seed(0)
    n, feat, classes = 12, 7, 3
    model = models.get("ignn", edge_index=_ring(n), num_nodes=n, in_features=feat, num_classes=classes, hidden=8,
                       kappa=0.9)
    x = torch.rand(1, n, feat)
    u = model.inject(x)
    z0 = model.init_state(u)
    assert u.shape == z0.shape == (1, n, 8) and torch.count_nonzero(z0) == 0
    assert model.layer(z0, u).shape == (1, n, 8)
    assert model.readout(z0).shape == (1, n, classes)
    assert model.feature_dim == -1
    with torch.no_grad():
        assert float(model.weight.abs().sum(dim=1).max()) <= model.radius + 1e-6
        model.weight.mul_(50.0)
        model.project_()
        assert float(model.weight.abs().sum(dim=1).max()) <= model.radius + 1e-6
    # Well-posed: fixed-point iteration reaches the same fixed point from two starts.
    model.eval()
    with torch.no_grad():
        u = model.inject(x)
        za, zb = torch.zeros_like(u), torch.randn_like(u) * 10
        for _ in range(300):
            za, zb = model.layer(za, u), model.layer(zb, u)
    assert torch.allclose(za, zb, atol=1e-5)


def test_ignn_rejects_wrong_input_and_kappa():
    model = models.get("ignn", edge_index=_ring(5), num_nodes=5, in_features=3, num_classes=2, hidden=4)
    with pytest.raises(ValueError, match="x: expected node features"):
        model.inject(torch.rand(5, 3))
    with pytest.raises(ValueError, match="kappa"):
        models.get("ignn", edge_index=_ring(5), num_nodes=5, in_features=3, num_classes=2, kappa=1.0)


# ----------------------------------------------------------------------------- MDEQ
def test_mdeq_tuple_state_shapes_and_weight_norm():
    torch.manual_seed(0)
    model = models.get("mdeq", channels=(8, 16), head_channels=(8, 16, 32), stem_stride=1)
    x = torch.randn(3, 1, 28, 28)
    u = model.inject(x)
    z0 = model.init_state(u)
    assert isinstance(z0, tuple) and [tuple(p.shape) for p in z0] == [(3, 8, 28, 28), (3, 16, 14, 14)]
    assert all(torch.count_nonzero(p) == 0 for p in z0)
    z1 = model.layer(z0, u)
    assert isinstance(z1, tuple) and [p.shape for p in z1] == [p.shape for p in z0]
    assert model.readout(z1).shape == (3, 10)
    assert model.feature_dim == 1
    assert hasattr(model.branches[0].conv1, "weight_v") and hasattr(model.fuse[1][0], "weight_g")


def test_mdeq_starts_well_conditioned():
    """The cpu-preset MDEQ's damped initial recurrence: Anderson gets within ~1e-3 in 30 steps
    (with unit gains it stalls near 1e-1)."""
    torch.manual_seed(0)
    model = models.get("mdeq", channels=(32, 64), head_channels=(32, 64, 128), stem_stride=2).eval()
    reset_norm(model)
    with torch.no_grad():
        u = model.inject(torch.randn(4, 1, 28, 28))
        _, info = cdeq.solve(lambda s: model.layer(s, u), model.init_state(u), solver="anderson", max_iter=30, tol=0)
    assert float(info.rel_residual.max()) < 5e-3


def test_mdeq_rejects_bad_configs():
    with pytest.raises(ValueError, match="channels"):
        models.get("mdeq", channels=(8,), head_channels=(8, 16))
    with pytest.raises(ValueError, match="x: expected images"):
        models.get("mdeq", channels=(8, 16), head_channels=(8, 16, 32)).inject(torch.randn(1, 28, 28))


# ----------------------------------------------------------------------------- transformer
def _tiny_lm(**kw):
    torch.manual_seed(0)
    return models.get("deq-transformer", vocab_size=50, d_model=16, n_heads=2, d_ff=32, max_len=12, **kw)


def test_deq_transformer_protocol_shapes():
    model = _tiny_lm()
    x = torch.randint(0, 50, (2, 10))
    u = model.inject(x)
    z0 = model.init_state(u)
    assert u.shape == z0.shape == (2, 10, 16)
    assert model.layer(z0, u).shape == (2, 10, 16)
    assert model.readout(z0).shape == (2, 10, 50)
    with pytest.raises(ValueError, match="max_len"):
        model.inject(torch.randint(0, 50, (1, 13)))


def test_deq_transformer_is_causal_and_contractive():
    model = _tiny_lm().eval()
    x = torch.randint(0, 50, (2, 10))
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 7) % 50  # change the future only
    model.set_deq(cdeq.DEQ(f_solver="fixed_point", f_max_iter=40, f_tol=0.0))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    assert _spectral_radius(model, x) < 1.0


def test_truncated_solve_is_exactly_nfe_layer_calls():
    model = _tiny_lm().eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        u = model.inject(x)
        expected = model.layer(model.layer(model.layer(model.init_state(u), u), u), u)
        z, info = model.truncated_solve(x, 3, "fixed_point")
    assert info.nfe == 3
    assert torch.equal(z, expected)
    assert info.rel_residual.shape == (2,)


def test_explicit_transformer_is_causal():
    torch.manual_seed(0)
    model = models.get("transformer", vocab_size=50, d_model=16, n_heads=2, d_ff=32, max_len=12).eval()
    x = torch.randint(0, 50, (1, 10))
    x2 = x.clone()
    x2[0, 9] = (x2[0, 9] + 1) % 50
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :9], model(x2)[:, :9], atol=1e-6)


# ----------------------------------------------------------------------------- baselines, registry
@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_graph_baselines_shapes_and_locality(name):
    torch.manual_seed(0)
    edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # path 0-1-2; node 3 isolated
    model = models.get(name, edge_index=edges, num_nodes=4, in_features=5, num_classes=3).eval()
    x = torch.rand(1, 4, 5)
    out = model(x)
    assert out.shape == (1, 4, 3)
    x2 = x.clone()
    x2[0, :3] += 1.0
    assert torch.allclose(model(x2)[0, 3], out[0, 3])  # the isolated node ignores the others
    assert not torch.allclose(model(x2)[0, 0], out[0, 0])


def test_resnet_shapes():
    model = models.get("resnet", channels=(8, 16), stem_stride=2)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_registry():
    assert {"ignn", "mdeq", "deq-transformer", "gcn", "gat", "resnet", "transformer"} <= set(models.available())
    with pytest.raises(ValueError, match="unknown model"):
        models.get("nope")
    assert models.DEQModel is cdeq.DEQModel


def test_cpu_presets_match_parameter_counts():
    """The explicit baselines of the cpu presets are within 10% of their teacher's size."""
    lm = models.get("deq-transformer", vocab_size=10000, d_model=128, n_heads=4, d_ff=512, max_len=64)
    tr = models.get("transformer", vocab_size=10000, d_model=128, n_heads=4, d_ff=512, max_len=64)
    mdeq = models.get("mdeq", channels=(32, 64), stem_stride=2, head_channels=(32, 64, 128))
    res = models.get("resnet", channels=(48, 96), stem_stride=1)
    ignn = models.get("ignn", edge_index=_ring(10), num_nodes=10, in_features=1433, num_classes=7, hidden=64)
    gcn = models.get("gcn", edge_index=_ring(10), num_nodes=10, in_features=1433, num_classes=7, hidden=64)
    for a, b in ((lm, tr), (mdeq, res), (ignn, gcn)):
        na, nb = models.num_parameters(a), models.num_parameters(b)
        assert abs(na - nb) / na < 0.1, (type(a).__name__, na, type(b).__name__, nb)


def test_a_deq_model_must_declare_feature_dim():
    class Forgetful(models.DEQModel):
        def __init__(self):
            super().__init__()

    with pytest.raises(TypeError, match="Forgetful: a DEQModel must declare feature_dim"):
        Forgetful()

    class InInit(models.DEQModel):
        def __init__(self):
            super().__init__()
            self.feature_dim = 1

    assert InInit().feature_dim == 1


def test_truncated_solve_budget_is_nfe_and_k_is_deprecated():
    model = _tiny_lm().eval()
    x = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        z, info = model.truncated_solve(x, nfe=2, solver="fixed_point")
        with pytest.warns(DeprecationWarning, match=r"truncated_solve\(k=...\) is deprecated: the budget is"):
            z_old, info_old = model.truncated_solve(x, k=2, solver="fixed_point")
    assert info.nfe == info_old.nfe == 2 and torch.equal(z, z_old)
    with pytest.raises(TypeError, match="give nfe .k is its deprecated name., not both"):
        model.truncated_solve(x, 2, k=2)
