"""Trajectory storage strategies (issue 16): the subset store, the online teacher, sizes and the
disk-space refusal."""
from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

from cdeq.consistency import trajectories as trajmod
from cdeq.consistency.store import (MANIFEST_OVERHEAD_BYTES, SHARD_OVERHEAD_BYTES, OnlineTeacher, store_bytes,
                                    storage_table)
from cdeq.consistency.trajectories import Storage, Trajectories, sample_trajectories, subset_steps
from conftest import AutocastSpyDEQ, ToyDEQ, ToyTupleDEQ, count_layer_calls, toy_batches

K = 10
OPTIONS = {"m": 3}


def _sample(teacher, batches, store="full", keep=None, dtype=None, amp=None, **kw):
    return sample_trajectories(teacher, batches, steps=K, solver_options=OPTIONS,
                               storage=Storage(store, keep, dtype, amp), **kw)


@pytest.fixture(scope="module")
def toy():
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=48, batch=16)
    full = _sample(teacher, batches, p_aug=0.3, seed=3)
    subset = _sample(teacher, batches, p_aug=0.3, seed=3, store="subset", keep=3)
    return teacher, batches, full, subset


def test_subset_kept_steps_are_reproducible_from_the_seed(toy, tmp_path):
    teacher, batches, _, subset = toy
    assert subset.store == "subset" and subset.keep == 3
    kept = torch.cat([subset.kept_steps(s) for s in range(subset.num_shards)])
    assert kept.shape == (48, 5) and kept.dtype == torch.long
    assert torch.equal(kept, torch.stack([subset_steps(3, item, K, 3) for item in range(48)]))
    assert bool((kept[:, 0] == 0).all() and (kept[:, -1] == K).all() and (kept.diff(dim=1) > 0).all())
    assert len({tuple(r) for r in kept.tolist()}) > 20  # drawn per item, not one set for all
    assert not torch.equal(kept, torch.stack([subset_steps(4, item, K, 3) for item in range(48)]))
    again = _sample(teacher, batches, p_aug=0.3, seed=3, store="subset", keep=3, cache_dir=tmp_path)
    assert torch.equal(again.kept_steps(2), subset.kept_steps(2))
    assert torch.equal(Trajectories.open(tmp_path).kept_steps(1, [0, 5]), subset.kept_steps(1, [0, 5]))


def test_subset_states_equal_the_full_store_and_draws_stay_on_kept_steps(toy, tmp_path, monkeypatch):
    _, _, full, subset = toy
    assert full.store == "full" and torch.equal(full.kept_steps(0, [1, 2]), torch.arange(K + 1).expand(2, -1))
    for shard in range(subset.num_shards):
        kept = subset.kept_steps(shard)
        for j in range(kept.shape[1]):
            ks = kept[:, j].tolist()
            for augmented in (True, False):
                assert torch.equal(subset.states(shard, None, ks, augmented=augmented),
                                   full.states(shard, None, ks, augmented=augmented))
    monkeypatch.setattr(trajmod, "MEMORY_SHARD_BYTES", 0)  # the memory-mapped path reads the same
    lazy = Trajectories.open(subset.root)
    rows = [2, 9]
    ks = lazy.kept_steps(1, rows)[:, 2].tolist()
    assert torch.equal(lazy.states(1, rows, ks), full.states(1, rows, ks)) and not lazy._memory
    g = torch.Generator().manual_seed(0)
    k, k1, k2 = subset.draw_steps(0, list(range(16)), g, include_k0=False)
    kept = subset.kept_steps(0)
    for i in range(16):
        row = kept[i].tolist()
        j = row.index(int(k[i]))
        assert j >= 1 and int(k1[i]) == row[j - 1] and int(k2[i]) == row[max(j - 2, 0)]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    k, k1, k2 = full.draw_steps(0, list(range(16)), g1)
    expected = torch.randint(0, K + 1, (16,), generator=g2)  # a full store: k ~ U{0..K} as before
    assert torch.equal(k, expected) and torch.equal(k1, (k - 1).clamp_min(0)) and torch.equal(k2, (k - 2).clamp_min(0))


