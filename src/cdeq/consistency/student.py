"""The C-DEQ student: g(z_t, t, x) = c_skip(t) z_t + c_out(t) P(z_<=t, t, x) (Eq. 5).

``structure="anderson"`` (the paper's model) sets P to a two-step Anderson update (Eq. 7, with the
mixing weights of Eq. 4 for a history of two) over the learnable map h(z_t, t, x) = W [f'(z_t, x) || t]
(Eq. 8); ``structure="plain"`` is the ablation without AA, P = h. f' (injection and layer) is a
copy of the teacher's, started from its weights (weight/spectral norm baked in), and W is a 1x1
projection along the teacher's ``feature_dim``, one per state part, initialised to the identity on
f' and zero on the time channel, so that h starts exactly as the teacher's f. W is a full
``C x (C + 1)`` matrix (:class:`FullProjection`) or, with ``proj_rank=r``, the identity plus a rank-r
map and the time column (:class:`LowRankProjection`): on a graph every node pays for W, and a full
W costs about one more dense ``C x C`` product per node next to the layer's own. The readout is the
teacher's, frozen.

One network evaluation (NFE) is one call of h, that is one call of f'. Inference (Algorithm 1)
caches h at the previous state, so every step, the Anderson ones included, costs one NFE; the
injection is computed once per input and, like a DEQ's, is not counted.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from cdeq.consistency.initialiser import StateInitialiser, pointwise_linear
from cdeq.consistency.schedule import TimeLike, TimeSchedule
from cdeq.solvers import SolverInfo, solve
from cdeq.state import State, StateLayout, as_tuple, map_state

STRUCTURES = ("anderson", "plain")
INITS = ("zeros", "linear", "mlp")


def batch_dot(a: State, b: State) -> Tensor:
    """Per-sample inner product ``<a_i, b_i>`` of two states of the same structure, ``(B,)``
    (a product and a sum: faster on CPU than ``linalg.vecdot`` or a batched ``bmm``)."""
    total = None
    for p, q in zip(as_tuple(a), as_tuple(b)):
        s = torch.mul(p, q).reshape(p.shape[0], -1).sum(dim=1)
        total = s if total is None else total + s
    return total


def batch_sq_norm(a: State) -> Tensor:
    """Per-sample squared norm ``||a_i||^2``, ``(B,)``: one read of the state (``vector_norm`` writes
    no product, so it beats :func:`batch_dot` of a state with itself)."""
    total = None
    for p in as_tuple(a):
        s = torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1).square()
        total = s if total is None else total + s
    return total


def budget(nfe: Optional[int], steps: Optional[int], where: str) -> int:
    """The inference budget from ``nfe``, or from the deprecated ``steps`` with a DeprecationWarning."""
    if steps is not None:
        if nfe is not None:
            raise TypeError(f"{where}: pass nfe alone (steps is its deprecated name)")
        warnings.warn(f"{where}(steps=...) is deprecated: the inference budget is called nfe", DeprecationWarning,
                      stacklevel=4)
        nfe = steps
    return 1 if nfe is None else nfe


def teacher_feature_dim(teacher: nn.Module) -> int:
    """The teacher's declared ``feature_dim`` (where W of Eq. 8 appends the time channel); an
    undeclared one is an error, not a guess that could append t along an image's width."""
    dim = getattr(teacher, "feature_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"teacher: {type(teacher).__name__} must declare an int feature_dim (the dimension of "
                        f"every state part that holds features), got {dim!r}")
    return dim


class Plan(NamedTuple):
    """Algorithm 1's times t_0..t_{J-1} (checked) and c_skip(t_j) of Eq. 5 at each, as floats."""

    times: list[float]
    c_skips: list[float]


class Residual(NamedTuple):
    """r = h(z) - z of one state and ||r||^2 per sample: inference computes it once per step and
    reuses it as the previous residual of the next Anderson step."""

    r: State
    sq: Tensor


def residual(z: State, hz: State) -> Residual:
    """:class:`Residual` of ``z`` given ``hz`` = h(z)."""
    r = map_state(torch.sub, hz, z)
    return Residual(r, batch_sq_norm(r))


def _per_sample(c: Union[float, Tensor], p: Tensor) -> Union[float, Tensor]:
    """A scalar, or a ``(B,)`` tensor reshaped to broadcast over the state part ``p``."""
    if isinstance(c, Tensor) and c.dim() > 0:
        return c.to(p.dtype).reshape(-1, *([1] * (p.dim() - 1)))
    return c


def _rows(mask: Tensor, p: Tensor) -> Tensor:
    """A ``(B,)`` mask shaped to broadcast over the state part ``p``."""
    return mask.reshape(-1, *([1] * (p.dim() - 1)))


def lerp(x: State, y: State, w: Union[float, Tensor]) -> State:
    """``(1 - w) x + w y`` part by part, ``w`` scalar or per sample (one pass per part)."""
    return map_state(lambda p, q: torch.lerp(p, q, _per_sample(w, p)), x, y)


def anderson_step(z: State, hz: State, z_prev: State, h_prev: State, *, beta_aa: float = 1.0,
                  lam: float = 1e-4, res: Optional[Residual] = None, res_prev: Optional[Residual] = None) -> State:
    """The two-step Anderson update S^AA(z_k, z_{k-1}; h) of Eq. 7 (Eq. 4 with m_k = 1).

    alpha = [a, 1 - a] minimises ||a r_k + (1 - a) r_{k-1}||^2 + lam s (a^2 + (1 - a)^2) per sample,
    with r_i = h(z_i) - z_i and s = (||r_k||^2 + ||r_{k-1}||^2) / 2 (a scale-free ridge, as the
    solvers use), and the result is ``beta_aa (a h_k + (1-a) h_{k-1}) + (1-beta_aa)(a z_k + (1-a) z_{k-1})``.
    With d = r_k - r_{k-1}, a = (lam s - <r_{k-1}, d>) / (||d||^2 + 2 lam s). d is formed rather than
    ||d||^2 expanded into inner products of r_k and r_{k-1}: near convergence r_k ~ r_{k-1} and the
    expansion loses the digits that set a in float32.
    ``res``/``res_prev``: the :func:`residual` of (z, hz) and (z_prev, h_prev) if already known.
    """
    res = residual(z, hz) if res is None else res
    res_prev = residual(z_prev, h_prev) if res_prev is None else res_prev
    d = map_state(torch.sub, res.r, res_prev.r)
    s = lam * 0.5 * (res.sq + res_prev.sq)
    den = batch_sq_norm(d) + 2 * s
    a = (s - batch_dot(res_prev.r, d)) / den.clamp_min(torch.finfo(den.dtype).tiny)
    mixed_h = lerp(h_prev, hz, a)
    if beta_aa == 1.0:
        return mixed_h
    return lerp(lerp(z_prev, z, a), mixed_h, beta_aa)


def inference_step(z: State, hz: State, z_prev: State, h_prev: State, res_prev: Residual, c_skip: Tensor,
                   beta_aa: float, lam: float) -> tuple[State, Residual]:
    """One Anderson-structured step after the first (Eq. 7, then Eq. 5 with c_out = 1 - c_skip):
    the new state and the residual of (z, hz). What :func:`fused_inference_step` compiles."""
    res = residual(z, hz)
    P = anderson_step(z, hz, z_prev, h_prev, beta_aa=beta_aa, lam=lam, res=res, res_prev=res_prev)
    return lerp(P, z, c_skip), res


@functools.cache
def fused_inference_step() -> Callable[..., tuple[State, Residual]]:
    """:func:`inference_step` compiled by ``torch.compile``: the residual, its norms, the Anderson
    weights and both mixes in a few fused loops instead of about ten passes over the state
    (``benchmarks/student_latency.py`` measures the gain). The first call for a shape compiles (it
    needs a C++ compiler on CPU, Triton on a GPU)."""
    return torch.compile(inference_step, dynamic=None)


def time_shift(bias: Tensor, w_t: Tensor, t: TimeLike, like: Tensor) -> Tensor:
    """b + t w_t: the time column of W [p || t] (Eq. 8) folded into a shift of the output, ``(C,)``
    when t is one time for the batch (inference), else ``(B, C)``."""
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return bias + (tt.reshape(-1, 1) if tt.dim() > 0 else tt) * w_t


class FullProjection(nn.Linear):
    """W of Eq. 8 as one ``C x (C + 1)`` matrix and a bias for a state part, started at [I | 0] (h = f)."""

    def __init__(self, channels: int, feature_dim: int, like: Tensor) -> None:
        super().__init__(channels + 1, channels, bias=True, device=like.device, dtype=like.dtype)
        self.feature_dim = feature_dim
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :channels].copy_(torch.eye(channels, dtype=like.dtype, device=like.device))
            self.bias.zero_()

    def forward(self, p: Tensor, t: TimeLike) -> Tensor:  # type: ignore[override]
        """W [p || t] along ``feature_dim`` = W_p p + (b + t w_t): one dense product per position."""
        c = p.shape[self.feature_dim]
        return pointwise_linear(p, self.weight[:, :c], time_shift(self.bias, self.weight[:, c], t, p),
                                self.feature_dim)


