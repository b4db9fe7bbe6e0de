"""Shared test set-up and the toy DEQs every test file uses."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cdeq
from cdeq.consistency.trajectories import sample_trajectories
from cdeq.models.protocol import DEQModel


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests run tiny models: one intra-op thread is faster, and does not stall when the two
    cores are shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyDEQ(DEQModel):
    """z* = tanh(W z* + U x), ||W||_2 = contraction < 1 (a contraction); logits = head(z)."""

    feature_dim = -1

    def __init__(self, d_in: int = 8, d: int = 32, classes: int = 4, contraction: float = 0.9, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.U = nn.Linear(d_in, d)
        self.W = nn.Parameter(torch.randn(d, d, generator=g))
        self.head = nn.Linear(d, classes)
        with torch.no_grad():
            self.W.mul_(contraction / torch.linalg.matrix_norm(self.W, 2))
            self.U.weight.copy_(torch.randn(d, d_in, generator=g) * 1.5 / math.sqrt(d_in))
            self.U.bias.zero_()
            self.head.weight.copy_(torch.randn(classes, d, generator=g))
            self.head.bias.zero_()

    def inject(self, x):
        return self.U(x)

    def layer(self, z, u):
        return torch.tanh(z @ self.W.t() + u)

    def readout(self, z):
        return self.head(z)

    def init_state(self, u):
        return torch.zeros_like(u)


class AutocastSpyDEQ(ToyDEQ):
    """ToyDEQ recording, per layer call, whether autocast was on and the dtype of its matmul."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def layer(self, z, u):
        self.seen.append((torch.is_autocast_enabled("cpu"), (z @ self.W.t()).dtype))
        return super().layer(z, u)


class ToyTupleDEQ(DEQModel):
    """A two-part state (B, 3, 4) and (B, 5, 2), features on dim 1 (like MDEQ's branches)."""

    feature_dim = 1

    def __init__(self, d_in: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = 3 * 4 + 5 * 2
        self.U = nn.Linear(d_in, n)
        self.W = nn.Parameter(torch.randn(n, n, generator=g))
        with torch.no_grad():
            self.W.mul_(0.8 / torch.linalg.matrix_norm(self.W, 2))
        self.head = nn.Linear(n, 3)

    def inject(self, x):
        return self.U(x)

    def _split(self, flat):
        return flat[:, :12].reshape(-1, 3, 4), flat[:, 12:].reshape(-1, 5, 2)

    def layer(self, z, u):
        flat = torch.cat([z[0].flatten(1), z[1].flatten(1)], dim=1)
        return self._split(torch.tanh(flat @ self.W.t() + u))

    def readout(self, z):
        return self.head(torch.cat([z[0].flatten(1), z[1].flatten(1)], dim=1))

    def init_state(self, u):
        return self._split(torch.zeros_like(u))


class ToyGraphDEQ(DEQModel):
    """One graph: x (1, N, F), state (1, N, d), z* = tanh(A z* W + x U) on a ring graph."""

    feature_dim = -1

    def __init__(self, n: int = 20, f: int = 5, d: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        adj = torch.eye(n) + torch.roll(torch.eye(n), 1, 0) + torch.roll(torch.eye(n), -1, 0)
        self.register_buffer("adj", adj / 3.0)
        self.U = nn.Linear(f, d)
        self.W = nn.Parameter(torch.randn(d, d, generator=g))
        with torch.no_grad():
            self.W.mul_(0.8 / torch.linalg.matrix_norm(self.W, 2))
        self.head = nn.Linear(d, 3)

    def inject(self, x):
        return self.U(x)

    def layer(self, z, u):
        return torch.tanh(self.adj @ z @ self.W + u)

    def readout(self, z):
        return self.head(z)

    def init_state(self, u):
        return torch.zeros_like(u)


def toy_batches(teacher: ToyDEQ, n: int = 1024, batch: int = 128, seed: int = 1, d_in: int = 8):
    """Synthetic inputs with the teacher's own equilibrium predictions as labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    with torch.no_grad():
        u = teacher.inject(x)
        z, _ = cdeq.solve(lambda z: teacher.layer(z, u), teacher.init_state(u), max_iter=100, tol=1e-7)
        y = teacher.readout(z).argmax(-1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def toy_trajectories(teacher: nn.Module, batches, steps: int = 20, **kw):
    return sample_trajectories(teacher, batches, steps=steps, solver_options={"m": 5}, **kw)

def count_layer_calls(module: DEQModel) -> list[int]:
    """Wrap ``module.layer`` to count its calls; returns the one-element counter."""
    calls = [0]
    layer = module.layer

    def counted(z, u):
        calls[0] += 1
        return layer(z, u)

    module.layer = counted
    return calls


def assert_onnx_matches_eager(ort, module: nn.Module, x: torch.Tensor) -> None:
    """Export ``module`` to ONNX and check an ONNX Runtime session against eager to 1e-5."""
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False, optimize=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), module(x), rtol=1e-5, atol=1e-5)
