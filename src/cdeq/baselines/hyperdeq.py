"""HyperDEQ: a neural deep equilibrium solver (Bai, Koltun, Kolter 2021) for a frozen teacher.

Two small learned parts accelerate the teacher's Anderson solver without changing the teacher:

- an *initialiser*: a per-position two-layer MLP (a 1x1 network along ``feature_dim``) from the
  teacher's injection u to z_0 (state parts at another resolution than u are average-pooled to
  it), its last layer zero-initialised so that it starts at the teacher's z_0 = 0;
- a *learned Anderson step*: a small MLP reads the residual history (the scale-normalised Gram
  matrix of the last m residuals) and predicts a correction to the least-squares mixing weights
  alpha (kept summing to one) and the damping beta; it starts at zero, i.e. at classic Anderson.

NFE: each solver step makes exactly one call of the teacher's f (the layer); the initialiser
and the mixer are small networks that do not call f and count as zero NFE, as the injection does.
``state(x, nfe=k)`` returns the iterate after k calls (k = 0: the initialiser's z_0).
Training (:func:`train_hyperdeq`) unrolls the solver and minimises the distance of every iterate
(the initialiser's included) to the teacher's fixed point z*, taken from cached trajectories.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from cdeq import distributed
from cdeq.consistency.config import HyperDEQConfig
from cdeq.consistency.distill import prepare, trajectory_stream
from cdeq.consistency.initialiser import StateInitialiser
from cdeq.consistency.losses import mean_square, state_distance
from cdeq.consistency.student import teacher_feature_dim
from cdeq.consistency.trajectories import Trajectories
from cdeq.state import State, StateLayout, map_state, to_device
from cdeq.training import TrainLoop


class HyperDEQ(nn.Module):
    """A learned initialiser and Anderson mixing for ``teacher`` (which is copied, frozen).

    Args:
        teacher: a :class:`~cdeq.models.DEQModel`.
        m: the Anderson history size (number of stored iterates).
        tau: the teacher's Anderson damping, where the learned damping starts.
        lam: ridge of the least-squares alpha, relative to the residuals' squared norms.
        hidden: width of the mixer MLP; init_hidden: width of the initialiser MLP.
        example: an input x; builds the initialiser now (else on the first call or load).
    """

    def __init__(self, teacher: nn.Module, *, m: int = 5, tau: float = 1.0, lam: float = 1e-4, hidden: int = 64,
                 init_hidden: int = 64, example: Any = None) -> None:
        super().__init__()
        from cdeq.norm import reset_norm

        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"m: expected an int >= 2 (Anderson history), got {m!r}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau: expected a damping in (0, 1], got {tau}")
        self.m, self.tau, self.lam = m, float(tau), float(lam)
        self.feature_dim = teacher_feature_dim(teacher)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        reset_norm(self.teacher)
        self.mixer = nn.Sequential(nn.Linear(m * m + m, hidden), nn.GELU(), nn.Linear(hidden, m + 1))
        nn.init.zeros_(self.mixer[2].weight)
        nn.init.zeros_(self.mixer[2].bias)
        self.init_nets = StateInitialiser(self.feature_dim, init_hidden)
        self.nfe = 0
        if example is not None:
            self.build(example)

    def train(self, mode: bool = True) -> "HyperDEQ":
        super().train(mode)
        self.teacher.eval()
        return self

    # -- initialiser -------------------------------------------------------------------------------
    def build(self, x: Any) -> None:
        """Create the initialiser from the shapes of the injection and the state for input ``x``."""
        if self.init_nets.built:
            return
        with torch.no_grad():
            u = self.teacher.inject(x)
            z = self.teacher.init_state(u)
        StateLayout(z, "teacher.init_state(inject(x))")
        self.init_nets.build(u, z)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """As ``nn.Module.load_state_dict``; builds the initialiser from the saved shapes if needed."""
        self.init_nets.build_from_state_dict(state_dict, "init_nets.", next(self.mixer.parameters()))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def initial_state(self, u: Any) -> State:
        """z_0 = init_state(u) + initialiser(u) (zero NFE)."""
        return self.init_nets(u, self.teacher.init_state(u))

    # -- learned Anderson --------------------------------------------------------------------------
    def _mix(self, R: Tensor) -> tuple[Tensor, Tensor]:
        """alpha (B, n) and beta (B, 1) for the residual history R (B, n, N), n <= m."""
        B, n, _ = R.shape
        gram = torch.bmm(R, R.transpose(1, 2))
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        H = gram + (self.lam * scale)[:, None, None] * torch.eye(n, dtype=R.dtype, device=R.device)
        w = torch.linalg.solve(H, torch.ones(B, n, 1, dtype=R.dtype, device=R.device)).squeeze(2)
        alpha_ls = w / w.sum(dim=1, keepdim=True)
        feats = torch.zeros(B, self.m, self.m, dtype=R.dtype, device=R.device)
        feats[:, :n, :n] = gram / scale[:, None, None]
        valid = torch.zeros(B, self.m, dtype=R.dtype, device=R.device)
        valid[:, :n] = 1
        out = self.mixer(torch.cat([feats.reshape(B, -1), valid], dim=1))
        delta = out[:, :n]
        delta = delta - delta.mean(dim=1, keepdim=True)
        beta = self.tau * (1 + torch.tanh(out[:, self.m:]))
        return alpha_ls + delta, beta

    def iterates(self, x: Any, nfe: int) -> list[State]:
        """z_0..z_nfe of the learned solver (with gradients); exactly ``nfe`` calls of f."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 0:
            raise ValueError(f"nfe: expected an int >= 0 (calls of f), got {nfe!r}")
        self.build(x)
        u = self.teacher.inject(x)
        z0 = self.initial_state(u)
        layout = StateLayout(z0, "z0")
        z = layout.flatten(z0)
        out = [z0]
        Z: list[Tensor] = []
        FZ: list[Tensor] = []
        for _ in range(nfe):
            fz = layout.flatten(self.teacher.layer(layout.unflatten(z), u))
            Z, FZ = (Z + [z])[-self.m:], (FZ + [fz])[-self.m:]
            if len(Z) == 1:
                z = z + self.tau * (fz - z)
            else:
                Zs, Fs = torch.stack(Z, 1), torch.stack(FZ, 1)
                alpha, beta = self._mix(Fs - Zs)
                mixed_f = torch.bmm(alpha.unsqueeze(1), Fs).squeeze(1)
                mixed_z = torch.bmm(alpha.unsqueeze(1), Zs).squeeze(1)
                z = beta * mixed_f + (1 - beta) * mixed_z
            out.append(layout.unflatten(z))
        self.nfe = nfe
        return out

    @torch.no_grad()
    def state(self, x: Any, nfe: int) -> State:
        """The state after ``nfe`` calls of the teacher's f (the initialiser costs none)."""
        return self.iterates(x, nfe)[-1]

    def solve(self, x: Any, nfe: int) -> State:
        """Deprecated name of :meth:`state`."""
        warnings.warn("HyperDEQ.solve is deprecated: use HyperDEQ.state", DeprecationWarning, stacklevel=2)
        return self.state(x, nfe)

    @torch.no_grad()
    def predict(self, x: Any, nfe: int) -> Tensor:
        """The teacher's readout of :meth:`state`."""
        return self.teacher.readout(self.state(x, nfe))