class LowRankProjection(nn.Module):
    """W of Eq. 8 as [I + up down | w_t] and a bias: W_p = I + up down of rank r (``down`` r x C,
    ``up`` C x r), so W [p || t] = p + up (down p) + b + t w_t costs two products through r
    channels instead of one ``C x C``. ``up``, ``w_t`` and b start at zero, so h starts as f;
    ``down`` starts random (N(0, 1/r): one Adam step on ``up`` then moves W_p's entries about as
    much as one on a full W's), or the gradient of ``up`` would be zero."""

    def __init__(self, channels: int, rank: int, feature_dim: int, like: Tensor) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Parameter(torch.randn(rank, channels, **kw) * rank ** -0.5)
        self.up = nn.Parameter(torch.zeros(channels, rank, **kw))
        self.time = nn.Parameter(torch.zeros(channels, **kw))
        self.bias = nn.Parameter(torch.zeros(channels, **kw))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def extra_repr(self) -> str:
        return f"channels={self.bias.shape[0]}, rank={self.rank}"

    def forward(self, p: Tensor, t: TimeLike) -> Tensor:
        """p + up (down p) + b + t w_t along ``feature_dim``."""
        shift = time_shift(self.bias, self.time, t, p)
        if self.feature_dim % p.dim() != p.dim() - 1:  # channels first: pointwise_linear's batched products
            return p + pointwise_linear(pointwise_linear(p, self.down, None, self.feature_dim), self.up, shift,
                                        self.feature_dim)
        flat = p.reshape(-1, p.shape[-1])
        # down p as (r, positions) = down flat^T: for r << C, MKL's kernels are up to 2x faster that way round
        low = torch.mm(self.down, flat.t()).t()
        out = torch.addmm(flat, low, self.up.t()).reshape(p.shape)  # p + up (down p) in one product
        if shift.dim() == 2:  # one time per sample: (B, C) along the first and the last dimension
            shift = shift.reshape(shift.shape[0], *([1] * (p.dim() - 2)), shift.shape[1])
        return out + shift


