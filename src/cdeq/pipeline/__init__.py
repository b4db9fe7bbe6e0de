"""``cdeq run TASK``: the whole C-DEQ method on a real task, stage by stage.

teacher DEQ -> its Anderson trajectories -> the C-DEQ student (and its plain ablation) ->
HyperDEQ -> the explicit baseline -> the direct baseline (one per J) -> the evaluation grid ->
``table.json``, ``table.md`` and the figures.

- :mod:`~cdeq.pipeline.settings`: every setting, the presets and per-task sizes, :class:`PipelineConfig`;
- :mod:`~cdeq.pipeline.stages`: :class:`Stage` (one cached, resumable step) and :class:`Run` (all of them);
- :mod:`~cdeq.pipeline.run`: :func:`run_pipeline`, the stages in order, then the evaluation grid;
- :mod:`~cdeq.pipeline.ablation`: :func:`run_ablation`, the loss-weight and time-map grids.

Every stage lives in ``RUN_DIR/<stage>-<key>/``, where the key hashes the stage's settings and the
keys of the stages it reads, and is marked done by a ``done.json`` holding its one-line summary.
A rerun skips finished stages and resumes an interrupted one from its own checkpoints; a changed
setting gives the stages it touches a new key, so no stale result is reused.
"""
from cdeq.pipeline.ablation import ABLATIONS, GRIDS, run_ablation
from cdeq.pipeline.run import run_pipeline
from cdeq.pipeline.settings import DEFAULTS, PRESETS, TASK_SETTINGS, PipelineConfig
from cdeq.pipeline.stages import Run, Stage

__all__ = ["ABLATIONS", "GRIDS", "DEFAULTS", "PRESETS", "TASK_SETTINGS", "PipelineConfig", "Run", "Stage", "run_ablation",
           "run_pipeline"]