class HyperDEQLoss(nn.Module):
    """``init_weight * d(z_0, z*) + mean_{k=1..train_nfe} d(z_k, z*)`` over the unrolled learned
    solver, d the MSE divided by the batch's mean square of z*; a batch is ``(x, z*, scale)``, with
    ``scale`` that mean square over the whole batch when ranks hold parts of it (None: this part's)."""

    def __init__(self, hyper: HyperDEQ, config: HyperDEQConfig) -> None:
        super().__init__()
        self.hyper, self.config = hyper, config

    def forward(self, batch: tuple[Any, State, Optional[float]]) -> tuple[Tensor, dict[str, Tensor]]:
        x, z_star, scale = batch
        if scale is None:
            scale = float(mean_square(z_star))
        zs = self.hyper.iterates(x, self.config.train_nfe)
        l_init = state_distance(zs[0], z_star, scale=scale)
        l_iter = torch.stack([state_distance(z, z_star, scale=scale) for z in zs[1:]]).mean()
        return self.config.init_weight * l_init + l_iter, {"init": l_init.detach(), "iterates": l_iter.detach()}


def train_hyperdeq(hyper: HyperDEQ, trajectories: Trajectories, config: HyperDEQConfig = HyperDEQConfig(), *,
                   run_dir: Optional[str | Path] = None, device: Optional[str | torch.device] = None,
                   progress: Optional[bool] = None) -> list[dict]:
    """Train ``hyper`` on the teacher's fixed points z* = z_K of ``trajectories`` (:class:`HyperDEQLoss`).

    ``run_dir`` keeps the checkpoint (a rerun resumes it). Returns the training history.
    """
    dev = prepare(hyper, trajectories, device)
    K = trajectories.steps

    def draw(gen: torch.Generator) -> tuple[Any, State, float]:
        shard, rows = trajectories.sample(config.batch_size, gen)
        z_star = trajectories.states(shard, rows, K, augmented=False)
        scale = float(mean_square(z_star))  # the global batch's, as in distill
        mine = torch.tensor(distributed.local_positions(len(rows)), dtype=torch.long)
        return (to_device(trajectories.inputs(shard, distributed.local_rows(rows)), dev),
                to_device(map_state(lambda p: p[mine], z_star), dev), scale)

    loss = HyperDEQLoss(hyper, config)
    meta = {"teacher_hash": trajectories.meta["teacher_hash"], "m": hyper.m, "tau": hyper.tau}
    metrics = TrainLoop(loss, loss, trajectory_stream(draw, config.seed), config, run_dir, name="hyperdeq",
                        meta=meta, progress=progress).run()
    hyper.eval()
    return metrics["history"]
