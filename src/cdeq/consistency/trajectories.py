"""Teacher trajectories for consistency distillation (Section 3.2, Appendix B.2, Algorithm 4).

:func:`sample_trajectories` runs the frozen teacher's solver from a fixed z_0 for a fixed budget
of K steps and keeps every state z_0..z_K (z_K is the distillation target, z* in Eq. 9), the
teacher's relative residual of each state, the inputs and the labels. States are written to disk
in shards, one per input batch, as safetensors files (optionally float16/bfloat16), each written
to a temporary name and renamed, so a killed run leaves only complete shards and a rerun resumes.

Stores: ``store="full"`` keeps every state; ``store="subset"`` keeps z_0, z_K and ``keep`` further
steps per item, drawn once from the seed and the item's position (:func:`subset_steps`), with their
indices; ``store="target"`` keeps z_K alone, for distillation with the teacher in the loop
(:class:`~cdeq.consistency.store.OnlineTeacher`); reading a step that was not kept is an error. The distillation step then draws k among the
kept steps and uses the nearest kept step below it for k-1 (:meth:`Trajectories.draw_steps`).
Before sampling, the store's size is printed and a store larger than the free disk space refused.

Augmentation (Eq. 13): the raw states are stored unchanged; the replacement mask of Algorithm 4
(z_k <- z_K with probability p_aug for k in [k_min, K - k_tail]) is drawn once at write time,
per trajectory, and stored beside them. Reads apply it by default (``augmented=True``) and can
return the raw states (``augmented=False``).

Integrity: the manifest (``meta.json``) keys the cache by the teacher, the settings and a hash of
every input batch in order, and records each shard's SHA-256. A complete cache is reused only for
the same inputs in the same order (other inputs are an error), a shard whose digest differs is
named and sampled again, and reads verify each shard before using it. Non-finite inputs or teacher
states stop sampling with the batch named, so a cache never holds NaN targets.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import errno
import hashlib
import json
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from cdeq import distributed
from cdeq.config import check_int
from cdeq.consistency.store import (CACHE_KINDS, MANIFEST_OVERHEAD_BYTES, SHARD_OVERHEAD_BYTES, human_bytes,
                                    kept_states, store_bytes)
from cdeq.io import ArtefactWarning, CorruptArtefactError, atomic_write_bytes, atomic_write_json, sha256_file
from cdeq.precision import amp_layers, check_amp
from cdeq.state import State, StateLayout, as_tuple, batch_items, map_state

FORMAT_VERSION = 2  # 2: input keys and shard digests in the manifest
SUBSET_FORMAT = 3  # 3: a subset or target store (kept steps per item); older readers refuse it
READABLE_FORMATS = (1, 2, 3)
META_FILE = "meta.json"
STORAGE_DTYPES = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Shards up to this size are held in memory once read (an LRU of MEMORY_SHARDS); larger ones are
# read state by state from the memory-mapped file.
MEMORY_SHARD_BYTES = 64 << 20
MEMORY_SHARDS = 8
# Settings that must agree between a cache on disk and the request that reads or extends it.
_CHECKED_KEYS = ("teacher_hash", "solver", "solver_options", "steps", "z0", "p_aug", "k_min",
                 "k_tail", "dtype", "seed", "time_map", "store", "keep", "amp")
# What a manifest written before a setting existed means by its absence.
_SETTING_DEFAULTS = {"store": "full", "keep": None, "amp": None}


def module_hash(module: nn.Module) -> str:
    """SHA-256 of a module's weights: its state dict plus non-persistent buffers (e.g. a graph).

    Names, dtypes, shapes and bytes all count, so a different checkpoint gives a different hash.
    """
    h = hashlib.sha256()
    tensors = dict(module.state_dict())
    for name, buf in module.named_buffers():
        tensors.setdefault(name, buf)
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, Tensor):
            continue
        if t.layout != torch.strided:  # sparse COO/CSR/...: hash the coalesced COO form
            t = t.to_sparse_coo().coalesce()
            parts = [t.indices(), t.values()]
        else:
            parts = [t]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        for p in parts:
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensor_hash(x: Any) -> str:
    h = hashlib.sha256()
    for t in as_tuple(x):
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _split_batch(batch: Any, index: int) -> tuple[Any, Optional[Tensor]]:
    """A loader batch as ``(x, y)``: a tensor is ``x``; a 2-sequence is ``(x, y)`` (y may be None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(f"inputs: batch {index}: labels must be a tensor or None, got {type(y).__name__}")
        for part in as_tuple(x):
            if not isinstance(part, Tensor):
                raise TypeError(f"inputs: batch {index}: x must be a tensor or a tuple of tensors")
        return x, y
    raise TypeError(
        f"inputs: batch {index}: expected x (a tensor) or (x, y) with x a tensor or tuple of tensors; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + ". Yield (x, None) for a tuple input without labels."
    )


def _augmentation_mask(batch: int, steps: int, p_aug: float, k_min: int, k_tail: int,
                       generator: torch.Generator) -> Tensor:
    """Algorithm 4, lines 7-12: True where z_k is replaced by z_K, for k in [k_min, K - k_tail]."""
    mask = torch.zeros(batch, steps + 1, dtype=torch.bool)
    hi = steps - k_tail
    if p_aug > 0 and hi >= k_min:
        u = torch.rand(batch, hi - k_min + 1, generator=generator)
        mask[:, k_min:hi + 1] = u < p_aug
    return mask


def _check_sampling_args(steps: int, z0: str, p_aug: float, k_min: int, k_tail: int, dtype: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1 (teacher solver steps K), got {steps!r}")
    if z0 not in ("zeros", "gaussian"):
        raise ValueError(f"z0: expected 'zeros' or 'gaussian', got {z0!r}")
    if not (isinstance(p_aug, (int, float)) and 0.0 <= p_aug <= 1.0):
        raise ValueError(f"p_aug: expected a probability in [0, 1], got {p_aug!r}")
    if isinstance(k_min, bool) or not isinstance(k_min, int) or k_min < 1:
        raise ValueError(f"k_min: expected an int >= 1 (z_0 is never replaced), got {k_min!r}")
    if isinstance(k_tail, bool) or not isinstance(k_tail, int) or k_tail < 1:
        raise ValueError(f"k_tail: expected an int >= 1 (z_K is the target), got {k_tail!r}")
    if dtype not in STORAGE_DTYPES and dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"dtype: expected None, 'float16', 'bfloat16' or a torch dtype of those, got {dtype!r}")


def _dtype_name(dtype: Any) -> Optional[str]:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return {v: k for k, v in STORAGE_DTYPES.items() if v is not None}[dtype]


class Trajectories:
    """A cache of teacher trajectories on disk, read lazily shard by shard.

    Each item (one row of an input batch) holds its states z_0..z_K, the input x, the label y (if
    any), the teacher's relative residual of every state and its augmentation mask. Use
    :meth:`open` to read an existing cache; :func:`sample_trajectories` returns one.
    """

    def __init__(self, root: str | Path, meta: dict, _tmp: Optional[tempfile.TemporaryDirectory] = None) -> None:
        self.root = Path(root)
        self.meta = meta
        self._tmp = _tmp  # keeps a temporary cache alive as long as this object
        self._handles: dict[int, Any] = {}
        self._memory: "OrderedDict[int, dict[str, Tensor]]" = OrderedDict()
        self.layout_shapes = [tuple(s) for s in meta["state_shapes"]]
        self.is_tuple: bool = meta["state_is_tuple"]
        self._verified: set[int] = set()

    @classmethod
    def open(cls, root: str | Path, *, teacher: Optional[nn.Module] = None, verify: bool = True) -> "Trajectories":
        """Open a complete cache; with ``teacher``, check that it was sampled from that teacher.

        ``verify`` checks every shard's SHA-256 now (else each is checked when first read); a
        damaged shard raises :class:`~cdeq.io.CorruptArtefactError` naming it.
        """
        root = Path(root)
        if not (root / META_FILE).exists():
            raise FileNotFoundError(f"root: no trajectory cache at {root} ({META_FILE} missing)")
        meta = _read_meta(root)
        if meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"root: cache format {meta.get('format')} at {root}, expected one of {READABLE_FORMATS}")
        if not meta.get("complete"):
            raise ValueError(f"root: the cache at {root} is incomplete (sampling was interrupted); "
                             "rerun sample_trajectories with the same arguments to resume it")
        if "shard_sha256" not in meta:
            warnings.warn(f"root: the cache at {root} was written by an older cdeq without shard digests; "
                          "its shards are read unverified", ArtefactWarning, stacklevel=2)
        traj = cls(root, meta)
        if teacher is not None:
            traj.check_teacher(teacher)
        if verify:
            bad = traj.bad_shards()
            if bad:
                raise CorruptArtefactError(traj._shard_path(bad[0]), _shard_damage(bad))
        return traj

    def bad_shards(self) -> list[int]:
        """The shards whose SHA-256 differs from the manifest's (or that are missing)."""
        return [shard for shard in range(self.num_shards) if not self._shard_intact(shard)]

    def _shard_intact(self, shard: int) -> bool:
        """Check a shard's digest once; a cache without digests (format 1) counts as intact."""
        digests = self.meta.get("shard_sha256")
        if shard not in self._verified:
            path = self._shard_path(shard)
            if digests is not None and not (path.is_file() and sha256_file(path) == digests[shard]):
                return False
            self._verified.add(shard)
        return True

    # ----------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """K, the number of teacher solver steps; states are z_0..z_K."""
        return int(self.meta["steps"])

    @property
    def store(self) -> str:
        """``"full"`` (every step 0..K), ``"subset"`` (z_0, z_K and ``keep`` more per item) or
        ``"target"`` (z_K alone)."""
        return self.meta.get("store", "full")

    @property
    def keep(self) -> Optional[int]:
        """For a ``subset`` store, the number of steps kept per item besides z_0 and z_K."""
        return self.meta.get("keep")

    def kept_steps(self, shard: int, rows: Optional[Sequence[int]] = None) -> Tensor:
        """The steps stored per item, ``(rows, n)`` int64 sorted ascending (n = K + 1 for ``full``,
        keep + 2 for ``subset``, starting at 0; 1 for ``target``); always ends at K."""
        rows = self._rows(shard, rows)
        if self.store == "full":
            return torch.arange(self.steps + 1).expand(len(rows), -1).clone()
        return self._take("kept", shard, rows)

    def draw_steps(self, shard: int, rows: Sequence[int], generator: torch.Generator, *,
                   include_k0: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 2, line 3, over the kept steps: per row k, uniform among the kept steps (>= 1
        without ``include_k0``), with the nearest kept steps below it standing for k-1 and k-2
        (clamped at 0). For a ``full`` store this is k ~ U{0..K} with k-1 and k-2 exactly."""
        if self.store == "target":
            raise ValueError(f"trajectories: the cache at {self.root} holds z_K alone (store 'target'); "
                             "draw steps from a full or subset store, or distil with online=OnlineTeacher(...)")
        kept = self.kept_steps(shard, rows)
        j = torch.randint(0 if include_k0 else 1, kept.shape[1], (kept.shape[0],), generator=generator)
        rows_idx = torch.arange(kept.shape[0])
        return tuple(kept[rows_idx, (j - d).clamp_min(0)] for d in (0, 1, 2))

    @property
    def shard_sizes(self) -> list[int]:
        return list(self.meta["shard_sizes"])

    @property
    def num_shards(self) -> int:
        return len(self.meta["shard_sizes"])

    def __len__(self) -> int:
        return sum(self.meta["shard_sizes"])

    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise unless this cache was sampled from ``teacher`` (same weights)."""
        got = module_hash(teacher)
        if got != self.meta["teacher_hash"]:
            raise ValueError(
                f"teacher: the trajectory cache at {self.root} was sampled from another teacher "
                f"(hash {self.meta['teacher_hash'][:12]}..., this teacher {got[:12]}...)"
            )

    def _shard_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:06d}.safetensors"

    def _handle(self, shard: int) -> Any:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard: expected 0 <= shard < {self.num_shards}, got {shard}")
        if shard not in self._handles:
            if not self._shard_intact(shard):
                raise CorruptArtefactError(self._shard_path(shard), _shard_damage([shard]))
            self._handles[shard] = safe_open(str(self._shard_path(shard)), framework="pt")
        return self._handles[shard]

    def _in_memory(self, shard: int) -> Optional[dict[str, Tensor]]:
        """The whole shard if it is small enough to hold (LRU of ``MEMORY_SHARDS`` shards), else None."""
        if shard in self._memory:
            self._memory.move_to_end(shard)
            return self._memory[shard]
        h = self._handle(shard)
        if self._shard_path(shard).stat().st_size > MEMORY_SHARD_BYTES:
            return None
        self._memory[shard] = {name: h.get_tensor(name) for name in h.keys()}
        if len(self._memory) > MEMORY_SHARDS:
            self._memory.popitem(last=False)
        return self._memory[shard]

    def _rows(self, shard: int, rows: Optional[Sequence[int]]) -> list[int]:
        size = self.shard_sizes[shard]
        if rows is None:
            return list(range(size))
        rows = [int(r) for r in rows]
        if any(not 0 <= r < size for r in rows):
            raise IndexError(f"rows: shard {shard} holds rows 0..{size - 1}, got {rows}")
        return rows

    def _take(self, name: str, shard: int, rows: list[int]) -> Tensor:
        """Rows of a per-item tensor; a tensor whose first dim is not the batch (e.g. the labels
        (N,) of a one-graph batch) is returned whole and only when every row is asked for."""
        h = self._handle(shard)
        size = self.shard_sizes[shard]
        mem = self._in_memory(shard)
        if rows == list(range(size)):
            return h.get_tensor(name) if mem is None else mem[name]
        shape = h.get_slice(name).get_shape() if mem is None else list(mem[name].shape)
        if shape[0] != size:
            raise ValueError(f"rows: {name!r} of shard {shard} is not batched per item "
                             f"(shape {shape}, {size} items); read all rows of this shard")
        if mem is not None:
            return mem[name][torch.tensor(rows)]
        sl = h.get_slice(name)
        return torch.stack([sl[r] for r in rows])

    def states(self, shard: int, rows: Optional[Sequence[int]], ks: Sequence[int] | int, *,
               augmented: bool = True, dtype: torch.dtype = torch.float32) -> State:
        """States z_{k_i} of the given rows (one k per row, or one k for all), as a batched state.

        Only those states are read from disk. ``augmented`` applies the stored Eq. 13 mask. In a
        ``subset`` store a step that was not kept for its item is a ValueError naming both.
        """
        rows = self._rows(shard, rows)
        K = self.steps
        ks = [int(ks)] * len(rows) if isinstance(ks, int) else [int(k) for k in ks]
        if len(ks) != len(rows):
            raise ValueError(f"ks: expected one step per row ({len(rows)}), got {len(ks)}")
        if any(not 0 <= k <= K for k in ks):
            raise ValueError(f"ks: steps must lie in [0, K={K}], got {ks}")
        r_idx, k_idx = torch.tensor(rows, dtype=torch.long), torch.tensor(ks, dtype=torch.long)
        kept = self._kept_for(shard, rows, k_idx)
        if augmented:
            aug = self._take("aug", shard, rows)
            k_idx = torch.where(aug[torch.arange(len(rows)), k_idx], torch.full_like(k_idx, K), k_idx)
        if kept is not None:  # a subset store: the column of each step among the item's kept ones
            k_idx = (kept == k_idx.unsqueeze(1)).long().argmax(dim=1)
        mem = self._in_memory(shard)
        parts = []
        for i in range(len(self.layout_shapes)):
            if mem is not None:
                parts.append(mem[f"z.{i}"][r_idx, k_idx].to(dtype))
            else:
                sl = self._handle(shard).get_slice(f"z.{i}")
                parts.append(torch.stack([sl[r, k] for r, k in zip(rows, k_idx.tolist())]).to(dtype))
        return tuple(parts) if self.is_tuple else parts[0]

    def _kept_for(self, shard: int, rows: list[int], ks: Tensor) -> Optional[Tensor]:
        """A subset or target store's kept steps of these rows, after checking each asked-for step was kept
        (None for a full store, which keeps every step)."""
        if self.store == "full":
            return None
        kept = self._take("kept", shard, rows)
        missing = torch.nonzero(~(kept == ks.unsqueeze(1)).any(dim=1)).flatten().tolist()
        if missing:
            i = missing[0]
            raise ValueError(f"ks: step {int(ks[i])} of item (shard {shard}, row {rows[i]}) was not kept by this "
                             f"{self.store} store (kept steps {kept[i].tolist()}); {len(missing)} row(s) ask for a step "
                             "not kept. Draw steps among Trajectories.kept_steps (see draw_steps)")
        return kept

    def inputs(self, shard: int, rows: Optional[Sequence[int]] = None) -> Any:
        """The inputs x of the given rows (a tensor or tuple of tensors, as the loader gave them)."""
        rows = self._rows(shard, rows)
        n = self.meta["x_parts"]
        if n == 0:
            return self._take("x", shard, rows)
        return tuple(self._take(f"x.{i}", shard, rows) for i in range(n))

    def labels(self, shard: int, rows: Optional[Sequence[int]] = None) -> Optional[Tensor]:
        """The labels of the given rows, or None when the loader gave none."""
        if not self.meta["has_labels"]:
            return None
        return self._take("y", shard, self._rows(shard, rows))

    def residuals(self, shard: int, rows: Optional[Sequence[int]] = None) -> Tensor:
        """Teacher's relative residuals ||f(z_k)-z_k|| / ||f(z_k)|| of the raw states, ``(rows, K+1)``."""
        return self._take("residual", shard, self._rows(shard, rows))

    def augmentation_mask(self, shard: int, rows: Optional[Sequence[int]] = None) -> Tensor:
        """The stored Eq. 13 mask, ``(rows, K+1)`` bool: True where z_k reads as z_K."""
        return self._take("aug", shard, self._rows(shard, rows))

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[int, list[int]]:
        """A random shard (weighted by its size) and up to ``batch_size`` distinct rows of it."""
        sizes = torch.tensor(self.shard_sizes, dtype=torch.float64)
        shard = int(torch.multinomial(sizes, 1, generator=generator))
        n = min(batch_size, self.shard_sizes[shard])
        rows = torch.randperm(self.shard_sizes[shard], generator=generator)[:n].sort().values.tolist()
        return shard, rows

    def chunks(self, batch_size: int) -> Iterator[tuple[int, list[int]]]:
        """Every item once, in order, as ``(shard, rows)`` chunks of at most ``batch_size`` rows."""
        for shard, size in enumerate(self.shard_sizes):
            for lo in range(0, size, batch_size):
                yield shard, list(range(lo, min(size, lo + batch_size)))

    def mean_residuals(self) -> list[float]:
        """The teacher's mean relative residual at each step k = 0..K over all items (for reports)."""
        total = torch.zeros(self.steps + 1, dtype=torch.float64)
        for shard in range(self.num_shards):
            total += self.residuals(shard).double().sum(dim=0)
        return (total / max(len(self), 1)).tolist()


