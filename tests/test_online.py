"""Distillation with the teacher in the loop (issue 16's ``online`` store) against a full store."""
from __future__ import annotations

import pytest
import torch
from conftest import ToyDEQ, toy_batches

from cdeq.consistency import ConsistencyDEQ, DistillConfig, OnlineTeacher, Storage, distill, sample_trajectories

K, OPTIONS = 6, {"m": 5}


def test_online_distillation_matches_the_full_store():
    """Same seed: the same items and k, and the teacher's states computed in the step equal the stored
    ones (float32 store), so the two students agree to rounding."""
    teacher = ToyDEQ()
    batches = toy_batches(teacher, n=128, batch=32)
    full = sample_trajectories(teacher, batches, steps=K, solver_options=OPTIONS)
    inputs_only = sample_trajectories(teacher, batches, steps=K, solver_options=OPTIONS,
                                      storage=Storage("target"))
    cfg = DistillConfig(steps=10, batch_size=16, rollout_steps=2)
    students = [ConsistencyDEQ(teacher, init="linear") for _ in range(2)]
    distill(students[0], full, cfg, progress=False)
    distill(students[1], inputs_only, cfg, progress=False, online=OnlineTeacher(teacher, steps=K, solver_options=OPTIONS))
    for (name, a), b in zip(students[0].named_parameters(), students[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    with pytest.raises(ValueError, match="online"):
        distill(ConsistencyDEQ(teacher), inputs_only, cfg, progress=False, online=OnlineTeacher(teacher, steps=K + 1))
