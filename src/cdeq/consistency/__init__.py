"""Consistency DEQs (C-DEQ): teacher trajectories, the student, and consistency distillation."""
from cdeq.consistency.config import DirectConfig, DistillConfig, HyperDEQConfig
from cdeq.consistency.distill import DistillLoop, distill
from cdeq.consistency.evaluate import equilibrium_error, teacher_error
from cdeq.consistency.export import FixedBudgetStudent
from cdeq.consistency.losses import ConsistencyLoss, DistillBatch
from cdeq.consistency.schedule import TimeSchedule
from cdeq.consistency.sharded import ShardedTrajectories, open_trajectories
from cdeq.consistency.store import OnlineTeacher, storage_table, store_bytes
from cdeq.consistency.student import ConsistencyDEQ, anderson_step
from cdeq.consistency.trajectories import Storage, Trajectories, module_hash, sample_trajectories, subset_steps

__all__ = ["sample_trajectories", "Trajectories", "module_hash", "ConsistencyDEQ", "anderson_step", "TimeSchedule",
           "DistillConfig", "HyperDEQConfig", "DirectConfig", "ConsistencyLoss", "DistillBatch", "DistillLoop",
           "distill", "equilibrium_error", "teacher_error", "ShardedTrajectories", "open_trajectories",
           "OnlineTeacher", "storage_table", "store_bytes", "subset_steps", "FixedBudgetStudent", "Storage"]
