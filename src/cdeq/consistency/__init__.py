"""Consistency DEQs (C-DEQ): teacher trajectories, the student, and consistency distillation."""
from cdeq.consistency.distill import distill, equilibrium_error, teacher_error
from cdeq.consistency.schedule import TimeSchedule
from cdeq.consistency.student import ConsistencyDEQ, anderson_step
from cdeq.consistency.trajectories import Trajectories, module_hash, sample_trajectories

__all__ = ["sample_trajectories", "Trajectories", "module_hash", "ConsistencyDEQ", "anderson_step", "TimeSchedule",
           "distill", "equilibrium_error", "teacher_error"]