class ConsistencyDEQ(nn.Module):
    """A C-DEQ student distilled from ``teacher`` (a :class:`~cdeq.models.DEQModel`).

    Args:
        teacher: the trained DEQ; it is copied twice (a frozen copy for the readout and the hash
            check, a trainable copy for f') and never changed.
        structure: ``"anderson"`` (Eq. 7) or ``"plain"`` (P = h, the ablation without AA).
        schedule: the times of Eq. 5-6 and Appendix B.3 (:class:`TimeSchedule`: eps, T, gamma,
            rho, beta; ``beta=None`` aligns inference with training times, beta = e^{-rho}).
        beta_aa: the damping of the Anderson step (beta of Eq. 4), in (0, 1].
        aa_lam: the ridge of the two-term least squares (relative to the residuals' norms).
        init: where inference starts: ``"zeros"`` the teacher's z_0 (the paper), or a learned
            z_0 = z_0 + net(u) of the injection (:mod:`cdeq.consistency.initialiser`), ``"linear"``
            (a 1x1 map) or ``"mlp"`` (``init_hidden`` wide); it starts at the teacher's z_0 and
            costs no network evaluation. Distillation then puts it in place of the cached z_0.
        proj_rank: the form of W (Eq. 8): ``None`` a full ``C x (C + 1)`` matrix per state part
            (the paper); an int r >= 1 (at most every part's C) the identity plus a rank-r map and
            the time column (:class:`LowRankProjection`), cheaper where W is applied at many
            positions (every node of a graph).
        example: an input x; builds W now. Without it W is built on the first call (``distill``
            and ``train_direct`` do so before making their optimiser) or by ``load_state_dict``.
    """

    def __init__(self, teacher: nn.Module, *, structure: str = "anderson", schedule: Optional[TimeSchedule] = None,
                 beta_aa: float = 1.0, aa_lam: float = 1e-4, init: str = "zeros", init_hidden: int = 64,
                 proj_rank: Optional[int] = None, example: Any = None) -> None:
        super().__init__()
        from cdeq.norm import remove_norm, reset_norm

        if structure not in STRUCTURES:
            raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
        if not 0 < beta_aa <= 1:
            raise ValueError(f"beta_aa: expected a damping in (0, 1], got {beta_aa}")
        if not aa_lam >= 0:
            raise ValueError(f"aa_lam: expected a ridge >= 0, got {aa_lam}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if proj_rank is not None and (isinstance(proj_rank, bool) or not isinstance(proj_rank, int) or proj_rank < 1):
            raise ValueError(f"proj_rank: expected None (a full W) or an int >= 1 (the rank of W_p - I), got {proj_rank!r}")
        for name in ("inject", "layer", "readout", "init_state"):
            if not callable(getattr(teacher, name, None)):
                raise TypeError(f"teacher: expected a DEQModel with inject/layer/readout/init_state, missing {name}")
        self.structure, self.beta_aa, self.aa_lam = structure, float(beta_aa), float(aa_lam)
        if schedule is not None and not isinstance(schedule, TimeSchedule):
            raise TypeError(f"schedule: expected a TimeSchedule (or None: its defaults), got {type(schedule).__name__}")
        self.schedule = schedule or TimeSchedule()
        self.feature_dim = teacher_feature_dim(teacher)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        reset_norm(self.teacher)
        self.backbone = remove_norm(copy.deepcopy(teacher)).requires_grad_(True)
        self.proj = nn.ModuleList()
        self.proj_rank = proj_rank
        self.init = init
        self.initialiser = (StateInitialiser(self.feature_dim, 0 if init == "linear" else init_hidden)
                            if init != "zeros" else None)
        self.nfe = 0  # network evaluations of the last infer/predict/rollout/solve
        self.info: Optional[SolverInfo] = None  # per-sample NFE of the last infer, if it had a tol
        self._calls = 0
        self.fused = False  # no-grad inference through fused_inference_step (see :meth:`rollout`)
        if example is not None:
            self.build(example)

    # -- structure -------------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return len(self.proj) > 0

    def train(self, mode: bool = True) -> "ConsistencyDEQ":
        """As ``nn.Module.train``, but the frozen teacher copy stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _channels(self, z: State) -> list[int]:
        chans = []
        for i, p in enumerate(as_tuple(z)):
            if not -p.dim() <= self.feature_dim < p.dim():
                raise ValueError(f"teacher.feature_dim={self.feature_dim} is not a dimension of state part {i} "
                                 f"(shape {tuple(p.shape)})")
            chans.append(p.shape[self.feature_dim])
        return chans

    def _build_channels(self, channels: Sequence[int], like: Tensor) -> None:
        """Create W (Eq. 8), one projection per state part, started at [I | 0] with a zero bias:
        :class:`FullProjection`, or :class:`LowRankProjection` of rank ``proj_rank``."""
        for i, c in enumerate(channels):
            if self.proj_rank is None:
                self.proj.append(FullProjection(c, self.feature_dim, like))
                continue
            if self.proj_rank > c:
                raise ValueError(f"proj_rank: expected at most the channels of every state part, got {self.proj_rank} "
                                 f"for part {i} of {c} channels")
            self.proj.append(LowRankProjection(c, self.proj_rank, self.feature_dim, like))

    def build(self, x: Any) -> None:
        """Create W from the teacher's state structure for input ``x`` (no-op once built)."""
        if self.built:
            return
        with torch.no_grad():
            u = self.teacher.inject(x)
            z0 = self.teacher.init_state(u)
        StateLayout(z0, "teacher.init_state(inject(x))")
        self._build_channels(self._channels(z0), as_tuple(z0)[0])
        if self.initialiser is not None:
            self.initialiser.build(u, z0)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """As ``nn.Module.load_state_dict``; builds W from the saved shapes if not built yet (a saved
        W of another form than ``proj_rank`` is an error that names both)."""
        if not self.built:
            n = sum(1 for k in state_dict if k.startswith("proj.") and k.endswith(".bias"))
            saved = state_dict["proj.0.down"].shape[0] if "proj.0.down" in state_dict else None
            if n and saved != self.proj_rank:
                raise ValueError(f"load_state_dict: the saved W has proj_rank={saved}, this student proj_rank="
                                 f"{self.proj_rank}; make the student with the saved proj_rank")
            like = next(self.backbone.parameters(), torch.zeros(()))
            self._build_channels([state_dict[f"proj.{i}.bias"].shape[0] for i in range(n)], like)
            if self.initialiser is not None:
                self.initialiser.build_from_state_dict(state_dict, "initialiser.", like)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- Eq. 5, 7, 8 -------------------------------------------------------------------------------
    def inject(self, x: Any) -> Any:
        """The student's own injection (a trained copy of the teacher's), computed once per input."""
        self.build(x)
        return self.backbone.inject(x)

    def initial_state(self, u: Any) -> State:
        """z_{t_0}: the teacher's z_0 for the injection ``u``, plus the learned net(u) unless ``init="zeros"``."""
        z0 = self.backbone.init_state(u)
        return z0 if self.initialiser is None else self.initialiser(u, z0)

    def h(self, z: State, t: TimeLike, u: Any) -> State:
        """h(z_t, t, x) = W [f'(z_t, x) || t] (Eq. 8); one network evaluation."""
        if not self.built:
            raise RuntimeError("ConsistencyDEQ: W is not built; call inject(x) or build(x) first")
        self.schedule.check(t)
        return self._h(z, t, u)

    def _h(self, z: State, t: TimeLike, u: Any) -> State:
        """:meth:`h` without the check of ``t`` (a check is data-dependent: export cannot trace it)."""
        self._calls += 1
        out = as_tuple(self.backbone.layer(z, u))
        parts = [proj(p, t) for p, proj in zip(out, self.proj)]
        return tuple(parts) if isinstance(z, (tuple, list)) else parts[0]

    def g(self, z: State, t: TimeLike, hz: State, z_prev: Optional[State] = None,
          h_prev: Optional[State] = None, res: Optional[Residual] = None,
          res_prev: Optional[Residual] = None) -> State:
        """g = c_skip(t) z + c_out(t) P (Eq. 5) given h at z (and, for AA, at the previous state).

        P = h(z) for the plain structure or without a previous state (Algorithm 1, line 1);
        otherwise P = S^AA(z, z_prev; h) (Eq. 7), reusing the residuals ``res``/``res_prev`` if given.
        """
        return self._g(z, self.schedule.c_skip(t), hz, z_prev, h_prev, res, res_prev)

    def _g(self, z: State, c_skip: TimeLike, hz: State, z_prev: Optional[State], h_prev: Optional[State],
           res: Optional[Residual], res_prev: Optional[Residual]) -> State:
        """:meth:`g` given c_skip(t) itself (computed once per time by :meth:`_plan`)."""
        if self.structure == "plain" or z_prev is None:
            P = hz
        else:
            P = anderson_step(z, hz, z_prev, h_prev, beta_aa=self.beta_aa, lam=self.aa_lam, res=res,
                              res_prev=res_prev)
        if not isinstance(c_skip, Tensor) and c_skip == 0:  # t = eps, every inference's first step: g = P
            return P
        return lerp(P, z, c_skip)  # c_out = 1 - c_skip: one pass

    def consistency(self, u: Any, z: State, t: Tensor, z_prev: State, t_prev: Tensor, first: Tensor) -> State:
        """g on teacher states (training): z = z_{t_k}, z_prev = z_{t_{k-1}} (any state where
        ``first``, the rows with k = 0, which have no history). Costs 1 or 2 network evaluations."""
        hz = self.h(z, t, u)
        if self.structure == "plain" or bool(first.all()):
            return self.g(z, t, hz)
        h_prev = self.h(z_prev, t_prev, u)
        out_aa = self.g(z, t, hz, z_prev, h_prev)
        if not bool(first.any()):
            return out_aa
        out_first = self.g(z, t, hz)
        return map_state(lambda a, b: torch.where(first.reshape(-1, *([1] * (a.dim() - 1))), a, b),
                         out_first, out_aa)

    # -- Algorithm 1 ---------------------------------------------------------------------------------
    def _plan(self, nfe: int, schedule: Optional[Sequence[float]]) -> Plan:
        """The times of Algorithm 1 (checked once here) and c_skip at each."""
        times = self.schedule.inference_times(nfe, schedule)
        return Plan(times, [float(self.schedule.c_skip(t)) for t in times])

    def _fused_step(self, z: State, hz: State, z_prev: State, h_prev: State, res_prev: Residual,
                    c_skip: float) -> tuple[Optional[State], Optional[Residual]]:
        """:func:`fused_inference_step` with ``c_skip``; ``(None, None)`` (and ``self.fused`` off, with
        a warning) if it cannot be compiled here, so the caller runs the eager step."""
        c_skip = torch.as_tensor(c_skip, dtype=as_tuple(z)[0].dtype, device=as_tuple(z)[0].device)
        try:
            return fused_inference_step()(z, hz, z_prev, h_prev, res_prev, c_skip, self.beta_aa, self.aa_lam)
        except Exception as err:  # noqa: BLE001 -- inductor's failures (no compiler, ...) have no common type
            warnings.warn(f"ConsistencyDEQ: the fused inference step could not be compiled ({type(err).__name__}: "
                          f"{err}); running it eager", RuntimeWarning)
            self.fused = False
            return None, None

    def _steps(self, x: Any, plan: Plan, detach: bool, z0: Optional[State], u: Any,
               fuse: bool = True) -> Iterator[tuple[State, State, State]]:
        """Algorithm 1 one step at a time: ``(z_{t_j}, h(z_{t_j}), z_{t_{j+1}})`` for j = 0..J-1.

        Step j evaluates h once, at (z_{t_j}, t_j); the AA step reuses h at the previous state.
        ``fuse=False`` keeps the eager step even when :attr:`fused` is on (for export).
        """
        times = plan.times
        u = self.inject(x) if u is None else u
        z = self.initial_state(u) if z0 is None else z0
        z_prev = h_prev = res_prev = None
        fuse = fuse and self.fused and self.structure == "anderson" and not torch.is_grad_enabled()
        for j, (t, c_skip) in enumerate(zip(times, plan.c_skips)):
            hz = self._h(z, t, u)
            new = None
            if fuse and z_prev is not None:
                new, res = self._fused_step(z, hz, z_prev, h_prev, res_prev, c_skip)
                fuse = new is not None  # it could not compile: eager from here on
            if new is None:
                # r = h(z) - z once per step: this step's AA needs it, and the next as its previous residual
                needs_res = self.structure == "anderson" and (z_prev is not None or j + 1 < len(times))
                res = residual(z, hz) if needs_res else None
                new = self._g(z, c_skip, hz, z_prev, h_prev, res, res_prev)
            yield z, hz, new
            z_prev, h_prev, res_prev = z, hz, res
            if detach:
                z_prev, h_prev = map_state(torch.detach, z_prev), map_state(torch.detach, h_prev)
                res_prev = None if res is None else Residual(map_state(torch.detach, res.r), res.sq.detach())
                new = map_state(torch.detach, new)
            z = new

    def rollout(self, x: Any, nfe: int, schedule: Optional[Sequence[float]] = None, *,
                detach: bool = False, z0: Optional[State] = None, u: Any = None) -> list[State]:
        """Algorithm 1 with gradients: the states z_{t_1}..z_{t_J} after each of the J steps.

        ``detach`` cuts the graph between steps (each step then learns from its own earlier
        estimates as fixed inputs). ``z0`` defaults to :meth:`initial_state`; ``u``,
        the injection ``self.inject(x)``, may be passed when the caller has it already.
        """
        calls0 = self._calls
        outs = [new for _, _, new in self._steps(x, self._plan(nfe, schedule), detach, z0, u)]
        self.nfe = self._calls - calls0
        return outs

    @torch.no_grad()
    def infer(self, x: Any, nfe: Optional[int] = None, schedule: Optional[Sequence[float]] = None, *,
              steps: Optional[int] = None, tol: Optional[float] = None) -> State:
        """Algorithm 1: the equilibrium estimate after ``nfe`` = J network evaluations (default 1), in
        the teacher's state structure. ``schedule``: J times t_0..t_{J-1} in [eps, T] (default B.3).
        ``self.nfe`` is set to the evaluations made (J). ``steps`` is the deprecated name of ``nfe``.

        ``tol``: an adaptive budget of at most J evaluations. A sample stops at the first step that
        changes its state by at most ``tol`` relative (||z_{t_{j+1}} - z_{t_j}|| <= tol ||z_{t_{j+1}}||)
        and keeps that step's state; the batch stops once every sample has (one host read per step).
        ``self.info`` (a :class:`cdeq.SolverInfo`; None after a fixed budget) then gives each
        sample's NFE in ``steps``; the batch computes every step it runs, so ``self.nfe`` is the
        batch's evaluations."""
        nfe = budget(nfe, steps, "ConsistencyDEQ.infer")
        if tol is None:
            self.info = None
            return self.rollout(x, nfe, schedule)[-1]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
            raise ValueError(f"tol: expected a finite relative change >= 0 (or None: a fixed budget), got {tol!r}")
        return self._adaptive(x, nfe, schedule, float(tol))

    def _adaptive(self, x: Any, nfe: int, schedule: Optional[Sequence[float]], tol: float) -> State:
        """:meth:`infer` with ``tol``: each sample frozen at the first step whose relative change meets it."""
        calls0, out, stopped, used = self._calls, None, None, None
        for j, (z, _, new) in enumerate(self._steps(x, self._plan(nfe, schedule), False, None, None)):
            change = batch_sq_norm(map_state(torch.sub, new, z)).sqrt()
            small = change <= tol * batch_sq_norm(new).sqrt()
            if out is None:
                out, stopped = new, small
                used = torch.where(small, 1, nfe)
                continue
            out = map_state(lambda a, b: torch.where(_rows(stopped, a), a, b), out, new)
            used = torch.where(small & ~stopped, j + 1, used)
            stopped = stopped | small
            if bool(stopped.all()):
                break
        self.nfe = self._calls - calls0
        self.info = SolverInfo(nfe=self.nfe, steps=used, converged=stopped)
        return out

    @torch.no_grad()
    def solve(self, x: Any, *, tol: float = 1e-4, max_nfe: int = 50, warm: int = 1, solver: str = "anderson",
              seed_history: bool = False, **options: Any) -> tuple[State, SolverInfo]:
        """The teacher's exact equilibrium, warm-started by the student: ``warm`` steps of Algorithm 1,
        then :func:`cdeq.solve` on the teacher's f from the student's state, each sample stopped
        once its residual meets ``tol`` (the student ends near its own fixed point, not f's: this
        closes the gap). ``max_nfe`` bounds all network calls, the student's included; ``info.nfe``
        counts them all, ``info.steps`` is each sample's NFE (``warm`` + its solver calls; the
        solver's check call is not counted) and ``info.trace`` covers the solver's iterates only.
        ``seed_history``: start Anderson's window from the student's last two (z, h(z)) pairs
        instead of empty (free; docs/inference.md measures whether it helps). ``warm=0`` is the
        teacher's solver from its own z_0. ``options`` go to :func:`cdeq.solve`."""
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise ValueError(f"warm: expected an int >= 0 (student steps before the solver), got {warm!r}")
        if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe <= warm:
            raise ValueError(f"max_nfe: expected an int > warm={warm} (the solver needs at least one call), "
                             f"got {max_nfe!r}")
        if seed_history and warm == 0:
            raise ValueError("seed_history=True: needs warm >= 1 (the history is the student's steps)")
        if seed_history and "history" in options:
            raise TypeError("solve: pass seed_history=True or history=..., not both (both set Anderson's window)")
        u = self.teacher.inject(x)
        if warm == 0:
            z0 = self.teacher.init_state(u)
        else:
            steps = list(self._steps(x, self._plan(warm, None), False, None, None))
            z0 = steps[-1][2]
            if seed_history:
                options["history"] = [(z, hz) for z, hz, _ in steps[-2:]]
        z, info = solve(lambda z: self.teacher.layer(z, u), z0, solver=solver, max_iter=max_nfe - warm, tol=tol,
                        **options)
        info.nfe += warm
        info.steps = info.steps + warm
        self.nfe = info.nfe
        return z, info

    def as_module(self, nfe: int, schedule: Optional[Sequence[float]] = None, *,
                  readout: bool = True) -> nn.Module:
        """A plain ``nn.Module`` x -> :meth:`predict` (or the state, ``readout=False``) with exactly
        ``nfe`` network calls, which ``torch.export.export`` and ``torch.onnx.export`` accept
        (:class:`~cdeq.consistency.export.FixedBudgetStudent`; it shares this student's parameters
        and starts in its mode: call ``student.eval()`` first to deploy)."""
        from cdeq.consistency.export import FixedBudgetStudent

        return FixedBudgetStudent(self, nfe, schedule, readout=readout)

    def state(self, x: Any, nfe: int) -> State:
        """The state after ``nfe`` network evaluations (:meth:`infer`): the interface every method
        the pipeline compares shares."""
        return self.infer(x, nfe)

    @torch.no_grad()
    def predict(self, x: Any, nfe: Optional[int] = None, schedule: Optional[Sequence[float]] = None, *,
                steps: Optional[int] = None) -> Tensor:
        """The teacher's frozen readout of :meth:`infer`."""
        return self.teacher.readout(self.infer(x, budget(nfe, steps, "ConsistencyDEQ.predict"), schedule))

    def readout(self, z: State) -> Tensor:
        """The teacher's frozen readout (gradients reach z, not the readout's weights)."""
        return self.teacher.readout(z)

    def describe(self) -> dict[str, Any]:
        """The settings that define this student (recorded with its checkpoints)."""
        return {"structure": self.structure, "init": self.init, "schedule": vars(self.schedule),
                "beta_aa": self.beta_aa, "aa_lam": self.aa_lam, "proj_rank": self.proj_rank}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters distillation trains: f' (injection and layer) and W."""
        return [p for p in self.parameters() if p.requires_grad]
