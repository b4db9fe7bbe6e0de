"""Benchmark cdeq's solvers against TorchDEQ 0.1.0 on three DEQ layers (see benchmarks/README.md).

For each problem (contractive MLP, MDEQ-like conv block, DEQ-transformer block) and solver
(fixed_point, anderson, broyden) in both libraries: the relative residual of the returned state
after 1, 2, 4, ..., 32 calls of f; the NFE to reach 1e-3 and 1e-5; the time of a 32-NFE solve
against the time of the f calls it made (solver overhead and per-step cost); for Anderson the
memory-traffic floor of one step; and, with cdeq.DEQ, forward+backward time, peak memory and
gradient error of each backward. Medians of repeats after warm-up, measured interleaved.
``--sweep`` instead measures Anderson's per-step cost against TorchDEQ's over a grid of batch sizes,
state sizes and thread counts, next to a real f (a transformer block's feed-forward half) and next
to a cheap map.

    python benchmarks/solvers.py --preset cpu            # writes results/benchmarks/solvers-cpu.{json,md}
    python benchmarks/solvers.py --sweep                 # writes results/benchmarks/solvers-sweep.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import cdeq
from cdeq.io import atomic_write_json, atomic_write_text
from cdeq.measure import device_name, git_commit, peak_memory_mb
from cdeq.runtime import tune_cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
NFES = (1, 2, 4, 8, 16, 32)
TOLS = (1e-3, 1e-5)
SAME_TOL = 1e-7  # relative tolerance of the solve compared with the float64 fixed point (float32 resolution)
SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
M = 5  # Anderson window for both libraries

# The sweep: per-sample state sizes N (about 1e3 to 1e6), batch sizes, thread counts; points with
# B N > SWEEP_CAP (4 MiB per float32 state, 40 MiB of Anderson history: past a 32 MiB L3) are left out.
SWEEP_BATCHES = (1, 16, 256)
SWEEP_SIZES = (2 ** 10, 2 ** 12, 2 ** 16, 2 ** 20)
SWEEP_THREADS = (1, 2)
SWEEP_CAP = 2 ** 20
TOKEN = 64  # token width of the sweep's f: a state of N elements is N / TOKEN tokens

PRESETS = {
    "cpu": {"mlp": {"B": 64, "D": 512}, "conv": {"B": 16, "C": 32, "H": 16},
            "transformer": {"B": 8, "L": 64, "d": 128}},
    "gpu": {"mlp": {"B": 256, "D": 2048}, "conv": {"B": 64, "C": 64, "H": 32},
            "transformer": {"B": 32, "L": 256, "d": 512}},
}


class MLPLayer(nn.Module):
    """f(z) = W2 relu(W1 z) + u with ||W2|| ||W1|| = 0.9: a contraction."""

    def __init__(self, D: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        with torch.no_grad():
            for lin in (self.l1, self.l2):
                lin.weight.mul_(0.9 ** 0.5 / torch.linalg.matrix_norm(lin.weight, 2))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return self.l2(torch.relu(self.l1(z))) + u


class ConvBlock(nn.Module):
    """MDEQ-like residual block: relu(z/2 + GN(conv(relu(GN(conv(z)))))/2 + u). (A final GroupNorm as
    in MDEQ made every solver stall near 1e-2: GN and ReLU leave a scale direction neutral.)"""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.n1, self.n2 = nn.GroupNorm(4, C), nn.GroupNorm(4, C)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.n2(self.c2(torch.relu(self.n1(self.c1(z)))))
        return torch.relu(0.5 * z + 0.5 * y + u)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm attention + FFN with input injection: h = u + attn(LN(z)); f = h + FFN(LN(h)).
    PyTorch's default initialisation (an earlier version scaled the output projections down to
    0.5 / 0.3, which made the map so contractive that every solver needed 8 NFE to 1e-5)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, max(1, d // 64), batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        a = self.ln1(z)
        h = u + self.attn(a, a, a, need_weights=False)[0]
        return h + self.ffn(self.ln2(h))


class TokenFFN(nn.Module):
    """The feed-forward half of a pre-LayerNorm transformer block on tokens of width ``TOKEN``:
    f(z) = u + W2 gelu(W1 LN(z)), hidden width 2 TOKEN. Its cost is linear in the state size, so one
    f serves every shape of the sweep (attention's L^2 would swamp the long states)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(TOKEN)
        self.ffn = nn.Sequential(nn.Linear(TOKEN, 2 * TOKEN), nn.GELU(), nn.Linear(2 * TOKEN, TOKEN))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return u + self.ffn(self.ln(z))


def build(name: str, size: dict, device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    """The layer, its injection u and z0 = 0, deterministically."""
    torch.manual_seed(0)
    if name == "mlp":
        layer, shape = MLPLayer(size["D"]), (size["B"], size["D"])
    elif name == "token_ffn":
        layer, shape = TokenFFN(), (size["B"], size["N"] // TOKEN, TOKEN)
    elif name == "conv":
        layer, shape = ConvBlock(size["C"]), (size["B"], size["C"], size["H"], size["H"])
    else:
        layer, shape = TransformerBlock(size["d"]), (size["B"], size["L"], size["d"])
    layer = layer.to(device).eval()
    u = torch.randn(shape, device=device)
    return layer, u, torch.zeros(shape, device=device)


class Counted:
    """f that counts its calls."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f, self.calls = f, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.f(z)


class TimedF(Counted):
    """f that counts its calls and adds up their wall time (the device synchronised around each)."""

    def __init__(self, f: Callable[[Tensor], Tensor], device: torch.device) -> None:
        super().__init__(f)
        self.device, self.seconds = device, 0.0

    def __call__(self, z: Tensor) -> Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = super().__call__(z)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def runner(lib: str, solver: str) -> Callable[[Callable, Tensor, int, float], Tensor]:
    """run(f, z0, max_iter, tol) -> z for one library's solver, relative stopping, m = M."""
    opts = {"anderson": {"m": M}, "broyden": {}, "fixed_point": {}}[solver]
    if lib == "cdeq":
        return lambda f, z0, k, tol: cdeq.solve(f, z0, solver=solver, max_iter=k, tol=tol, stop_mode="rel", **opts)[0]
    from torchdeq.solver import get_solver

    fn = get_solver(SOLVERS[solver])
    return lambda f, z0, k, tol: fn(f, z0, max_iter=k, tol=tol, stop_mode="rel", **opts)[0]


def bare_calls(f: Callable, z0: Tensor, n: int) -> None:
    """n calls of f on z0, each output dropped at once (as a solver drops its old f(z))."""
    for _ in range(n):
        f(z0)


def rel_residual(f: Callable, z: Tensor) -> float:
    """Mean over the batch of ||f(z) - z|| / ||f(z)||."""
    fz = f(z)
    return ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).mean().item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bandwidth(device: torch.device, n: int = 1 << 25) -> float:
    """Measured memory bandwidth (bytes read + written per second) of a large copy."""
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    return 2 * n * 4 / statistics.median(timed(lambda: b.copy_(a), device) for _ in range(7))


def reference_fixed_point(layer: nn.Module, u: Tensor, z0: Tensor) -> Tensor:
    """z* of the layer in float64 (Anderson to a relative residual of 1e-12), as float32."""
    layer64, u64 = copy.deepcopy(layer).double(), u.double()
    z, info = cdeq.solve(lambda z: layer64(z, u64), z0.double(), solver="anderson", m=M, max_iter=1000, tol=1e-12)
    if not bool(info.converged.all()):
        raise RuntimeError(f"reference fixed point not reached: rel. residual {info.rel_residual.max().item():.1e}")
    return z.to(z0.dtype)


def solver_rows(name: str, f: Callable, z0: Tensor, z_star: Tensor, device: torch.device, libs: list[str],
                repeats: int, cap: int) -> list[dict]:
    rows = []
    runs = {(lib, s): runner(lib, s) for lib in libs for s in SOLVERS}
    for (lib, s), run in runs.items():
        row = {"problem": name, "library": lib, "solver": s}
        with torch.no_grad():
            row["residual_after"] = {k: rel_residual(f, run(f, z0, k, 0.0)) for k in NFES}
            for tol in TOLS:
                cf = Counted(f)
                z = run(cf, z0, cap, tol)
                reached = rel_residual(f, z) <= 1.5 * tol and cf.calls - (lib == "cdeq") < cap
                row[f"nfe_to_{tol:g}"] = cf.calls - (lib == "cdeq") if reached else None
            # the fixed point it settles on: max |z - z*| after a solve to SAME_TOL (or the cap)
            row["max_diff_to_ref"] = (run(f, z0, cap, SAME_TOL) - z_star).abs().max().item()
        rows.append(row)
    times, calls = solve_times(f, z0, runs, device, repeats)
    for row in rows:
        key = (row["library"], row["solver"])
        t, t_f = statistics.median(times[key]), statistics.median(times["f", key])
        row["f_ms"] = 1e3 * t_f
        row["solve32_ms"] = 1e3 * t
        row["f_calls_in_solve32"] = calls[key]
        row["overhead"] = 1 - calls[key] * t_f / t
        row["per_step_ms"] = per_step_ms(times, key, calls[key])
        row["per_step_in_solve_ms"] = in_solve_ms(times, key)
        # the same from the fastest repeats: far less sensitive to other processes' load
        row["per_step_ms_min"] = 1e3 * (min(times[key]) - calls[key] * min(times["f", key])) / 32
    # Solver-only cost: f replaced by a cheap map of the same shape (z/2 + c, a few microseconds per
    # call), free of the subtraction error of a millisecond-scale f whose time drifts between runs.
    c = torch.randn_like(z0)
    times, calls = solve_times(lambda z: torch.add(c, z, alpha=0.5), z0, runs, device, repeats)
    for row in rows:
        key = (row["library"], row["solver"])
        row["solver_only_ms"] = per_step_ms(times, key, calls[key])
    return rows


def per_step_ms(times: dict, key: tuple, f_calls: int) -> float:
    """(32-NFE solve time - f_calls bare f calls) / 32 in ms, median over rounds of the difference
    within a pair: the bare calls ran just before the solve, so drifts of f's time cancel."""
    return 1e3 * statistics.median((ts - f_calls * tf) / 32 for ts, tf in zip(times[key], times["f", key]))


def in_solve_ms(times: dict, key: tuple) -> Optional[float]:
    """(32-NFE solve time - its f calls timed inside it) / 32 in ms, median over rounds: the solver's
    own ops beside a real f, without f's own slow-down beside the solver (None off the CPU)."""
    if None in times["f_in", key]:
        return None
    return 1e3 * statistics.median((ts - tf) / 32 for ts, tf in zip(times[key], times["f_in", key]))


def solve_times(f: Callable, z0: Tensor, runs: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Seconds of each solver's 32-NFE solve (key: the solver's), of 32 bare calls of f made just
    before it (per call, key ("f", solver's key)) and, on the CPU, of the f calls inside the solve
    (all of them, key ("f_in", solver's key)), over ``repeats`` rounds after two warm-up rounds;
    and the calls of f each solve made. Each round runs every solver once, starting one solver later
    than the round before, so that neither a position in the round nor a load change favours one."""
    times: dict = {}
    calls = {}
    keys = list(runs)
    with torch.no_grad():
        for rep in range(repeats + 2):
            for i in range(len(keys)):
                key = keys[(rep + i) % len(keys)]
                t_f = timed(lambda: bare_calls(f, z0, 32), device) / 32
                cf = TimedF(f, device) if device.type == "cpu" else Counted(f)  # no syncs inside a GPU solve
                t = timed(lambda: runs[key](cf, z0, 32, 0.0), device)
                calls[key] = cf.calls
                if rep >= 2:
                    times.setdefault(key, []).append(t)
                    times.setdefault(("f", key), []).append(t_f)
                    times.setdefault(("f_in", key), []).append(getattr(cf, "seconds", None))
    return times, calls


def anderson_floor(z0: Tensor, bw: float) -> dict:
    """Bytes an ideal Anderson step must move: read f(z) and z, write g and y, read m rows of G for
    the Gram row and m rows of Y for the mix, write z: (2m + 5) N elements."""
    nbytes = (2 * M + 5) * z0.numel() * z0.element_size()
    return {"bytes_per_step": nbytes, "floor_ms": 1e3 * nbytes / bw}


def step_rounds(f: Callable, z0: Tensor, runs: dict, device: torch.device, repeats: int) -> dict[str, list[dict]]:
    """Per-step seconds of each solver's 32-NFE solve, one dict per round (``repeats`` rounds after
    one warm-up round): ``in_solve``, the solve's time less that of the f calls it made, timed
    inside it (the solver's own ops, beside a real f); ``bare``, less as many bare calls of f timed
    just before it (which also charges the solver with f running slower beside it); ``f``, the
    seconds of one call inside the solve. Each round starts one solver later than the one before."""
    keys, rounds = list(runs), {key: [] for key in runs}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for i in range(len(keys)):
                key = keys[(rep + i) % len(keys)]
                t_bare = timed(lambda: bare_calls(f, z0, 32), device) / 32
                timed_f = TimedF(f, device)
                t = timed(lambda: runs[key](timed_f, z0, 32, 0.0), device)
                if rep:
                    rounds[key].append({"in_solve": (t - timed_f.seconds) / 32, "f": timed_f.seconds / timed_f.calls,
                                        "bare": (t - timed_f.calls * t_bare) / 32})
    return rounds


def step_summary(rounds: dict[str, list[dict]], key: str) -> dict:
    """cdeq's and TorchDEQ's median per-step ms under ``key`` and the median of their per-round ratios."""
    out = {f"{lib}_ms": 1e3 * statistics.median(r[key] for r in rs) for lib, rs in rounds.items()}
    if "torchdeq" in rounds:
        out["ratio"] = statistics.median(c[key] / t[key] for c, t in zip(rounds["cdeq"], rounds["torchdeq"]))
    return out


def sweep_shapes(batches: list[int], sizes: list[int], cap: int) -> list[tuple[int, int]]:
    """(batch, per-sample state size) pairs of the sweep with at most ``cap`` elements in a state."""
    return [(b, n) for b in batches for n in sizes if b * n <= cap]


def sweep_point(batch: int, size: int, threads: int, device: torch.device, libs: list[str], repeats: int) -> dict:
    """Anderson's per-step cost in both libraries at one shape, next to TokenFFN and to a cheap map."""
    torch.set_num_threads(threads)
    layer, u, z0 = build("token_ffn", {"B": batch, "N": size}, device)
    runs = {lib: runner(lib, "anderson") for lib in libs}
    load = os.getloadavg()[0]
    real = step_rounds(lambda z: layer(z, u), z0, runs, device, repeats)
    cheap = step_rounds(lambda z: torch.add(u, z, alpha=0.5), z0, runs, device, repeats)
    per_round = {kind: {lib: [round(1e3 * r["in_solve"], 4) for r in rs] for lib, rs in rounds.items()}
                 for kind, rounds in (("with_f", real), ("solver_only", cheap))}
    return {"batch": batch, "size": size, "threads": threads, "load_before": load, "load_after": os.getloadavg()[0],
            "f_ms": 1e3 * statistics.median(r["f"] for r in real["cdeq"]),
            "with_f": step_summary(real, "in_solve"), "with_f_bare": step_summary(real, "bare"),
            "solver_only": step_summary(cheap, "in_solve"), "per_round_ms": per_round}


def sweep_markdown(meta: dict, points: list[dict]) -> str:
    """The sweep's table: per-step ms of both Andersons and their ratio at every point."""
    lines = [f"# Anderson per-step cost across shapes: cdeq vs TorchDEQ ({meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, torchdeq {meta['torchdeq']}, commit {meta['commit']}, "
             f"seed {meta['seed']}, m = {meta['m']}, allocator thresholds: {meta['malloc']}, "
             f"load average (1 min) {meta['load_start']:.1f} at the start, {meta['load_end']:.1f} at the end", "",
             "f = TokenFFN (u + W2 gelu(W1 LN(z)) on tokens of width 64, hidden 128) on a state of B samples of "
             "N elements. Per-step ms = (32-NFE solve − the f calls it made, timed inside it) / 32, median over "
             f"{meta['repeats']} rounds; ratio = median of the per-round ratios cdeq / TorchDEQ. 'bare f' subtracts "
             "as many bare calls of f timed just before the solve instead (f's slow-down beside the solver is then "
             "charged to it). Solver-only: f replaced by the map z/2 + u. Target: ratio <= 0.4.", "",
             "| B | N | threads | f ms | cdeq ms | TorchDEQ ms | ratio | ratio (bare f) | solver-only cdeq ms | "
             "solver-only TorchDEQ ms | solver-only ratio | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        w, b, o = p["with_f"], p["with_f_bare"], p["solver_only"]
        lines.append(f"| {p['batch']} | {p['size']} | {p['threads']} | {p['f_ms']:.3f} | {w['cdeq_ms']:.3f} | "
                     f"{fmt(w.get('torchdeq_ms'), '.3f')} | {fmt(w.get('ratio'), '.2f')} | {fmt(b.get('ratio'), '.2f')} | "
                     f"{o['cdeq_ms']:.3f} | {fmt(o.get('torchdeq_ms'), '.3f')} | {fmt(o.get('ratio'), '.2f')} | "
                     f"{p['load_before']:.1f} |")
    met = [p for p in points if p["with_f"].get("ratio", 1.0) <= 0.4]
    lines += ["", f"Ratio <= 0.4 with f at {len(met)} of {len(points)} points."]
    return "\n".join(lines) + "\n"


def run_sweep(args: argparse.Namespace, device: torch.device, libs: list[str], meta: dict) -> None:
    """Measure every point of the sweep, print its table and write results/benchmarks/solvers-sweep.*"""
    if device.type == "cpu":  # the thread count is the sweep's, point by point
        meta["device"] = device_name(device).rsplit(", ", 1)[0]
        meta.pop("threads")
    meta.update(repeats=args.sweep_repeats, load_start=os.getloadavg()[0], batches=args.sweep_batches,
                sizes=args.sweep_sizes, thread_counts=args.sweep_threads, cap=args.sweep_cap)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / "solvers-sweep.json"
    shapes = sweep_shapes(args.sweep_batches, args.sweep_sizes, args.sweep_cap)
    if not shapes:
        raise SystemExit(f"--sweep: no (batch, size) pair within --sweep-cap {args.sweep_cap}")
    points = []
    for threads in args.sweep_threads:
        for batch, size in shapes:
            points.append(sweep_point(batch, size, threads, device, libs, args.sweep_repeats))
            print(f"done: B={batch} N={size} threads={threads}", file=sys.stderr)
            meta["load_end"] = os.getloadavg()[0]
            md = sweep_markdown(meta, points)  # written after every point: an interrupted sweep keeps its points
            atomic_write_json(out, {"meta": meta, "points": points})
            atomic_write_text(out.with_suffix(".md"), md)
    print(md)


def backward_rows(name: str, layer: nn.Module, u: Tensor, z0: Tensor, device: torch.device,
                  repeats: int) -> list[dict]:
    """Forward+backward time, peak memory and gradient error of each cdeq.DEQ backward, against
    implicit differentiation with tight forward and backward solves."""
    try:
        from cdeq.deq import DEQ
    except ImportError as e:  # reported as a gap in the table
        return [{"problem": name, "error": f"cdeq.DEQ unavailable: {e}"}]
    params = [p for p in layer.parameters()]

    def grads(deq: "DEQ") -> list[Tensor]:
        layer.zero_grad(set_to_none=True)
        z, _ = deq(lambda z: layer(z, u), z0)
        z.square().mean().backward()
        return [p.grad.detach().clone() for p in params]

    ref = grads(DEQ(f_solver="anderson", f_max_iter=200, f_tol=1e-7, backward="implicit", b_max_iter=200, b_tol=1e-7))
    ref_norm = torch.sqrt(sum(g.square().sum() for g in ref))
    configs = {
        "implicit": dict(f_solver="anderson", f_max_iter=30, f_tol=1e-4, backward="implicit"),
        "phantom": dict(f_solver="anderson", f_max_iter=30, f_tol=1e-4, backward="phantom", phantom_steps=5, tau=0.6),
        "unroll": dict(f_max_iter=30, f_tol=1e-4, backward="unroll"),
    }
    rows = []
    for kind, cfg in configs.items():
        deq = DEQ(**cfg)
        g = grads(deq)
        err = torch.sqrt(sum((a - b).square().sum() for a, b in zip(g, ref))) / ref_norm
        ts = [timed(lambda: grads(deq), device) for _ in range(repeats + 1)][1:]
        rows.append({"problem": name, "backward": kind, "fwd_bwd_ms": 1e3 * statistics.median(ts),
                     "peak_mem_mb": peak_memory_mb(torch.enable_grad()(lambda: grads(deq)), device),
                     "grad_rel_error": err.item()})
    return rows


def fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


def anderson_lines(rows: list[dict], floors: dict) -> list[str]:
    """The Anderson section: cdeq's per-step cost against TorchDEQ's, measured three ways, and the floor."""
    lines = ["", "## Anderson per-step cost: cdeq vs TorchDEQ, and the memory-traffic floor", "",
              "| problem | cdeq ms | TorchDEQ ms | ratio | ratio (min-based) | cdeq ms (f timed in solve) | "
              "TorchDEQ ms (f timed in solve) | ratio (f timed in solve) | solver-only cdeq ms | solver-only TorchDEQ ms | "
              "solver-only ratio | floor ms ((2m+5)·N bytes / bandwidth) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, fl in floors.items():
        c = next(r for r in rows if r["problem"] == name and r["library"] == "cdeq" and r["solver"] == "anderson")
        t = next((r for r in rows if r["problem"] == name and r["library"] == "torchdeq"
                  and r["solver"] == "anderson"), None)
        ratio = c["per_step_ms"] / t["per_step_ms"] if t else None
        ratio_min = c["per_step_ms_min"] / t["per_step_ms_min"] if t else None
        ratio_only = c["solver_only_ms"] / t["solver_only_ms"] if t else None
        c_in, t_in = c["per_step_in_solve_ms"], t and t["per_step_in_solve_ms"]
        ratio_in = c_in / t_in if c_in and t_in else None
        lines.append(f"| {name} | {c['per_step_ms']:.3f} | {fmt(t and t['per_step_ms'], '.3f')} | "
                     f"{fmt(ratio, '.2f')} | {fmt(ratio_min, '.2f')} | {fmt(c_in, '.3f')} | {fmt(t_in, '.3f')} | "
                     f"{fmt(ratio_in, '.2f')} | {c['solver_only_ms']:.3f} | "
                     f"{fmt(t and t['solver_only_ms'], '.3f')} | {fmt(ratio_only, '.2f')} | {fl['floor_ms']:.3f} |")
    return lines


def markdown(meta: dict, rows: list[dict], floors: dict, brows: list[dict]) -> str:
    lines = [f"# Solver benchmark ({meta['preset']} preset, {meta['device']})", "",
             f"`{meta['command']}` — torch {meta['torch']}, torchdeq {meta['torchdeq']}, commit {meta['commit']}, "
             f"seed {meta['seed']}, {meta['threads']} threads, bandwidth {meta['bandwidth_gbs']:.1f} GB/s, "
             f"allocator thresholds: {meta.get('malloc', 'glibc default')}", "",
             "Residual = mean relative residual ||f(z)-z||/||f(z)|| of the returned z after k NFE. "
             "Per-step cost = (32-NFE solve time − its f calls × f time) / 32, median over rounds of the "
             "difference within a pair (32 bare f calls timed just before each solve; f ms is their median); "
             "cdeq's solve makes one extra "
             "check call of f (counted in the f calls, not in NFE). 'f timed in solve': the solve's time less "
             "its f calls timed inside it (the solver's own ops beside f, without f's own slow-down beside the "
             "solver). max abs(z − z*): the largest entry of the "
             f"difference between the state a solve to relative tolerance {SAME_TOL:g} returns (capped at `--cap` NFE) "
             "and the layer's fixed point computed in float64.", "",
             "| problem | lib | solver | " + " | ".join(f"res@{k}" for k in NFES)
             + " | NFE→1e-3 | NFE→1e-5 | max abs(z − z*) | f ms | solve32 ms | overhead | per-step ms | per-step ms (min) |",
             "|" + "---|" * (3 + len(NFES) + 8)]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['library']} | {r['solver']} | "
                     + " | ".join(f"{r['residual_after'][k]:.1e}" for k in NFES)
                     + f" | {fmt(r['nfe_to_0.001'], 'd')} | {fmt(r['nfe_to_1e-05'], 'd')} | {r['max_diff_to_ref']:.1e} | {r['f_ms']:.2f} | "
                     f"{r['solve32_ms']:.1f} | {r['overhead']:.0%} | {r['per_step_ms']:.3f} | {r['per_step_ms_min']:.3f} |")
    lines += anderson_lines(rows, floors)
    lines += ["", "## Backward passes (cdeq.DEQ)", ""]
    if any("error" in b for b in brows):
        lines.append("Not measured: " + "; ".join(b["error"] for b in brows if "error" in b))
    else:
        lines += ["| problem | backward | fwd+bwd ms | peak MiB | grad rel. error |", "|---|---|---|---|---|"]
        lines += [f"| {b['problem']} | {b['backward']} | {b['fwd_bwd_ms']:.1f} | {b['peak_mem_mb']:.1f} | "
                  f"{b['grad_rel_error']:.1e} |" for b in brows]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--problems", nargs="+", choices=sorted(PRESETS["cpu"]), default=["mlp", "conv", "transformer"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--cap", type=int, default=200, help="NFE budget when measuring the NFE to reach a tolerance")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc allocator thresholds (cdeq.runtime.tune_cpu_allocator) for both libraries, or glibc's defaults")
    p.add_argument("--sweep", action="store_true", help="Anderson's per-step cost over shapes and thread counts instead")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=list(SWEEP_BATCHES))
    p.add_argument("--sweep-sizes", type=int, nargs="+", default=list(SWEEP_SIZES), help="per-sample state sizes")
    p.add_argument("--sweep-threads", type=int, nargs="+", default=list(SWEEP_THREADS))
    p.add_argument("--sweep-cap", type=int, default=SWEEP_CAP, help="most elements in one state (batch x size)")
    p.add_argument("--sweep-repeats", type=int, default=4)
    p.add_argument("--out", default=None,
                   help="JSON path (default results/benchmarks/solvers-<preset>.json, or solvers-sweep.json)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    tuned = args.malloc == "tuned" and tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchdeq

        libs, tdq_version = ["cdeq", "torchdeq"], getattr(torchdeq, "__version__", "0.1.0")
    except ImportError:
        libs, tdq_version = ["cdeq"], None
    meta = {"command": " ".join(["python", "benchmarks/solvers.py", *(argv if argv is not None else sys.argv[1:])]),
            "preset": args.preset, "device": device_name(device), "torch": torch.__version__, "torchdeq": tdq_version,
            "commit": git_commit(), "seed": 0, "threads": torch.get_num_threads(), "m": M,
            "malloc": "tuned" if tuned else "glibc default"}
    if args.sweep:
        run_sweep(args, device, libs, meta)
    else:
        run_problems(args, device, libs, meta)


def run_problems(args: argparse.Namespace, device: torch.device, libs: list[str], meta: dict) -> None:
    """The three problems' table: residuals, NFE to tolerance, timings, Anderson floor, backward passes."""
    bw = bandwidth(device)
    meta["bandwidth_gbs"] = bw / 1e9
    rows, floors, brows = [], {}, []
    for name in args.problems:
        layer, u, z0 = build(name, PRESETS[args.preset][name], device)
        f = lambda z, layer=layer, u=u: layer(z, u)  # noqa: E731
        rows += solver_rows(name, f, z0, reference_fixed_point(layer, u, z0), device, libs, args.repeats, args.cap)
        floors[name] = anderson_floor(z0, bw)
        if not args.no_backward:
            brows += backward_rows(name, layer, u, z0, device, max(3, args.repeats // 2))
        print(f"done: {name}", file=sys.stderr)
    md = markdown(meta, rows, floors, brows)
    print(md)
    out = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"solvers-{args.preset}.json"
    atomic_write_json(out, {"meta": meta, "solvers": rows, "anderson_floor": floors, "backward": brows})
    atomic_write_text(out.with_suffix(".md"), md)


if __name__ == "__main__":
    main()
