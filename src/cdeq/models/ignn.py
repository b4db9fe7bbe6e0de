"""Implicit graph neural network (IGNN; Gu et al. 2020; torchdeq paper Eq. 23).

The equilibrium node features solve ``Z = relu(A Z W + U(X))`` (Eq. 23) with ``A`` the
symmetrically normalised adjacency with self loops. In vectorised form the layer is
``(W^T kron A) vec(Z)``, whose Perron-Frobenius eigenvalue is ``lambda_pf(|W|) lambda_pf(A)``;
keeping ``||W||_inf <= kappa / lambda_pf(A)`` with ``kappa < 1`` therefore makes the layer
well-posed (a unique fixed point, reached by fixed-point iteration). :meth:`IGNN.project_`
restores this after every optimiser step (projected gradient descent, as in the IGNN paper).

The batch is one graph: inputs are ``(1, N, F)`` node features, states ``(1, N, d)``.
"""
from __future__ import annotations

import copy

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.models.protocol import DEQModel, zeros_like_state


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2`` as a coalesced sparse COO ``(N, N)`` float32 tensor.

    ``edge_index`` is ``(2, E)`` long; edges are taken as given (pass both directions for an
    undirected graph); self loops are added once per node.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index: expected shape (2, E), got {tuple(edge_index.shape)}")
    if num_nodes <= 0:
        raise ValueError(f"num_nodes: expected a positive count, got {num_nodes}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index: node ids must lie in [0, {num_nodes}), got "
                         f"[{int(edge_index.min())}, {int(edge_index.max())}]")
    loops = torch.arange(num_nodes, dtype=torch.long, device=edge_index.device).expand(2, -1)
    idx = torch.cat([edge_index[:, edge_index[0] != edge_index[1]].long(), loops], dim=1)
    adj = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (num_nodes, num_nodes), check_invariants=True).coalesce()
    idx = adj.indices()
    ones = torch.ones_like(adj.values())  # duplicate edges count once
    deg = torch.zeros(num_nodes).index_add_(0, idx[0], ones)
    inv_sqrt = deg.rsqrt()
    vals = inv_sqrt[idx[0]] * ones * inv_sqrt[idx[1]]
    return torch.sparse_coo_tensor(idx, vals, (num_nodes, num_nodes), check_invariants=True).coalesce()


class _SparseMatmul(torch.autograd.Function):
    """``A @ x`` for a constant sparse CSR ``A`` whose transpose ``At`` is precomputed: the
    backward is ``At @ grad`` (itself differentiable, for double backward), much faster on CPU
    than autograd's own backward of a sparse product."""

    @staticmethod
    def forward(ctx: Any, adj: Tensor, adj_t: Tensor, x: Tensor) -> Tensor:
        ctx.mats = (adj, adj_t)
        return adj @ x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, Tensor]:
        adj, adj_t = ctx.mats
        return None, None, _SparseMatmul.apply(adj_t, adj, grad)


