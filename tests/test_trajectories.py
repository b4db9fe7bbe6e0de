"""Teacher trajectory cache (Section 3.2, Algorithm 4): round trip, augmentation, checks, resume."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

import cdeq
from cdeq.consistency import trajectories as trajmod
from cdeq.consistency.trajectories import Storage, Trajectories, module_hash, sample_trajectories
from cdeq.io import ArtefactWarning, CorruptArtefactError
from conftest import ToyDEQ, ToyTupleDEQ, toy_batches


def test_round_trip_matches_the_solver(tmp_path):
    teacher = ToyDEQ()
    before = module_hash(teacher)
    batches = toy_batches(teacher, n=96, batch=32)
    traj = sample_trajectories(teacher, batches, steps=7, solver_options={"m": 3}, cache_dir=tmp_path)
    assert module_hash(teacher) == before and teacher.training  # teacher untouched
    assert len(traj) == 96 and traj.num_shards == 3 and traj.steps == 7
    x, y = batches[1]
    with torch.no_grad():
        u = teacher.inject(x)
        _, info = cdeq.solve(lambda z: teacher.layer(z, u), teacher.init_state(u), m=3, max_iter=7, tol=0.0,
                             return_states="all")
    reopened = Trajectories.open(tmp_path, teacher=teacher)
    for tr in (traj, reopened):
        for k in (0, 3, 7):
            assert torch.allclose(tr.states(1, None, k), info.states[k], atol=1e-6)
        assert torch.equal(tr.inputs(1), x) and torch.equal(tr.labels(1), y)
        assert torch.equal(tr.labels(1, [2, 5]), y[[2, 5]])
        res = tr.residuals(1)
        assert res.shape == (32, 8) and torch.allclose(res[:, 0], torch.ones(32))  # z_0 = 0: residual 1
        assert bool((res[:, -1] < res[:, 1]).all())
    assert len(traj.mean_residuals()) == 8


def test_half_precision_storage_and_tuple_states(tmp_path):
    teacher = ToyTupleDEQ()
    batches = [torch.randn(10, 6), torch.randn(10, 6)]  # inputs without labels
    traj = sample_trajectories(teacher, batches, steps=4, storage=Storage(dtype="bfloat16"), cache_dir=tmp_path)
    ref = sample_trajectories(teacher, batches, steps=4)
    with safe_open(str(tmp_path / "shard-000000.safetensors"), "pt") as h:
        assert h.get_tensor("z.0").dtype == torch.bfloat16
    z, r = traj.states(1, [0, 3], [4, 2]), ref.states(1, [0, 3], [4, 2])
    assert isinstance(z, tuple) and z[0].shape == (2, 3, 4) and z[1].shape == (2, 5, 2)
    assert z[0].dtype == torch.float32
    assert all(torch.allclose(a, b, atol=2e-2) for a, b in zip(z, r))
    assert traj.labels(0) is None


def test_augmentation_statistics_and_raw_states():
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=2000, batch=500)
    K, k_min, k_tail, p = 12, 2, 3, 0.3
    traj = sample_trajectories(teacher, batches, steps=K, p_aug=p, k_min=k_min, k_tail=k_tail)
    mask = torch.cat([traj.augmentation_mask(s) for s in range(traj.num_shards)])
    inside = mask[:, k_min:K - k_tail + 1].float()
    assert abs(inside.mean().item() - p) < 0.02
    assert not mask[:, :k_min].any() and not mask[:, K - k_tail + 1:].any()
    rows = list(range(50))
    m = traj.augmentation_mask(0, rows)
    for k in range(K + 1):
        aug, raw = traj.states(0, rows, k), traj.states(0, rows, k, augmented=False)
        z_K = traj.states(0, rows, K)
        assert torch.equal(aug[m[:, k]], z_K[m[:, k]])
        assert torch.equal(aug[~m[:, k]], raw[~m[:, k]])
    assert not torch.equal(traj.states(0, rows, 5, augmented=False), z_K)


def test_cache_from_another_teacher_or_solver_is_an_error(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=32, batch=16)
    sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    again = sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)  # same settings: reused
    assert len(again) == 32
    with pytest.raises(ValueError, match="teacher_hash"):
        sample_trajectories(ToyDEQ(seed=3), batches, steps=3, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="solver_options"):
        sample_trajectories(teacher, batches, steps=3, solver_options={"m": 2}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="solver"):
        sample_trajectories(teacher, batches, steps=3, solver="fixed_point", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        sample_trajectories(teacher, batches, steps=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="another teacher"):
        Trajectories.open(tmp_path, teacher=ToyDEQ(seed=3))


def test_bad_arguments_name_the_argument(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=16, batch=16)
    for kw, name in [(dict(steps=0), "steps"), (dict(steps=3, p_aug=1.5), "p_aug"), (dict(steps=3, z0="ones"), "z0"),
                     (dict(steps=3, k_min=0), "k_min"), (dict(steps=3, storage=Storage(dtype="int8")), "dtype")]:
        with pytest.raises(ValueError, match=name):
            sample_trajectories(teacher, batches, **kw)
    with pytest.raises(TypeError, match="inputs"):
        sample_trajectories(teacher, [(torch.randn(4, 8), torch.zeros(4), 1)], steps=2)
    with pytest.raises(FileNotFoundError, match="no trajectory cache"):
        Trajectories.open(tmp_path / "missing")


def test_resume_after_a_kill_keeps_complete_shards(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=160, batch=32)

    def killed_after_two():
        for i, b in enumerate(batches):
            if i == 2:
                raise KeyboardInterrupt("killed")
            yield b

    with pytest.raises(KeyboardInterrupt):
        sample_trajectories(teacher, killed_after_two(), steps=5, cache_dir=tmp_path)
    (tmp_path / ".shard-000002.safetensors.abc.tmp").write_bytes(b"half-written")  # never visible
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert json.loads((tmp_path / "meta.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        Trajectories.open(tmp_path)
    stamp = (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match="order changed"):
        sample_trajectories(teacher, batches[::-1], steps=5, cache_dir=tmp_path)
    traj = sample_trajectories(teacher, batches, steps=5, cache_dir=tmp_path)
    assert (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns == stamp  # kept, not recomputed
    fresh = sample_trajectories(teacher, batches, steps=5)
    assert len(traj) == 160 and traj.num_shards == 5
    for s in range(5):
        assert torch.equal(traj.states(s, None, 5), fresh.states(s, None, 5))


def test_lazy_reading_by_slices_equals_in_memory(tmp_path, monkeypatch):
    teacher = ToyDEQ()
    traj = sample_trajectories(teacher, toy_batches(teacher, n=64, batch=32), steps=4, p_aug=0.5,
                               cache_dir=tmp_path)
    rows, ks = [1, 7, 30], [0, 3, 4]
    in_memory = traj.states(1, rows, ks)
    monkeypatch.setattr(trajmod, "MEMORY_SHARD_BYTES", 0)
    lazy = Trajectories.open(tmp_path)
    assert torch.equal(lazy.states(1, rows, ks), in_memory)
    assert torch.equal(lazy.inputs(1, rows), traj.inputs(1, rows))
    assert not lazy._memory  # nothing held: each read sliced from the memory-mapped shard


def test_gaussian_z0_is_seeded():
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=16, batch=16)
    a = sample_trajectories(teacher, batches, steps=2, z0="gaussian", seed=5)
    b = sample_trajectories(teacher, batches, steps=2, z0="gaussian", seed=5)
    c = sample_trajectories(teacher, batches, steps=2, z0="gaussian", seed=6)
    z0 = a.states(0, None, 0)
    assert z0.abs().sum() > 0 and torch.equal(z0, b.states(0, None, 0))
    assert not torch.equal(z0, c.states(0, None, 0))


# -- integrity (issue 20) ----------------------------------------------------------------------------
def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_complete_cache_is_reused_only_for_the_same_inputs_in_the_same_order(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=48, batch=16)
    sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    stamps = _stamps(tmp_path)
    x, y = batches[0]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    other = toy_batches(teacher, n=48, batch=16, seed=7)
    extra = toy_batches(teacher, n=16, batch=16, seed=8)
    for name, inputs, message in [
        ("shuffled batches", batches[::-1], "batch 0 differs .*order changed"),
        ("shuffled rows", [(x[perm], y[perm]), *batches[1:]], "batch 0 differs"),
        ("swapped labels", [(x, y.roll(1)), *batches[1:]], "batch 0 differs"),
        ("other inputs", other, "batch 0 differs"),
        ("fewer inputs", batches[:2], "holds 3 batches, these inputs give 2"),
        ("more inputs", batches + extra, "holds 3 batches and these inputs give more"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample_trajectories(teacher, inputs, steps=3, cache_dir=tmp_path)
    again = sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    assert _stamps(tmp_path) == stamps  # same inputs: nothing sampled or written again
    assert torch.equal(again.inputs(0), x) and len(again) == 48


@pytest.mark.parametrize("damage", ["truncate", "zero a region", "random bytes", "delete"])
def test_a_damaged_shard_is_named_and_sampled_again(tmp_path, damage):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=48, batch=16)
    fresh = sample_trajectories(teacher, batches, steps=4, cache_dir=tmp_path / "fresh")
    sample_trajectories(teacher, batches, steps=4, cache_dir=tmp_path)
    shard = tmp_path / "shard-000001.safetensors"
    data = shard.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "zero a region": data[:-1024] + bytes(512) + data[-512:],
               "random bytes": os.urandom(len(data)), "delete": None}[damage]
    shard.unlink() if damaged is None else shard.write_bytes(damaged)
    with pytest.raises(CorruptArtefactError, match="shard-000001.safetensors: corrupt .*SHA-256 differs"):
        Trajectories.open(tmp_path)
    lazy = Trajectories.open(tmp_path, verify=False)
    assert lazy.bad_shards() == [1] and torch.equal(lazy.states(0, None, 4), fresh.states(0, None, 4))
    with pytest.raises(CorruptArtefactError, match="shard-000001"):
        lazy.states(1, [0], 4)
    kept = (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns
    with pytest.warns(ArtefactWarning, match="shard-000001.safetensors: SHA-256 differs .*sampling batch 1 again"):
        sample_trajectories(teacher, batches, steps=4, cache_dir=tmp_path)
    assert (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns == kept
    reopened = Trajectories.open(tmp_path)
    for s in range(3):
        assert torch.equal(reopened.states(s, None, 4), fresh.states(s, None, 4))


def test_non_finite_inputs_or_states_stop_sampling_naming_the_batch(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=48, batch=16)
    x, y = batches[1]
    bad_x = x.clone()
    bad_x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"inputs: batch 1 holds non-finite values \(NaN or inf\) in row\(s\) \[3\]"):
        sample_trajectories(teacher, [batches[0], (bad_x, y), batches[2]], steps=3, cache_dir=tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["complete"] is False
    assert sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path).num_shards == 3  # resumes

    class Overflowing(ToyDEQ):  # states near 1e6: beyond float16's range
        def layer(self, z, u):
            return 1e6 * super().layer(z / 1e6, u)

    with pytest.raises(ValueError, match=r"teacher: its states for batch 0 are not finite .*storage dtype"):
        sample_trajectories(Overflowing(), batches, steps=3, storage=Storage(dtype="float16"),
                            cache_dir=tmp_path / "half")
    assert not json.loads((tmp_path / "half" / "meta.json").read_text())["complete"]


def test_a_shuffling_loader_is_warned_about():
    teacher = ToyDEQ()
    x, y = toy_batches(teacher, n=32, batch=32)[0]
    with pytest.warns(UserWarning, match="DataLoader shuffles"):
        shuffled = sample_trajectories(teacher, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ordered = sample_trajectories(teacher, DataLoader(TensorDataset(x, y), batch_size=16), steps=2)
    assert len(shuffled) == len(ordered) == 32


def test_older_or_unreadable_manifests_are_sampled_again(tmp_path):
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=32, batch=16)
    sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path / "fresh")
    sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("batch_hashes", "shard_sha256", "inputs_hash")}

    def same_cache():  # sampled again to the same bytes
        assert json.loads((tmp_path / "meta.json").read_text()) == meta
        assert json.loads((tmp_path / "fresh" / "meta.json").read_text())["shard_sha256"] == meta["shard_sha256"]

    (tmp_path / "meta.json").write_text(json.dumps({**old, "format": 1}))
    with pytest.warns(ArtefactWarning, match="without shard digests"):
        assert len(Trajectories.open(tmp_path)) == 32  # still readable, unverified
    with pytest.warns(UserWarning, match="older cdeq .*sampling it again"):
        sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    same_cache()
    (tmp_path / "meta.json").write_text('{"format": 2, "comp')
    with pytest.raises(CorruptArtefactError, match="meta.json: corrupt .*not valid JSON"):
        Trajectories.open(tmp_path)
    with pytest.warns(ArtefactWarning, match="meta.json: corrupt"):
        sample_trajectories(teacher, batches, steps=3, cache_dir=tmp_path)
    same_cache()