def test_a_step_that_was_not_kept_is_an_error_naming_the_item(toy):
    subset = toy[3]
    kept = subset.kept_steps(1, [4])[0].tolist()
    missing = next(k for k in range(K + 1) if k not in kept)
    with pytest.raises(ValueError, match=rf"step {missing} of item \(shard 1, row 4\) was not kept.*{kept}"):
        subset.states(1, [3, 4], [0, missing])


def test_subset_arguments_and_a_store_mismatch_are_errors(toy, tmp_path):
    teacher, batches = toy[0], toy[1][:1]
    for store, keep, match in (("subset", None, "keep"), ("subset", K, "keep"), ("full", 3, "keep"),
                               ("online", None, "OnlineTeacher"), ("mmap", None, "store")):
        with pytest.raises(ValueError, match=match):
            _sample(teacher, batches, store=store, keep=keep)
    _sample(teacher, batches, store="subset", keep=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="store: cache 'subset' vs requested 'full'"):
        _sample(teacher, batches, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="keep: cache 2 vs requested 4"):
        _sample(teacher, batches, store="subset", keep=4, cache_dir=tmp_path)


def test_a_target_store_holds_z_K_alone_and_refuses_other_steps(toy, tmp_path):
    teacher, batches, full = toy[0], toy[1], toy[2]
    target = _sample(teacher, batches, p_aug=0.3, seed=3, store="target", cache_dir=tmp_path)
    with safe_open(str(tmp_path / "shard-000000.safetensors"), framework="pt") as h:
        assert h.get_slice("z.0").get_shape()[1] == 1
    assert torch.equal(target.kept_steps(2, [0, 5]), torch.full((2, 1), K))
    assert torch.equal(target.states(2, [0, 5], K, augmented=False), full.states(2, [0, 5], K, augmented=False))
    assert torch.equal(target.inputs(1), full.inputs(1)) and torch.equal(target.residuals(0), full.residuals(0))
    with pytest.raises(ValueError, match=r"step 0 of item \(shard 0, row 1\) was not kept by this target store"):
        target.states(0, [1], 0)
    with pytest.raises(ValueError, match="holds z_K alone.*OnlineTeacher"):
        target.draw_steps(0, [1, 2], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="keep: only store='subset'"):
        _sample(teacher, batches[:1], store="target", keep=2)


@pytest.mark.parametrize("store, keep", [("target", None), ("subset", 1)])
def test_sampling_keeps_only_the_steps_the_store_keeps(store, keep, tmp_path, monkeypatch):
    """A target or subset store asks the solver for the stored steps alone, not every iterate."""
    import cdeq

    asked, solve = [], cdeq.solve
    monkeypatch.setattr(cdeq, "solve", lambda *a, **kw: (asked.append(kw.get("return_states")), solve(*a, **kw))[1])
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=4, batch=4)
    stored = _sample(teacher, batches, store=store, keep=keep, cache_dir=tmp_path)
    kept = sorted(set(stored.kept_steps(0).flatten().tolist()))
    assert kept in asked and "all" not in asked and len(kept) < K + 1
    assert store == "subset" or kept == [K]


def test_a_full_cache_written_before_stores_existed_still_opens_and_is_reused(toy, tmp_path):
    teacher, batches = toy[0], toy[1]
    _sample(teacher, batches, cache_dir=tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("store", "keep")}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    stamps = [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("shard-*"))]
    opened = Trajectories.open(tmp_path, teacher=teacher)
    assert opened.store == "full" and opened.keep is None
    assert torch.equal(opened.states(0, [1], [4]), toy[2].states(0, [1], [4], augmented=False))
    _sample(teacher, batches, cache_dir=tmp_path)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("shard-*"))] == stamps  # reused, not resampled


