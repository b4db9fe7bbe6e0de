"""The one place that knows about ranks: torch.distributed as torchrun starts it.

``torchrun --nproc_per_node=N -m cdeq run TASK`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
the rendezvous; :func:`init` joins the process group (gloo on CPU, nccl on CUDA, where the device
is ``cuda:LOCAL_RANK``). Everything else asks this module: the rank, whether it is the main rank
(the one that writes files), a barrier, exact sum-reductions, and which rows of a global batch are
this rank's. With one process (no torchrun) every function is a no-op and cdeq runs as before.

Example:
    >>> init("cpu")          # one process: nothing to join
    device(type='cpu')
    >>> rank(), world_size(), is_main()
    (0, 1, True)
    >>> local_rows([3, 5, 8, 9])
    [3, 5, 8, 9]
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def init(device: str) -> torch.device:
    """Join the process group torchrun describes (if any) and return this rank's device."""
    dev = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=float(os.environ.get("CDEQ_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return dev


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the rank that writes checkpoints, tables and figures (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on the main rank only (one copy of every line, not one per rank)."""
    if is_main():
        print(*args, **kwargs)


def sum_all(values: Sequence[float]) -> list[float]:
    """The sums over ranks of ``values`` (float64, the same on every rank): counts and sums reduce
    exactly, so a metric computed from them equals the one-process figure."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects: random states, summaries)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """The main rank's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_positions(n: int) -> list[int]:
    """This rank's strided share ``[rank, rank + world, ...]`` of the positions 0..n-1 of a global
    batch: every rank draws the same global batch from the step's seeded generator and keeps its slice."""
    return list(range(rank(), n, world_size()))


def local_rows(rows: Sequence[int]) -> list[int]:
    """The rows of a global batch at this rank's :func:`local_positions`."""
    return [rows[i] for i in local_positions(len(rows))]


def local_batch(x: Any, y: Any) -> tuple[Any, Any]:
    """This rank's strided share of a batch ``(x, y)`` along dimension 0; a batch that cannot be split
    (one graph: x ``(1, N, F)``) is used whole by every rank, so their averaged gradient is the
    one-process gradient."""
    n = (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
    if not active() or n < world_size():
        return x, y
    r, w = rank(), world_size()
    take = (lambda t: t[r::w])  # noqa: E731
    xs = tuple(take(p) for p in x) if isinstance(x, (tuple, list)) else take(x)
    return xs, (take(y) if isinstance(y, torch.Tensor) and y.shape[:1] == (n,) else y)


def wrap(module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks, else itself.

    find_unused_parameters=True: an objective may hold trainable parameters its loss does not use
    in every step (the student's copy of the teacher includes the readout it never calls, since
    it reads out through the frozen teacher; an initialiser is unused when no drawn k needs z_0),
    and DDP must not wait for their gradients. static_graph=False: the graph changes between steps
    (per-sample freezing in the solver, the local term on or off with the drawn k). The implicit
    backward's solver calls autograd.grad on z only, so DDP's gradient hooks fire once per parameter.
    """
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, static_graph=False)