def _read_meta(root: Path) -> dict:
    """The manifest of the cache at ``root``; unreadable JSON raises CorruptArtefactError."""
    path = root / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtefactError(path, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CorruptArtefactError(path, f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _shard_damage(bad: list[int]) -> str:
    others = f"; {len(bad) - 1} more shard(s) damaged: {bad[1:]}" if len(bad) > 1 else ""
    return (f"SHA-256 differs from the one in {META_FILE}, or the file is missing{others}; rerun "
            f"sample_trajectories with the same inputs and settings to sample the damaged shards again")


@dataclass(frozen=True)
class Storage:
    """How a cache stores the teacher's states: ``kind`` ``"full"`` (z_0..z_K), ``"subset"`` (z_0,
    z_K and ``keep`` steps drawn per item by :func:`subset_steps`) or ``"target"`` (z_K alone, beside
    the ``online`` strategy's :class:`~cdeq.consistency.store.OnlineTeacher`), their ``dtype`` (None: the teacher's,
    ``"float16"`` or ``"bfloat16"``), and ``amp`` (``"bf16"``: f under bf16 autocast while
    sampling; the solver's small system stays float32)."""

    kind: str = "full"
    keep: Optional[int] = None
    dtype: Any = None
    amp: Optional[str] = None


def sample_trajectories(teacher: nn.Module, inputs: Iterable[Any], *, steps: int, solver: str = "anderson",
                        solver_options: Optional[dict] = None, z0: str = "zeros", p_aug: float = 0.0, k_min: int = 1,
                        k_tail: int = 2, cache_dir: Optional[str | Path] = None, seed: int = 0,
                        storage: Optional[Storage] = None, items: Optional[int] = None) -> Trajectories:
    """Run the teacher's solver for ``steps`` = K steps per input batch and cache z_0..z_K (Alg. 4).

    Args:
        teacher: a :class:`~cdeq.models.DEQModel`; a frozen copy in eval mode is solved under
            no_grad (``tol=0``, a fixed budget), so the teacher itself is never changed.
        inputs: an iterable of batches ``x`` or ``(x, y)``; x a tensor or tuple of tensors. The
            cache is keyed by the batches in order (a shuffling DataLoader is warned about).
        solver, solver_options: the :func:`cdeq.solve` solver and its options (e.g. ``m``, ``tau``).
        z0: ``"zeros"`` (the teacher's ``init_state``, the paper's fixed z_0) or ``"gaussian"``
            (z_0 ~ N(0, I), Algorithm 4 line 1; seeded per batch).
        p_aug, k_min, k_tail: Eq. 13: z_k reads as z_K with probability ``p_aug`` for
            k in [k_min, K - k_tail]; the mask is drawn here, the raw states are kept.
        cache_dir: the cache folder; None uses a temporary folder removed with the returned object.
            A cache with the same settings and inputs is resumed or reused, any other is a
            ValueError; damaged shards are named (:class:`~cdeq.io.ArtefactWarning`) and resampled.
        seed: seeds the Gaussian z_0, the augmentation masks and a subset store's kept steps.
        storage: what is stored and how (:class:`Storage`: full or subset, dtype, bf16 autocast).
        items: how many items ``inputs`` gives, for the size estimate where it cannot be read from
            ``inputs`` (a generator); None reads it from a DataLoader or a list of batches.

    Prints the store's size (:func:`~cdeq.consistency.store.store_bytes`) before the first shard is
    sampled and raises OSError (ENOSPC) naming the bytes needed and free when it does not fit.
    Raises ValueError naming the batch when its inputs or the teacher's states are not finite.
    """
    storage = Storage() if storage is None else storage
    if not isinstance(storage, Storage):
        raise TypeError(f"storage: expected a Storage, got {type(storage).__name__}")
    _check_sampling_args(steps, z0, p_aug, k_min, k_tail, storage.dtype)
    _check_store(storage.kind, steps, storage.keep)
    if items is not None:
        check_int("items", items, 1)
    _warn_if_shuffled(inputs)
    root, tmp = _cache_root(cache_dir)
    settings = {"teacher_hash": module_hash(teacher), "solver": solver,
                "solver_options": json.loads(json.dumps(dict(solver_options or {}))), "steps": steps, "z0": z0,
                "p_aug": float(p_aug), "k_min": k_min, "k_tail": k_tail, "seed": seed,
                **_storage_settings(storage, teacher)}
    store_dtype = storage.dtype if isinstance(storage.dtype, torch.dtype) else STORAGE_DTYPES[storage.dtype]
    sampling = _Sampling(teacher, root, settings, _resumable_meta(root, settings), store_dtype,
                         _planned_items(inputs) if items is None else items)
    for index, batch in enumerate(inputs):
        sampling.add(index, batch)
    traj = Trajectories(root, sampling.finish(), tmp)
    traj._verified.update(range(traj.num_shards))  # each shard was just written or checked
    return traj


def _storage_settings(storage: Storage, teacher: nn.Module) -> dict:
    """The cache key's part set by ``storage``: the format, what is kept, in which dtype, under which autocast."""
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    return {"format": FORMAT_VERSION if storage.kind == "full" else SUBSET_FORMAT, "dtype": _dtype_name(storage.dtype),
            "time_map": "state k = teacher iterate after k calls of f; t_k by the student's Eq. 6",
            "store": storage.kind, "keep": storage.keep, "amp": check_amp(storage.amp, device)}


def _check_store(store: str, steps: int, keep: Optional[int]) -> None:
    if store not in CACHE_KINDS:
        raise ValueError(f"store: expected one of {CACHE_KINDS} (for 'online' use cdeq.consistency.store."
                         f"OnlineTeacher, beside a 'target' store or none), got {store!r}")
    kept_states(store, steps, keep)


def _cache_root(cache_dir: Optional[str | Path]) -> tuple[Path, Optional[tempfile.TemporaryDirectory]]:
    """The cache folder, created; None gives a temporary one (returned too, to keep it alive)."""
    tmp = tempfile.TemporaryDirectory(prefix="cdeq-traj-") if cache_dir is None else None
    root = Path(tmp.name if tmp is not None else cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    return root, tmp


def _warn_if_shuffled(inputs: Iterable[Any]) -> None:
    """Warn when ``inputs`` is a DataLoader drawing a random order (trajectories are keyed by order)."""
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(inputs, DataLoader):
        return
    if isinstance(inputs.sampler, RandomSampler) or isinstance(getattr(inputs.batch_sampler, "sampler", None),
                                                                RandomSampler):
        warnings.warn("inputs: the DataLoader shuffles (RandomSampler); trajectories are keyed by the inputs "
                      "and their order, so a rerun in another order can neither resume nor reuse this cache "
                      "(use shuffle=False, or a fixed, seeded order)", UserWarning, stacklevel=3)


def _resumable_meta(root: Path, settings: dict) -> Optional[dict]:
    """The manifest of an existing cache made with ``settings`` (None: start afresh). Other
    settings are an error; an unreadable manifest or an older format is sampled again."""
    if not (root / META_FILE).exists():
        return None
    try:
        old = _read_meta(root)
    except CorruptArtefactError as e:
        warnings.warn(f"{e}; sampling the cache again", ArtefactWarning, stacklevel=3)
        return None
    diff = [k for k in _CHECKED_KEYS if old.get(k, _SETTING_DEFAULTS.get(k)) != settings[k]]
    if diff:
        detail = ", ".join(f"{k}: cache {old.get(k, _SETTING_DEFAULTS.get(k))!r} vs requested {settings[k]!r}"
                           for k in diff)
        raise ValueError(f"cache_dir: the trajectory cache at {root} was sampled with other settings ({detail}); "
                         "use another cache_dir or delete this one")
    if old.get("format") != settings["format"] or "batch_hashes" not in old:
        warnings.warn(f"cache_dir: the trajectory cache at {root} was written by an older cdeq (format "
                      f"{old.get('format')}) without input keys or shard digests; sampling it again",
                      UserWarning, stacklevel=3)
        return None
    return old


def _batch_hash(x: Any, y: Optional[Tensor]) -> str:
    """The key of one input batch: its inputs and labels (dtypes, shapes and bytes)."""
    return hashlib.sha256(f"x:{_tensor_hash(x)}|y:{'none' if y is None else _tensor_hash(y)}".encode()).hexdigest()


_LAYOUT_KEYS = ("state_shapes", "state_is_tuple", "x_parts", "has_labels")


class _Sampling:
    """One pass of :func:`sample_trajectories` over the inputs: each batch's shard is reused when
    the manifest records the same batch at that position and the shard's digest still matches,
    and is sampled otherwise. Progress goes to the manifest after every new shard."""

    def __init__(self, teacher: nn.Module, root: Path, settings: dict, old: Optional[dict],
                 store_dtype: Optional[torch.dtype], planned_items: Optional[int]) -> None:
        self.teacher, self.root, self.settings, self.old = teacher, root, settings, old
        self.store_dtype, self.planned_items = store_dtype, planned_items
        self._item_size: Optional[tuple[list, Any, int]] = None  # state shapes, dtype, input bytes per item
        self.complete = bool(old and old.get("complete"))
        self.recorded = len(old["batch_hashes"]) if old else 0
        self.layout: Optional[dict] = {k: old[k] for k in _LAYOUT_KEYS} if old and "state_shapes" in old else None
        self.record: dict[str, list] = {"batch_hashes": [], "shard_sha256": [], "shard_sizes": []}
        self._model: Optional[nn.Module] = None
        if old is None:
            self._write_meta(complete=False)

    def add(self, index: int, batch: Any) -> None:
        x, y = _split_batch(batch, index)
        _check_finite_inputs(x, index)
        key = _batch_hash(x, y)
        path = self.root / f"shard-{index:06d}.safetensors"
        if self.complete and index >= self.recorded:
            raise ValueError(f"inputs: the trajectory cache at {self.root} holds {self.recorded} batches and these "
                             f"inputs give more; they are not the inputs it was sampled from (use another "
                             "cache_dir or delete this one)")
        if index < self.recorded:
            if self.old["batch_hashes"][index] != key:
                raise ValueError(f"inputs: batch {index} differs from the one cached in {path.name} at {self.root}: "
                                 "the inputs or their order changed since it was sampled (use a deterministic "
                                 "loader, e.g. shuffle=False, or another cache_dir)")
            digest = self.old["shard_sha256"][index]
            if path.is_file() and sha256_file(path) == digest:
                self._append(key, digest, self.old["shard_sizes"][index])
                return
            warnings.warn(f"{path}: SHA-256 differs from the one in {META_FILE}, or the file is missing; "
                          f"sampling batch {index} again", ArtefactWarning, stacklevel=3)
        self._check_space(x, y)
        first_item = sum(self.record["shard_sizes"])
        lay, digest = _write_shard(self.model(), x, y, index, path, key, self.settings, self.store_dtype, first_item)
        if self.layout is not None and (lay["state_shapes"], lay["state_is_tuple"]) != (
                self.layout["state_shapes"], self.layout["state_is_tuple"]):
            raise ValueError(f"inputs: batch {index} gives states of shape {lay['state_shapes']} (per item), "
                             f"batch 0 gave {self.layout['state_shapes']}; every batch must give the same shapes")
        self.layout = self.layout or {k: lay[k] for k in _LAYOUT_KEYS}
        self._append(key, digest, lay["items"])
        if not self.complete:
            self._write_meta(complete=False)

    def _size(self, items: int, shards: int) -> int:
        """Bytes on disk of ``items`` items in ``shards`` shards (the estimate plus the file overheads)."""
        shapes, dtype, input_bytes = self._item_size
        s = self.settings
        return store_bytes(shapes, s["steps"], items, s["store"], s["keep"], dtype,
                           input_bytes=input_bytes) + shards * SHARD_OVERHEAD_BYTES

    def _check_space(self, x: Any, y: Optional[Tensor]) -> None:
        """Before the first shard to sample: print the store's size and refuse it when it exceeds the
        free space of the folder; before every later one, refuse a shard that does not fit."""
        items = batch_items(x)
        if self._item_size is not None:
            _refuse_if_full(self.root, self._size(items, 1), "the next shard")
            return
        self._item_size = _item_size(self.model(), x, y, self.store_dtype)
        planned = self.planned_items
        if planned is None:
            size, what = self._size(items, 1), f"{items} items per shard (the item count is unknown)"
        else:
            size = self._size(planned, -(-planned // max(items, 1))) + MANIFEST_OVERHEAD_BYTES
            what = f"{planned} items"
        s = self.settings
        states = kept_states(s["store"], s["steps"], s["keep"])
        on_disk = sum(p.stat().st_size for p in self.root.glob("shard-*.safetensors"))
        whose = f"rank {distributed.rank()}'s part of the " if distributed.world_size() > 1 else ""
        print(f"[trajectories] {whose}store {s['store']!r}: {what} x {states} states per item, about {human_bytes(size)} "
              f"({size} bytes; {human_bytes(on_disk)} already on disk) at {self.root}", flush=True)
        _refuse_if_full(self.root, max(size - on_disk, 0), f"the {s['store']!r} store")

    def model(self) -> nn.Module:
        """A frozen eval-mode copy of the teacher, made when the first shard must be sampled."""
        if self._model is None:
            from cdeq.norm import reset_norm

            self._model = copy.deepcopy(self.teacher).eval().requires_grad_(False)
            reset_norm(self._model)
        return self._model

    def _append(self, key: str, digest: str, items: int) -> None:
        self.record["batch_hashes"].append(key)
        self.record["shard_sha256"].append(digest)
        self.record["shard_sizes"].append(int(items))

    def _write_meta(self, complete: bool) -> dict:
        meta = {**self.settings, "complete": complete, **self.record, **(self.layout or {})}
        if complete:
            meta["inputs_hash"] = hashlib.sha256("\n".join(self.record["batch_hashes"]).encode()).hexdigest()
        if meta != self.old:
            atomic_write_json(self.root / META_FILE, meta)
        return meta

    def finish(self) -> dict:
        """The complete manifest, written unless it is unchanged."""
        given = len(self.record["batch_hashes"])
        if given == 0:
            raise ValueError("inputs: the iterable yielded no batch")
        if self.complete and given < self.recorded:
            raise ValueError(f"inputs: the trajectory cache at {self.root} holds {self.recorded} batches, these "
                             f"inputs give {given}; they are not the inputs it was sampled from (use another "
                             "cache_dir or delete this one)")
        return self._write_meta(complete=True)


def _planned_items(inputs: Iterable[Any]) -> Optional[int]:
    """The number of items ``inputs`` will give, where that is known without iterating: a
    DataLoader's sized dataset, or a list or tuple of batches (None otherwise)."""
    from torch.utils.data import DataLoader

    if isinstance(inputs, DataLoader):
        try:
            return len(inputs) * inputs.batch_size if inputs.drop_last else len(inputs.dataset)
        except TypeError:  # an iterable-style dataset without len
            return None
    if isinstance(inputs, (list, tuple)):
        return sum(_batch_items(batch, i) for i, batch in enumerate(inputs))
    return None


def _batch_items(batch: Any, index: int) -> int:
    return batch_items(_split_batch(batch, index)[0])


def _item_size(model: nn.Module, x: Any, y: Optional[Tensor], store_dtype: Optional[torch.dtype]
               ) -> tuple[list, torch.dtype, int]:
    """One item's state shapes and storage dtype (from the teacher's z_0, no solve) and input bytes."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        z0 = model.init_state(model.inject(map_state(lambda t: t.to(device), x)))
    layout = StateLayout(z0, "teacher.init_state(u)")
    inputs = sum(t.nbytes for t in as_tuple(x)) + (0 if y is None else y.nbytes)
    return [list(s[1:]) for s in layout.shapes], store_dtype or layout.dtype, inputs // max(layout.batch_size, 1)


def _refuse_if_full(root: Path, needed: int, what: str) -> None:
    """Raise OSError (ENOSPC) when ``needed`` bytes exceed the free space of ``root``."""
    free = shutil.disk_usage(root).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"cache_dir: {what} needs about {needed} bytes ({human_bytes(needed)}) but "
                      f"{root} has {free} bytes ({human_bytes(free)}) free; free space, choose another cache_dir, "
                      "store='subset' with a smaller keep, dtype='float16', or the online teacher "
                      "(cdeq.consistency.store.OnlineTeacher)")


def _rows_list(rows: list[int]) -> str:
    return f"{rows[:10]}{' ...' if len(rows) > 10 else ''}"


def _check_finite_inputs(x: Any, index: int) -> None:
    for part in as_tuple(x):
        if part.is_floating_point() or part.is_complex():
            finite = torch.isfinite(part)
            bad = ~(finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite.reshape(-1))
            if bool(bad.any()):
                raise ValueError(f"inputs: batch {index} holds non-finite values (NaN or inf) in row(s) "
                                 f"{_rows_list(torch.nonzero(bad).flatten().tolist())}; sampling stopped "
                                 "(the shards before it are kept)")


def _check_finite_states(tensors: dict[str, Tensor], residual: Tensor, index: int,
                         kept: Optional[Tensor] = None) -> None:
    """Raise naming the batch, its rows and the first step where the stored states or the
    teacher's residuals are not finite (a diverged solve would leave z_K = an old iterate).
    ``kept``: a subset store's steps, the columns of its states."""
    bad = ~torch.isfinite(residual)
    for name, z in tensors.items():
        if name.startswith("z."):
            finite = torch.isfinite(z)
            bad_z = ~(finite.flatten(2).all(dim=2) if finite.dim() > 2 else finite)
            bad |= bad_z if kept is None else torch.zeros_like(bad).scatter_(1, kept, bad_z)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        step = int(torch.nonzero(bad.any(dim=0)).min())
        raise ValueError(f"teacher: its states for batch {index} are not finite (NaN or inf) in row(s) "
                         f"{_rows_list(rows)}, first at step {step} (or beyond the storage dtype's range); "
                         "sampling stopped (the shards before it are kept)")


def subset_steps(seed: int, item: int, steps: int, keep: int) -> Tensor:
    """The steps a ``subset`` store keeps for the item at position ``item`` (counted over all
    batches in order): 0, ``keep`` distinct steps of 1..K-1 and K, sorted, as int64. A generator
    seeded from a hash of (seed, item) alone, so any item's steps can be drawn again in isolation."""
    kept_states("subset", steps, keep)
    digest = hashlib.sha256(f"cdeq-subset|{seed}|{item}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    middle = torch.randperm(steps - 1, generator=gen)[:keep].sort().values + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), middle, torch.full((1,), steps, dtype=torch.long)])


def _kept_steps(settings: dict, batch_size: int, first_item: int) -> Optional[Tensor]:
    """The steps a subset or target store keeps of each item, ``(B, kept)``; None for a full store."""
    steps = settings["steps"]
    if settings["store"] == "subset":
        return torch.stack([subset_steps(settings["seed"], first_item + r, steps, settings["keep"])
                            for r in range(batch_size)])
    if settings["store"] == "target":
        return torch.full((batch_size, 1), steps, dtype=torch.long)
    return None


def _state_tensors(states: list, layout: StateLayout, positions: Optional[Tensor],
                   store_dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """The stored states ``z.i``: ``(B, K+1, ...)`` per part, or ``(B, kept, ...)`` picked per item
    from ``states`` at ``positions`` (the solve keeps only the steps some item of the batch keeps)."""
    tensors: dict[str, Tensor] = {}
    for i in range(len(layout.shapes)):
        stacked = torch.stack([as_tuple(s)[i] for s in states], dim=1)  # (B, len(states), ...)
        if positions is not None:
            rows = torch.arange(layout.batch_size, device=stacked.device).unsqueeze(1)
            stacked = stacked[rows, positions.to(stacked.device)]
        tensors[f"z.{i}"] = stacked.to(store_dtype or stacked.dtype).cpu().contiguous()
    return tensors


def _write_shard(model: nn.Module, x: Any, y: Optional[Tensor], index: int, path: Path, key: str,
                 settings: dict, store_dtype: Optional[torch.dtype], first_item: int) -> tuple[dict, str]:
    """Solve one input batch with the teacher and write its shard atomically; returns its layout
    and the shard's SHA-256. ``first_item`` is the position of its first item over all batches."""
    from cdeq import solve

    steps, seed = settings["steps"], settings["seed"]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    xd = map_state(lambda t: t.to(device), x)
    with torch.no_grad():
        u = model.inject(xd)
        z0 = model.init_state(u)
        if settings["z0"] == "gaussian":
            z0 = map_state(lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device), z0)
        layout = StateLayout(z0, "teacher.init_state(u)")
        kept = _kept_steps(settings, layout.batch_size, first_item)
        wanted = "all" if kept is None else sorted(set(kept.flatten().tolist()))
        with amp_layers(model, settings["amp"]):
            _, info = solve(lambda z: model.layer(z, u), z0, solver=settings["solver"], max_iter=steps, tol=0.0,
                            return_states=wanted, trace=True, **settings["solver_options"])
    B = layout.batch_size
    residual = torch.cat([info.trace, info.rel_residual.unsqueeze(0)], dim=0).t().float().cpu()
    positions = None if kept is None else torch.searchsorted(torch.tensor(wanted), kept)
    tensors = _state_tensors(info.states, layout, positions, store_dtype)
    _check_finite_states(tensors, residual, index, kept)
    x_parts = len(x) if isinstance(x, (tuple, list)) else 0
    if x_parts:
        for i, part in enumerate(x):
            tensors[f"x.{i}"] = part.detach().cpu().contiguous()
    else:
        tensors["x"] = x.detach().cpu().contiguous()
    if y is not None:
        tensors["y"] = y.detach().cpu().contiguous()
    tensors["residual"] = residual.contiguous()
    tensors["aug"] = _augmentation_mask(B, steps, settings["p_aug"], settings["k_min"], settings["k_tail"], gen)
    if kept is not None:
        tensors["kept"] = kept
    lay = {"items": B, "state_shapes": [list(s[1:]) for s in layout.shapes], "state_is_tuple": layout.is_tuple,
           "x_parts": x_parts, "has_labels": y is not None}
    # one metadata key: safetensors writes several in a random order, and the digest must be reproducible
    data = safetensors_save(tensors, metadata={"cdeq": json.dumps({"batch_hash": key, **lay}, sort_keys=True)})
    atomic_write_bytes(path, data)
    return lay, hashlib.sha256(data).hexdigest()