@pytest.mark.parametrize("make", [ToyDEQ, ToyTupleDEQ])
def test_online_states_equal_the_full_store_in_exactly_k_calls(make):
    teacher = make()
    x = torch.randn(12, 8 if make is ToyDEQ else 6, generator=torch.Generator().manual_seed(2))
    full = _sample(teacher, [x])
    online = OnlineTeacher(teacher, steps=K, solver_options=OPTIONS)
    calls = count_layer_calls(online.model)
    ks = torch.tensor([0, 1, 2, 3, 5, 7, 9, 10, 10, 4, 6, 8])
    z_k, z_1, z_2, z_K = online.states(x, ks)
    assert calls[0] == K
    for got, steps in ((z_k, ks), (z_1, (ks - 1).clamp_min(0)), (z_2, (ks - 2).clamp_min(0)),
                       (z_K, torch.full_like(ks, K))):
        want = full.states(0, None, steps.tolist())
        for a, b in zip(got if make is ToyTupleDEQ else (got,), want if make is ToyTupleDEQ else (want,)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ks: steps must lie in"):
        online.states(x, [K + 1] * 12)


def test_bf16_autocast_keeps_the_fixed_point_and_a_float32_anderson_system(monkeypatch):
    teacher = AutocastSpyDEQ()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    ks = torch.full((16,), 30)
    exact = OnlineTeacher(teacher, steps=30, solver_options=OPTIONS).states(x, ks)[3]
    online = OnlineTeacher(teacher, steps=30, solver_options=OPTIONS, amp="bf16")
    system, solve_ex = set(), torch.linalg.solve_ex

    def spy_solve(a, *args, **kwargs):
        system.add((torch.is_autocast_enabled("cpu"), a.dtype))
        return solve_ex(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_ex", spy_solve)
    z_K = online.states(x, ks)[3]
    assert set(online.model.seen) == {(True, torch.bfloat16)} and system == {(False, torch.float32)}
    assert z_K.dtype == torch.float32 and not torch.equal(z_K, exact)
    assert float((z_K - exact).norm() / exact.norm()) < 1e-2
    with pytest.raises(ValueError, match="amp: expected None or one of"):
        OnlineTeacher(teacher, steps=3, amp="fp8")


def test_bf16_sampling_stores_what_the_bf16_online_teacher_gives(tmp_path):
    teacher = ToyDEQ()
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    stored = _sample(teacher, [x], amp="bf16", cache_dir=tmp_path)
    ks = torch.arange(8) + 3
    online = OnlineTeacher(teacher, steps=K, solver_options=OPTIONS, amp="bf16").states(x, ks)
    assert torch.equal(online[0], stored.states(0, None, ks.tolist()))
    assert not torch.equal(online[0], _sample(teacher, [x]).states(0, None, ks.tolist()))
    with pytest.raises(ValueError, match="amp: cache 'bf16' vs requested None"):
        _sample(teacher, [x], cache_dir=tmp_path)


def _tensor_bytes(root) -> int:
    total = 0
    for path in root.glob("shard-*.safetensors"):
        with safe_open(str(path), "pt") as h:
            total += sum(h.get_tensor(name).nbytes for name in h.keys())
    return total


@pytest.mark.parametrize("make,store,keep", [(ToyDEQ, "full", None), (ToyDEQ, "subset", 3),
                                             (ToyTupleDEQ, "subset", 0), (ToyDEQ, "target", None),
                                             (ToyTupleDEQ, "target", None)])
def test_the_size_estimate_matches_the_bytes_written(make, store, keep, tmp_path, capsys):
    teacher = make()
    d_in = 8 if make is ToyDEQ else 6
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, d_in, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (20, 20, 7)]
    traj = _sample(teacher, batches, store=store, keep=keep, dtype="float16", cache_dir=tmp_path)
    shapes = [list(s) for s in traj.layout_shapes]
    input_bytes = d_in * 4 + 8  # x float32 and y int64 per item
    est = store_bytes(shapes if make is ToyTupleDEQ else shapes[0], K, 47, store, keep, "float16",
                      input_bytes=input_bytes)
    assert _tensor_bytes(tmp_path) == est  # the estimate counts every stored tensor exactly
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert est < written <= est + 3 * SHARD_OVERHEAD_BYTES + MANIFEST_OVERHEAD_BYTES
    printed = capsys.readouterr().out
    announced = est + 3 * SHARD_OVERHEAD_BYTES + MANIFEST_OVERHEAD_BYTES
    assert f"store {store!r}: 47 items" in printed and f"({announced} bytes" in printed


def test_a_store_larger_than_the_free_disk_space_is_refused(tmp_path, monkeypatch):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=32, batch=16)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(OSError, match=r"the 'full' store needs about \d+ bytes .* has 5000 bytes .* free"):
        _sample(teacher, batches, cache_dir=tmp_path)
    assert not list(tmp_path.glob("shard-*"))  # refused before sampling
    one_shard = store_bytes([32], K, 16, "full", None, "float32", input_bytes=8 * 4 + 8) + SHARD_OVERHEAD_BYTES
    stream = tmp_path / "stream"

    def fills(path):  # room for the manifest and one shard, less what is written
        return usage(10**6, 0, one_shard + 2000 - sum(p.stat().st_size for p in stream.iterdir()))

    monkeypatch.setattr(shutil, "disk_usage", fills)
    with pytest.raises(OSError, match="the next shard needs about"):  # item count unknown: checked per shard
        _sample(teacher, iter(batches), cache_dir=stream)
    assert len(list((tmp_path / "stream").glob("shard-*"))) == 1
    counted = tmp_path / "counted"  # a generator whose item count is given: refused as a whole, before sampling
    with pytest.raises(OSError, match="the 'full' store needs about"):
        _sample(teacher, iter(batches), cache_dir=counted, items=32)
    assert not list(counted.glob("shard-*"))


