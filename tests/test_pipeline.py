"""The whole pipeline on a tiny configuration of a real task (Cora), its resume after an
interrupted stage, the report rebuilt from JSON, and the validated settings."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from cdeq import pipeline
from cdeq.io import load_checkpoint
from cdeq.pipeline import settings
from cdeq.report import METHODS, validate_table, write_report

cora_present = pytest.mark.skipif(
    not __import__("cdeq.data", fromlist=["describe"]).describe("cora").present,
    reason="Cora is not available (run `python -m cdeq.data fetch cora`)",
)


def student_dirs(out: Path) -> list[Path]:
    """The C-DEQ (Anderson-structured) student stages of a run directory."""
    return [p for p in out.glob("cdeq-*") if not p.name.startswith("cdeq-plain")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cora-tiny"
    config = pipeline.PipelineConfig(task="cora", preset="tiny", out=str(out), command="test")
    table = pipeline.run_pipeline(config, figures=True)
    return out, config, table


@cora_present
def test_tiny_pipeline_writes_the_binding_table(tiny_run):
    out, config, table = tiny_run
    on_disk = json.loads((out / "table.json").read_text())
    validate_table(on_disk)
    assert on_disk["task"] == "cora" and on_disk["metric"] == "accuracy" and on_disk["seed"] == 0
    methods = {r["method"] for r in on_disk["rows"]}
    assert methods == set(METHODS)
    for row in on_disk["rows"]:
        assert 0.0 <= row["value"] <= 1.0 and row["time_ms"] > 0 and row["params"] > 0
        if row["method"] == "explicit":
            assert row["nfe"] is None and row["rel_residual"] is None
        else:
            assert row["nfe"] in (1, 2, 4) and row["rel_residual"] >= 0
    # C-DEQ's latency is measured against k bare layer calls at every budget.
    assert set(on_disk["latency"]) == {str(k) for k in config.settings["nfe"]}
    for v in on_disk["latency"].values():
        assert v["cdeq_ms"] > 0 and v["bare_ms"] > 0 and 0 < v["ratio"] < float("inf")  # median of per-round ratios
    assert "timed alternately" in (out / "table.md").read_text()
    # The teacher's Anderson rows reduce the residual as the budget grows.
    anderson = sorted((r["nfe"], r["rel_residual"]) for r in on_disk["rows"] if r["method"] == "teacher-anderson")
    assert anderson[-1][1] < anderson[0][1]
    for name in ("table.md", "quality_vs_nfe.png", "residual_vs_nfe.png", "quality_vs_time.png", "anderson_ablation.png"):
        assert (out / name).stat().st_size > 0
    # NFE to each tolerance, per-sample stopping: the teacher's Anderson and the warm-started solve.
    to_tol = {(r["method"], r["tol"]): r for r in on_disk["to_tolerance"]}
    assert set(to_tol) == {(m, t) for m in ("teacher-anderson", "cdeq+anderson") for t in (1e-3, 1e-5)}
    for (method, _), r in to_tol.items():
        assert 0.0 <= r["reached"] <= 1.0
        assert (r["nfe"] is None) == (r["reached"] == 0.0)
        assert r["nfe"] is None or (1 if method == "teacher-anderson" else 2) <= r["nfe"] <= 50
    assert "Mean NFE per test sample to reach" in (out / "table.md").read_text()


@cora_present
def test_rerun_resumes_from_cached_stages(tiny_run, capsys):
    out, config, table = tiny_run
    distilled, = student_dirs(out)
    # Interrupt the distillation stage: drop its done marker; the rerun must redo only that stage
    # (resuming from its checkpoint) and reuse the others.
    (distilled / "done.json").unlink()
    pipeline.run_pipeline(config, figures=False)
    log = capsys.readouterr().out
    assert "[teacher] cached" in log and "[trajectories] cached" in log
    assert "[cdeq] done" in log and (distilled / "done.json").exists()


@cora_present
def test_a_stage_gives_the_same_student_whether_its_inputs_were_computed_or_cached(tiny_run, tmp_path):
    """The run distilled its student after training the teacher in the same process; a run that
    finds the teacher and trajectories cached must distil the very same student (IGNN's dropout
    draws from the global random stream, which those stages had moved)."""
    out, config, _ = tiny_run
    for stage in [*out.glob("teacher-*"), *out.glob("trajectories-*")]:
        shutil.copytree(stage, tmp_path / stage.name)
    fresh, _ = pipeline.Run(dataclasses.replace(config, out=str(tmp_path))).distill("anderson")
    distilled, = student_dirs(out)
    saved = load_checkpoint(distilled / "model.pt")["model"]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name


@cora_present
def test_changed_setting_gets_a_new_stage(tiny_run):
    out, config, _ = tiny_run
    changed = pipeline.PipelineConfig(task="cora", preset="tiny", out=str(out), settings={"lambda_task": 0.5})
    run = pipeline.Run(changed)
    _, summary = run.distill("anderson")
    assert len(student_dirs(out)) == 2


@cora_present
def test_report_rebuilds_from_json(tiny_run, tmp_path):
    out, _, table = tiny_run
    shutil.copy(out / "table.json", tmp_path / "table.json")
    rebuilt = write_report(tmp_path)
    assert rebuilt["rows"] == json.loads((out / "table.json").read_text())["rows"]
    md = (tmp_path / "table.md").read_text()
    assert "| cdeq |" in md and "Command: `test`" in md
    assert (tmp_path / "quality_vs_nfe.png").stat().st_size > 0


@cora_present
def test_warmstart_study_loads_the_student_and_measures_every_start(tiny_run, capsys):
    out, config, _ = tiny_run
    result = pipeline.run_ablation(config, "warmstart")
    log = capsys.readouterr().out
    assert "[cdeq] cached" in log and "[trajectories] cached" in log  # trains nothing
    from cdeq.pipeline.inference_study import WARM_STARTS
    rows = {(r["method"], r["tol"]): r for r in result["results"]}
    assert set(rows) == {(s.name, t) for s in WARM_STARTS for t in (1e-3, 1e-5)}
    for (name, tol), r in rows.items():
        assert (r["nfe"] is None) == (r["reached"] == 0.0)
        if r["nfe"] is not None:
            assert r["warm"] + 1 <= r["nfe"] <= 50
        base = rows[("teacher-anderson", tol)]["nfe"]
        if r["nfe"] is not None and base is not None:
            assert r["saved"] == pytest.approx(base - r["nfe"])
    assert rows[("teacher-anderson", 1e-3)]["saved"] in (0.0, None)
    on_disk = json.loads((out / "ablation-warmstart.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(result["results"])) and on_disk["commit"]
    assert "| warm 2 + history |" in (out / "ablation-warmstart.md").read_text()


@cora_present
def test_adaptive_study_trades_nfe_for_tolerance(tiny_run):
    out, config, _ = tiny_run
    rows = pipeline.run_ablation(config, "adaptive")["results"]
    budget = max(config.settings["nfe"])
    fixed = [r for r in rows if r["tol"] is None]
    assert [r["nfe"] for r in fixed] == list(range(1, budget + 1))
    assert all(r["mean_nfe"] == r["nfe"] for r in fixed)
    adaptive = sorted((r for r in rows if r["tol"] is not None), key=lambda r: r["tol"])
    means = [r["mean_nfe"] for r in adaptive]
    assert all(1 <= m <= budget for m in means)
    assert means == sorted(means, reverse=True)  # a looser tolerance stops every sample no later
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    md = (out / "ablation-adaptive.md").read_text()
    assert md.count("| none |") == budget and f"| {budget} | 0.1 |" in md


@cora_present
def test_a_seed_repeat_copies_the_trajectory_stage_it_names(tiny_run, tmp_path, monkeypatch):
    out, config, _ = tiny_run
    teacher_dir, = out.glob("teacher-*")
    traj_dir, = out.glob("trajectories-*")
    shared = {"teacher_from": str(teacher_dir), "traj_from": str(traj_dir)}
    repeat = pipeline.PipelineConfig(task="cora", preset="tiny", seed=1, out=str(tmp_path / "seed1"), settings=shared)
    run = pipeline.Run(repeat)
    run.train_teacher()
    monkeypatch.setattr("cdeq.consistency.sample_trajectories", lambda *a, **k: pytest.fail("sampled again"))
    summary = run.sample()
    assert run.traj_stage.dir.name != traj_dir.name  # its own stage, keyed by the source's identity
    mine, theirs = (json.loads((d / "cache" / "meta.json").read_text()) for d in (run.traj_stage.dir, traj_dir))
    assert mine == theirs and summary["items"] == json.loads((traj_dir / "done.json").read_text())["summary"]["items"]
    # Other sampling settings, or a directory that is not a finished stage, are refused by name.
    with pytest.raises(ValueError, match=r"traj_from: .* other settings: traj_steps=6 \(this run 5\)"):
        pipeline.Run(dataclasses.replace(repeat, settings={**shared, "traj_steps": 5}))
    with pytest.raises(FileNotFoundError, match="traj_from: .* not a finished trajectory stage"):
        pipeline.Run(dataclasses.replace(repeat, settings={**shared, "traj_from": str(teacher_dir)}))


@cora_present
def test_a_trajectory_stage_of_another_teacher_is_refused(tiny_run, tmp_path):
    out, config, _ = tiny_run
    traj_dir, = out.glob("trajectories-*")
    other = pipeline.PipelineConfig(task="cora", preset="tiny", seed=1, out=str(tmp_path / "other"),
                                    settings={"traj_from": str(traj_dir)})  # trains its own seed-1 teacher
    run = pipeline.Run(other)
    run.train_teacher()
    with pytest.raises(ValueError, match="teacher"):
        run.sample()


@cora_present
def test_the_trajectory_stage_announces_the_whole_store_before_sampling(tiny_run, tmp_path, capsys):
    out, config, _ = tiny_run
    teacher_dir, = out.glob("teacher-*")
    run = pipeline.Run(pipeline.PipelineConfig(task="cora", preset="tiny", out=str(tmp_path / "run"),
                                               settings={"teacher_from": str(teacher_dir), "traj_steps": 3}))
    run.train_teacher()
    run.sample()
    printed = capsys.readouterr().out
    assert "store 'full': 1 items x 4 states per item" in printed and "unknown" not in printed


@cora_present
def test_an_online_run_stores_z_K_alone_and_distils_with_the_teacher_in_the_step(tiny_run, tmp_path, capsys,
                                                                                  monkeypatch):
    from cdeq.consistency.store import OnlineTeacher

    solves = []
    states = OnlineTeacher.states
    monkeypatch.setattr(OnlineTeacher, "states", lambda self, *a, **k: solves.append(1) or states(self, *a, **k))
    out, config, _ = tiny_run
    teacher_dir, = out.glob("teacher-*")
    run = pipeline.Run(pipeline.PipelineConfig(task="cora", preset="tiny", out=str(tmp_path / "run"),
                                               settings={"teacher_from": str(teacher_dir), "traj_store": "online"}))
    run.train_teacher()
    run.sample()
    assert "store 'target': 1 items x 1 states per item" in capsys.readouterr().out
    assert run.trajectories().store == "target"
    _, summary = run.distill("anderson")
    assert len(solves) == run.s["distill_steps"] and 0 <= summary["err@1"] < 1


@cora_present
def test_a_killed_evaluation_resumes_at_its_first_unfinished_row(tiny_run, monkeypatch):
    out, config, table = tiny_run
    eval_dir = max(out.glob("eval-*"), key=lambda d: d.stat().st_mtime)  # the latest run's
    names = {p.name for p in eval_dir.glob("*.json")}
    assert {"cdeq-nfe1.json", "cdeq+anderson-nfe2.json", "explicit.json", "to-tolerance.json",
            "teacher-converged.json"} <= names
    (eval_dir / "cdeq-nfe2.json").unlink()  # not reached before the kill
    (eval_dir / "hyperdeq-nfe1.json").write_text('{"method": "hyper')  # cut short
    (eval_dir / "teacher-anderson-nfe2.json").unlink()  # one budget of a prefix method: its group again
    from cdeq.pipeline import evaluate
    computed, real = [], evaluate.evaluate_rows
    monkeypatch.setattr(evaluate, "evaluate_rows", lambda run, name, method, budgets, *a, **kw:
                        computed.append((name, tuple(budgets))) or real(run, name, method, budgets, *a, **kw))
    again = pipeline.run_pipeline(config, figures=False)
    teacher_budgets = tuple(sorted(set(again["settings"]["nfe"]) | set(again["settings"]["teacher_nfe"])))
    assert sorted(computed) == [("cdeq", (2,)), ("hyperdeq", (1,)), ("teacher-anderson", teacher_budgets)]
    assert [(r["method"], r["nfe"], r["value"]) for r in again["rows"]] == \
        [(r["method"], r["nfe"], r["value"]) for r in table["rows"]]
    assert again["to_tolerance"] == json.loads(json.dumps(table["to_tolerance"]))
    # A stage computed again (its done marker dropped) writes new files: the evaluation starts over.
    distilled = next(d for d in student_dirs(out) if json.loads((d / "settings.json").read_text())["lambda_task"]
                     == config.settings["lambda_task"])
    (distilled / "done.json").unlink()
    computed.clear()
    caches = len(list(out.glob("eval-*")))
    pipeline.run_pipeline(config, figures=False)
    rows_computed = sum(len(budgets) for _, budgets in computed)
    assert rows_computed == len(table["rows"]) - 1 and len(list(out.glob("eval-*"))) == caches + 1  # all but explicit's


def test_unknown_ablation_grid_is_named(tmp_path):
    config = pipeline.PipelineConfig(task="cora", preset="tiny", out=str(tmp_path / "run"), command="test")
    with pytest.raises(ValueError, match="grid: expected one of .*warmstart.*'nope'"):
        pipeline.run_ablation(config, "nope")


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match=r"unknown \['distil_steps'\]; valid settings: .*distill_steps"):
        pipeline.PipelineConfig(task="cora", settings={"distil_steps": 3})


def test_unknown_student_init_is_named():
    with pytest.raises(ValueError, match=r"student_init: expected one of \('zeros', 'linear', 'mlp'\), got 'learned'"):
        pipeline.PipelineConfig(task="mnist", settings={"student_init": "learned"})


def test_set_values_are_parsed_by_type(capsys):
    """A bad value is a usage error of the command (exit status 2, the setting named), not a traceback."""
    from cdeq.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "cora", "--set", "distill_steps=many", "--show-config"])
    assert exit_.value.code == 2
    assert "cdeq run: error: --set distill_steps: expected a value like 2000, got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"nfe": (1, 0)}, r"nfe: expected an integer >= 1, got 0"),
    ({"nfe": ()}, r"nfe: expected a non-empty tuple of ints >= 1"),
    ({"distill_steps": 0}, r"distill_steps: expected an integer >= 1, got 0"),
    ({"eval_limit": -2}, r"eval_limit: expected an integer >= 1, got -2"),
    ({"lambda_global": 1.5}, r"lambda_global: expected a number in \[0.0, 1.0\], got 1.5"),
    ({"ema": 1.0}, r"ema: expected a number in \[0.0, 1.0\), got 1.0"),
    ({"distance": "l1"}, r"distance: expected one of \('mse', 'huber'\), got 'l1'"),
    ({"traj_dtype": "float8"}, r"traj_dtype: expected one of .*got 'float8'"),
    ({"rho": 0.0}, r"rho: expected rho > 0"),
    ({"p_aug": 2.0}, r"p_aug: expected a number in \[0.0, 1.0\], got 2.0"),
    ({"fused_inference": "yes"}, r"fused_inference: expected True or False, got 'yes'"),
    ({"student_proj_rank": 0}, r"student_proj_rank: expected an integer >= 1, got 0"),
    ({"amp": "fp16"}, r"amp: expected one of \('bf16',\), got 'fp16'"),
])
def test_out_of_range_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        pipeline.PipelineConfig(task="cora", settings=changes)


def test_a_bad_setting_stops_the_command_before_any_stage(tmp_path, capsys):
    """``nfe=0`` used to surface when the direct baseline's stage began, after the teacher."""
    from cdeq.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "cora", "--preset", "tiny", "--set", "nfe=1,0", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "nfe: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_task_and_device_are_checked():
    with pytest.raises(ValueError, match=r"task: expected one of \('cora', .*got 'cifar'"):
        pipeline.PipelineConfig(task="cifar")
    with pytest.raises(ValueError, match=r"device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu'"):
        pipeline.PipelineConfig(task="cora", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: 'cuda' asked for, but this torch build sees no CUDA device"):
            pipeline.PipelineConfig(task="cora", device="cuda")


def test_report_of_a_folder_without_table_is_a_usage_error(tmp_path, capsys):
    from cdeq.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2 and f"run_dir: no table.json in {tmp_path}" in capsys.readouterr().err


def test_set_integer_settings_with_none_default():
    parse = settings._parse_value
    assert parse("explicit_steps", "200", None) == 200 and parse("eval_limit", "none", None) is None
    assert parse("beta", "0.5", None) == 0.5 and parse("teacher_from", "runs/x", None) == "runs/x"
    assert parse("nfe", "1,2,4", (1, 2)) == (1, 2, 4)


def test_show_config_lists_resolved_settings(capsys):
    from cdeq.cli import main

    assert main(["run", "cora", "--preset", "small", "--set", "nfe=1,2", "--f_max_iter", "40", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "nfe = (1, 2)" in out and "distill_steps = 300" in out and "'f_max_iter': 40" in out


def test_invalid_table_is_rejected():
    with pytest.raises(ValueError, match="missing top-level keys"):
        validate_table({"task": "cora"})
    bad = {"task": "t", "command": "c", "device": "d", "commit": "x", "seed": 0, "metric": "accuracy",
           "teacher_converged": {"nfe": 1, "value": 0.5},
           "rows": [{"method": "explicit", "nfe": 2, "value": 0.1, "rel_residual": None, "time_ms": 1, "params": 1}]}
    with pytest.raises(ValueError, match="explicit rows"):
        validate_table(bad)


def test_stage_keys_hold_a_version_and_every_student_setting(tmp_path, monkeypatch):
    """A stage's key holds its STAGE_VERSION (bumping it recomputes that stage in old run
    directories) and every setting of the student, whatever its value."""
    def run(**settings):
        return pipeline.Run(pipeline.PipelineConfig(task="cora", out=str(tmp_path), settings=settings))

    old = run(student_init="zeros", rollout_weight=1.0, anchor_weight=0.0)
    assert old.student_options()["init"] == "zeros"
    cfg = settings.distill_config(old.s, seed=0)
    assert (cfg.rollout_weight, cfg.anchor_weight, cfg.rollout_steps) == (1.0, 0.0, 8)
    stage = pipeline.Stage(tmp_path, "cdeq", {"a": 1}, kind="student")
    monkeypatch.setitem(settings.STAGE_VERSION, "student", settings.STAGE_VERSION["student"] + 1)
    assert pipeline.Stage(tmp_path, "cdeq", {"a": 1}, kind="student").key != stage.key
    assert run().student_options()["init"] == "linear"


def test_amp_enters_the_stage_keys_only_when_set(tmp_path):
    """Full-precision runs keep the keys they had before ``amp`` existed; bf16 gets its own stages."""
    def run(**changes):
        return pipeline.Run(pipeline.PipelineConfig(task="cora", out=str(tmp_path), settings=changes))

    plain, mixed = run(), run(amp="bf16")
    assert plain.teacher_stage.key != mixed.teacher_stage.key and plain.traj_stage.key != mixed.traj_stage.key
    assert "amp" not in plain.teacher_stage.payload and mixed.teacher_stage.payload["amp"] == "bf16"
    cfg = settings.distill_config(mixed.s, seed=0)
    assert cfg.amp == "bf16" and mixed.config_key(cfg)["amp"] == "bf16"
    assert "amp" not in plain.config_key(settings.distill_config(plain.s, seed=0))
    with pytest.raises(ValueError, match="amp"):
        run(amp="fp16")
