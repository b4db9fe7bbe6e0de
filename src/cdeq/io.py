"""Files written atomically, checkpoints that load without executing pickled code, and the random
state a checkpoint keeps so that a resumed run draws what the uninterrupted one would have.

Artefacts are verified when read: :func:`save_checkpoint` records each file's SHA-256 beside it
(``NAME.sha256``, in ``sha256sum`` format) and :func:`load_checkpoint` checks it; any damage (a
changed digest, a truncated file, bytes that are no checkpoint) raises :class:`CorruptArtefactError`
naming the file. Resume checkpoints keep their predecessor (``NAME.prev.pt``) and
:func:`load_latest_checkpoint` falls back to it. :func:`hash_artefacts` and :func:`verify_artefacts`
record and check a finished stage's files (for its ``done.json``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch


def _umask_mode() -> int:
    """The mode an ordinary new file gets (0o666 less the umask); mkstemp would give 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH) & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so a reader (or a run killed half-way) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write_bytes` for JSON (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


DIGEST_SUFFIX = ".sha256"
PREVIOUS_TAG = ".prev"
CORRUPT_SUFFIX = ".corrupt"


class CorruptArtefactError(RuntimeError):
    """A file that is damaged or unreadable: its recorded SHA-256 differs, or it does not load."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: corrupt or unreadable artefact ({reason})")


class ArtefactWarning(UserWarning):
    """A damaged artefact was found and set aside; what replaces it is said in the message."""


def digest_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` records the SHA-256 of ``path``: ``NAME.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def recorded_digest(path: str | os.PathLike) -> Optional[str]:
    """The SHA-256 recorded beside ``path``, or None when there is no (readable) record."""
    try:
        text = digest_path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return text[0].lower() if text and len(text[0]) == 64 else None


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint ``save_checkpoint(path, keep_previous=True)`` keeps: ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_TAG}{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, keep_previous: bool = False) -> str:
    """Save a checkpoint atomically and record its SHA-256 beside it; return that digest.

    ``state`` may hold tensors, state dicts, numbers, strings, lists and dicts: everything
    :func:`load_checkpoint` can read back with ``weights_only=True``. With ``keep_previous`` the
    checkpoint it replaces becomes :func:`previous_checkpoint` (for :func:`load_latest_checkpoint`).
    The old record is moved or removed before the new file lands, so a kill at any point leaves
    each file with its own digest or with none (an unverified but complete file), never another's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    try:
        torch.save(dict(state), tmp)
        digest = sha256_file(tmp)
        if keep_previous and path.exists():
            _move_with_digest(path, previous_checkpoint(path))
        digest_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_text(digest_path(path), f"{digest}  {path.name}\n")
    return digest


def _move_with_digest(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` with its digest record (record first: ``dst`` is never paired
    with a record of another file for longer than one rename)."""
    if digest_path(src).exists():
        os.replace(digest_path(src), digest_path(dst))
    else:
        digest_path(dst).unlink(missing_ok=True)
    os.replace(src, dst)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    sha256: Optional[str] = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without executing pickled code.

    The file is checked against ``sha256`` if given, else against the digest recorded beside it
    (files without one, e.g. from older versions, are loaded unverified). A mismatch, or a file that
    does not load, raises :class:`CorruptArtefactError`; a missing file raises FileNotFoundError.
    """
    path = Path(path)
    data = path.read_bytes()
    expected = sha256 or recorded_digest(path)
    if expected is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected.lower():
            raise CorruptArtefactError(path, f"SHA-256 {got[:12]}... differs from the recorded {expected[:12]}...")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:
        if expected is not None:  # the bytes are the ones written: a real error, not damage
            raise
        raise CorruptArtefactError(path, _load_failure(e)) from None


def _load_failure(error: Exception) -> str:
    """Why a checkpoint did not load, in words that never suggest loading untrusted pickles."""
    lines = str(error).strip().splitlines()
    refused = [line.strip() for line in lines if "Unsupported global" in line]
    if isinstance(error, pickle.UnpicklingError) and refused:
        return f"it holds an object a weights-only load refuses: {refused[0].split('. ')[0]}"
    first = lines[0].split(". ")[0] if lines else ""
    shown = f": {first}" if first and "weights" not in first.lower() else ""
    return f"truncated, damaged or not a torch checkpoint ({type(error).__name__}{shown})"


def load_latest_checkpoint(path: str | os.PathLike,
                           map_location: str | torch.device = "cpu") -> Optional[dict[str, Any]]:
    """The newest readable resume checkpoint: ``path``, else :func:`previous_checkpoint`, else None.

    A damaged one is renamed ``NAME.corrupt`` (so the next save does not keep it as the previous
    one) with an :class:`ArtefactWarning` naming it, so a resume never needs a manual delete.
    None means there is nothing to resume from: the caller starts the stage over.
    """
    path = Path(path)
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.exists():
            continue
        try:
            return load_checkpoint(candidate, map_location)
        except CorruptArtefactError as e:
            _move_with_digest(candidate, candidate.with_name(candidate.name + CORRUPT_SUFFIX))
            prev = previous_checkpoint(path)
            fallback = prev.name if candidate == path and prev.exists() else "the start of the stage"
            warnings.warn(f"{e}; moved aside as {candidate.name}{CORRUPT_SUFFIX}, resuming from {fallback}",
                          ArtefactWarning, stacklevel=2)
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_artefacts(root: str | os.PathLike, exclude: Iterable[str] = ("done.json",)) -> list[str]:
    """The files under ``root`` that a finished stage keeps, relative and sorted, for
    :func:`hash_artefacts`: all but ``exclude``, temporary (hidden) files, kept previous
    checkpoints and files set aside as corrupt, none of which a later stage reads."""
    root, skip = Path(root), set(exclude)
    names = []
    for path in sorted(root.rglob("*")):
        base = path.name.removesuffix(DIGEST_SUFFIX)
        transient = (path.name.startswith(".") or base.endswith(CORRUPT_SUFFIX)
                     or Path(base).stem.endswith(PREVIOUS_TAG))
        name = path.relative_to(root).as_posix()
        if path.is_file() and not transient and name not in skip:
            names.append(name)
    return names


def hash_artefacts(root: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: SHA-256}`` of files under ``root`` (names relative to it), for a stage's ``done.json``."""
    root = Path(root)
    return {str(name): sha256_file(root / name) for name in names}


def verify_artefacts(root: str | os.PathLike, digests: Mapping[str, str]) -> list[str]:
    """The names in ``digests`` (as :func:`hash_artefacts` gave them) whose file under ``root`` is
    missing or whose SHA-256 differs; an empty list means every file is intact."""
    root = Path(root)
    return [name for name, digest in digests.items()
            if not (root / name).is_file() or sha256_file(root / name) != digest]


def random_state() -> dict[str, Any]:
    """torch's global random state: the CPU generator and, where CUDA is present, every device's
    (dropout on a GPU draws from the device's generator)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_random_state(saved: Any) -> None:
    """Set the state :func:`random_state` returned (or a bare CPU state, as older checkpoints hold).
    CUDA states are restored when this machine has as many devices as the run that saved them."""
    if isinstance(saved, torch.Tensor):
        torch.set_rng_state(saved)
        return
    torch.set_rng_state(saved["cpu"])
    cuda = saved.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