def test_the_item_count_is_checked():
    teacher = ToyDEQ()
    with pytest.raises(ValueError, match="items: expected an integer >= 1, got 0"):
        _sample(teacher, iter(toy_batches(teacher, n=16, batch=16)), items=0)


def test_store_bytes_and_the_storage_table_at_the_papers_scale():
    mdeq_small = [[32, 56, 56], [64, 28, 28], [128, 14, 14], [256, 7, 7]]
    state = (32 * 56 * 56 + 64 * 28 * 28 + 128 * 14 * 14 + 256 * 7 * 7) * 2
    assert store_bytes(mdeq_small, 30, 1_281_167, "target") == 1_281_167 * (state + 31 * 5 + 8)
    assert store_bytes(mdeq_small, 30, 1_281_167, "full") == 1_281_167 * (31 * state + 31 * 5)
    assert store_bytes([410], 30, 10, "subset", 4) == 10 * (6 * 820 + 31 * 5 + 6 * 8)
    assert store_bytes([410], 30, 10, "online") == 0
    table = storage_table(mdeq_small, 30, 1_281_167, "float16", keeps=(4,))
    assert "| full | 31 |" in table and "| 14.9 TB |" in table and "| online + z_K alone (target) | 1 |" in table
    assert "| 0.482 TB |" not in table and "482 GB" in table
    with pytest.raises(ValueError, match="keep"):
        store_bytes([4], 5, 1, "subset", 5)
    with pytest.raises(ValueError, match="dtype"):
        store_bytes([4], 5, 1, "full", None, "int8")


def test_the_tables_in_docs_storage_md_are_the_helpers_output():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "storage.md").read_text(encoding="utf-8")
    mdeq_small = [[32, 56, 56], [64, 28, 28], [128, 14, 14], [256, 7, 7]]
    assert storage_table(mdeq_small, 30, 1_281_167, "float16", keeps=(4, 8)) in doc
    assert storage_table([150, 410], 30, 103_227_021 // 150, "float16", keeps=(4, 8)) in doc
