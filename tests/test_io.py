"""Verified artefacts (issue 20): digests recorded on save and checked on load, one error type for
every kind of damage, the previous checkpoint kept and used when the newest is unreadable."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from cdeq import io as cio
from cdeq.io import (ArtefactWarning, CorruptArtefactError, digest_path, hash_artefacts, list_artefacts,
                     load_checkpoint, load_latest_checkpoint, previous_checkpoint, save_checkpoint, sha256_file,
                     verify_artefacts)


def _state(step: int = 0) -> dict:
    torch.manual_seed(step)
    return {"model": {"weight": torch.randn(256, 256)}, "step": step, "history": [0.5, 0.25]}


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zero_region(data: bytes) -> bytes:
    at = int(len(data) * 0.6)  # inside the weight's bytes, which make up most of the file
    return data[:at] + bytes(4096) + data[at + 4096:]


def _random_bytes(data: bytes) -> bytes:
    return os.urandom(len(data))


def _drop_tail(data: bytes) -> bytes:
    return data[:-10]


DAMAGE = {"truncate": _truncate, "zero a region": _zero_region, "random bytes": _random_bytes,
          "empty": lambda data: b"", "drop the tail": _drop_tail}


def test_save_records_the_digest_and_load_round_trips(tmp_path):
    path = tmp_path / "checkpoint.pt"
    digest = save_checkpoint(path, _state(3))
    assert digest == sha256_file(path)
    assert digest_path(path).read_text() == f"{digest}  checkpoint.pt\n"  # sha256sum -c reads it
    back = load_checkpoint(path, sha256=digest)
    assert back["step"] == 3 and torch.equal(back["model"]["weight"], _state(3)["model"]["weight"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_every_kind_of_damage_raises_one_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "best.pt"
    save_checkpoint(path, _state())
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CorruptArtefactError) as e:
        load_checkpoint(path)
    assert e.value.path == path and str(path) in str(e.value) and "SHA-256" in str(e.value)
    assert "weights_only" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "random bytes", "empty", "drop the tail"])
def test_damage_without_a_recorded_digest_is_the_same_error(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state())
    digest_path(path).unlink()  # as from an older cdeq, or a copied run
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CorruptArtefactError, match="not a torch checkpoint") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)


def test_a_given_digest_is_checked_and_files_without_a_record_still_load(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, _state(1))
    digest_path(path).unlink()
    assert load_checkpoint(path)["step"] == 1
    with pytest.raises(CorruptArtefactError, match="differs from the recorded 000000000000"):
        load_checkpoint(path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_refused_object_is_named_without_advising_an_unsafe_load(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"cls": CorruptArtefactError}, path)  # a class: refused by a weights-only load
    with pytest.raises(CorruptArtefactError, match="weights-only load refuses.*CorruptArtefactError") as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value)


def test_keep_previous_keeps_one_previous_checkpoint_with_its_digest(tmp_path):
    path = tmp_path / "checkpoint.pt"
    digests = [save_checkpoint(path, _state(step), keep_previous=True) for step in (1, 2, 3)]
    prev = previous_checkpoint(path)
    assert prev.name == "checkpoint.prev.pt"
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(prev)["step"] == 2
    assert sha256_file(prev) == digests[1] and cio.recorded_digest(prev) == digests[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.prev.pt", "checkpoint.prev.pt.sha256", "checkpoint.pt", "checkpoint.pt.sha256"]


@pytest.mark.parametrize("damage", ["truncate", "zero a region", "random bytes"])
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2):
        save_checkpoint(path, _state(step), keep_previous=True)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.warns(ArtefactWarning, match=r"checkpoint\.pt: corrupt .*resuming from checkpoint\.prev\.pt"):
        state = load_latest_checkpoint(path)
    assert state["step"] == 1
    assert (tmp_path / "checkpoint.pt.corrupt").exists() and not path.exists()
    save_checkpoint(path, _state(2), keep_previous=True)  # the damaged file is not kept as the previous one
    assert load_checkpoint(previous_checkpoint(path))["step"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest_checkpoint(path)["step"] == 2


def test_resume_with_every_checkpoint_damaged_starts_over(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert load_latest_checkpoint(path) is None  # nothing saved yet
    save_checkpoint(path, _state(1), keep_previous=True)
    path.write_bytes(_truncate(path.read_bytes()))
    with pytest.warns(ArtefactWarning, match="resuming from the start of the stage"):
        assert load_latest_checkpoint(path) is None
    assert load_latest_checkpoint(path) is None  # and again, without a manual delete


def test_a_save_killed_after_the_rotation_resumes_from_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1), keep_previous=True)
    real_replace = os.replace

    def killed(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(cio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2), keep_previous=True)
    monkeypatch.setattr(cio.os, "replace", real_replace)
    assert not path.exists() and not list(tmp_path.glob(".*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_latest_checkpoint(path)["step"] == 1


def test_hash_and_verify_artefacts_name_the_bad_files(tmp_path):
    save_checkpoint(tmp_path / "best.pt", _state())
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoint.pt", _state(step), keep_previous=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "meta.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    for transient in ("done.json", ".metrics.json.x.tmp", "model.pt.corrupt", "model.pt.corrupt.sha256"):
        (tmp_path / transient).write_text("")
    names = list_artefacts(tmp_path)
    assert names == ["best.pt", "best.pt.sha256", "cache/meta.json", "checkpoint.pt", "checkpoint.pt.sha256",
                     "metrics.json"]
    digests = hash_artefacts(tmp_path, ["best.pt", "cache/meta.json", "metrics.json"])
    assert digests["cache/meta.json"] == sha256_file(tmp_path / "cache" / "meta.json")
    assert verify_artefacts(tmp_path, digests) == []
    (tmp_path / "best.pt").write_bytes(_zero_region((tmp_path / "best.pt").read_bytes()))
    (tmp_path / "metrics.json").unlink()
    assert verify_artefacts(tmp_path, digests) == ["best.pt", "metrics.json"]