class SparseAdjacency(nn.Module):
    """A graph's normalised adjacency as CSR buffers (kept out of the state dict: the graph is
    data, rebuilt by whoever builds the model); calling it on ``(N, d)`` features returns ``A x``.

    Under ``torch.export`` the product is a gather and a scatter-add over the edge list instead:
    ONNX has no sparse tensors, so a CSR buffer cannot be serialised into an ONNX graph."""

    def __init__(self, edge_index: Tensor, num_nodes: int) -> None:
        super().__init__()
        adj = normalized_adjacency(edge_index, num_nodes)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul is all we use
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("adj", adj.to_sparse_csr(), persistent=False)
            self.register_buffer("adj_t", adj.t().coalesce().to_sparse_csr(), persistent=False)
        # not buffers: the edge list repeats adj, and a new buffer would change every cached stage's key
        self.edge_list = (adj.indices().clone(), adj.values().clone())
        self.num_nodes = num_nodes
        self.pf = perron_frobenius(adj)

    def __deepcopy__(self, memo: dict) -> "SparseAdjacency":
        """Copies share the graph: it is constant data, and CSR tensors cannot be deep-copied
        (students, EMA targets and teacher copies all deep-copy the model)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__ = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        return new

    def indices(self) -> Tensor:
        """``(2, nnz)`` (row, column) pairs of the nonzeros, self loops included, in row-major order."""
        return self.edge_list[0].to(self.adj.device)

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` in the adjacency's dtype, outside autocast (no bf16 sparse kernels on CPU), so a
        layer under ``amp`` (:mod:`cdeq.precision`) keeps its dense products alone in bf16."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.adj.dtype)
            if torch.compiler.is_exporting():
                (rows, cols), weight = (t.to(x.device) for t in self.edge_list)
                return torch.zeros_like(x).index_add(0, rows, x[cols] * weight.unsqueeze(1))
            return _SparseMatmul.apply(self.adj, self.adj_t, x)


def perron_frobenius(adj: Tensor, iters: int = 200, tol: float = 1e-7) -> float:
    """The Perron-Frobenius eigenvalue of a non-negative (sparse) matrix, by power iteration."""
    v = torch.ones(adj.shape[0], 1, dtype=adj.dtype, device=adj.device)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        w = torch.sparse.mm(adj, v) if adj.is_sparse else adj @ v
        new = float(w.norm())
        if new == 0.0:
            return 0.0
        v = w / new
        if abs(new - lam) <= tol * new:
            return new
        lam = new
    return lam


def project_rows_l1(weight: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of ``weight`` onto the L1 ball of ``radius``.

    After it ``||weight||_inf`` (the largest absolute row sum) is at most ``radius``. Rows already
    inside are unchanged; the others are soft-thresholded (Duchi et al. 2008, sort-based).
    """
    if radius <= 0:
        raise ValueError(f"radius: expected a positive L1 radius, got {radius}")
    absw = weight.abs()
    inside = absw.sum(dim=1) <= radius
    if bool(inside.all()):
        return weight
    srt, _ = absw.sort(dim=1, descending=True)
    cums = srt.cumsum(dim=1) - radius
    ks = torch.arange(1, weight.shape[1] + 1, dtype=weight.dtype, device=weight.device)
    cond = srt - cums / ks > 0
    rho = cond.to(weight.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True index
    theta = cums.gather(1, rho) / (rho + 1).to(weight.dtype)
    projected = weight.sign() * (absw - theta).clamp_min(0)
    return torch.where(inside.unsqueeze(1), weight, projected)


class IGNN(DEQModel):
    """IGNN node classifier: ``Z* = relu(A Z* W + U(X))`` (Eq. 23), logits ``= Z* W_out + b``.

    The injection ``U(X) = A dropout(X) Omega`` propagates the input features once over the
    graph (as in the IGNN paper's node-classification models); dropout acts on the injection and
    the readout only, so the layer is a deterministic map of ``z``.

    Args:
        edge_index: ``(2, E)`` edges of the graph (both directions for an undirected graph).
        num_nodes, in_features, num_classes: the graph's sizes.
        hidden: the state width d.
        kappa: the well-posedness margin: ``||W||_inf <= kappa / lambda_pf(A)``, in (0, 1).
        dropout: dropout on the input features and on the state before the readout.
        identity_init: W starts as ``identity_init * I`` plus small noise (then projected): a
            propagation prior like personalised PageRank, which helps on sparse-label graphs
            such as CiteSeer; 0 starts from noise alone.
    """

    feature_dim = -1

    def __init__(self, edge_index: Tensor, num_nodes: int, in_features: int, num_classes: int,
                 hidden: int = 64, kappa: float = 0.9, dropout: float = 0.5, identity_init: float = 0.0) -> None:
        super().__init__()
        if not 0.0 < kappa < 1.0:
            raise ValueError(f"kappa: expected a well-posedness margin in (0, 1), got {kappa}")
        self.adj = SparseAdjacency(edge_index, num_nodes)
        self.num_nodes, self.kappa, self.dropout = num_nodes, kappa, dropout
        self.omega = nn.Linear(in_features, hidden, bias=False)
        self.weight = nn.Parameter(torch.empty(hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -1.0 / hidden, 1.0 / hidden)
            self.weight.add_(identity_init * torch.eye(hidden))
        self.project_()

    @property
    def radius(self) -> float:
        """The bound on ``||W||_inf`` that makes Eq. 23 well-posed: ``kappa / lambda_pf(A)``."""
        return self.kappa / self.adj.pf

    @torch.no_grad()
    def project_(self) -> None:
        """Project W back onto ``{||W||_inf <= kappa / lambda_pf(A)}`` (call after each step)."""
        self.weight.copy_(project_rows_l1(self.weight, self.radius))

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] != self.num_nodes:
            raise ValueError(f"x: expected node features of shape (1, {self.num_nodes}, F), "
                             f"got {tuple(x.shape)}")

    def inject(self, x: Tensor) -> Tensor:
        self._check_x(x)
        h = self.omega(F.dropout(x[0], self.dropout, self.training))
        return self.adj(h).unsqueeze(0)

    def layer(self, z: Tensor, u: Tensor) -> Tensor:
        """One application of Eq. 23: ``relu(A Z W + U(X) + b)``."""
        return torch.relu(self.adj(z[0] @ self.weight) + u[0] + self.bias).unsqueeze(0)

    def readout(self, z: Tensor) -> Tensor:
        return self.head(F.dropout(z, self.dropout, self.training))

    def init_state(self, u: Tensor) -> Tensor:
        return zeros_like_state(u)
