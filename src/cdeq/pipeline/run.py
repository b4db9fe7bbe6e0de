"""``cdeq run TASK``: every stage in order, then the evaluation grid, ``table.json``/``table.md``
and the figures."""
from __future__ import annotations

from typing import Any

from cdeq.measure import LATENCY_RATIO, device_name
from cdeq.pipeline.settings import PipelineConfig
from cdeq.pipeline.stages import Run, param_count


def run_pipeline(config: PipelineConfig, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage of ``config`` and write the table and figures; returns the table."""
    from cdeq.report import markdown_table, write_report

    run = Run(config)
    s = run.s
    print(f"cdeq run {config.task}: preset {config.preset}, device {config.device}, seed {config.seed}, "
          f"run dir {run.run_dir}", flush=True)
    run.train_teacher()
    run.train_explicit()
    run.sample()
    cdeq_student, _ = run.distill("anderson")
    cdeq_student.fused = s["fused_inference"]
    plain_student, _ = run.distill("plain")
    hyper, _ = run.train_hyperdeq()
    directs = {j: run.train_direct(j)[0] for j in s["nfe"]}
    explicit = run.explicit()

    print("[evaluate] test split", flush=True)
    rows = run.teacher_rows("anderson", sorted(set(s["nfe"]) | set(s["teacher_nfe"])))
    rows += run.teacher_rows("fixed_point", sorted(set(s["nfe"]) | set(s["teacher_nfe"])))
    for k in s["nfe"]:
        rows.append(run.evaluate_method("hyperdeq", k, lambda x, k=k: hyper.solve(x, nfe=k), None, param_count(hyper)))
        for name, student in (("cdeq", cdeq_student), ("cdeq-plain", plain_student)):
            rows.append(run.evaluate_method(name, k, lambda x, k=k, st=student: st.infer(x, steps=k), None,
                                            sum(p.numel() for p in student.trainable_parameters())))
        direct = directs[k]
        rows.append(run.evaluate_method("direct", k, lambda x, k=k, m=direct: m.infer(x, steps=k), None,
                                        sum(p.numel() for p in direct.trainable_parameters())))
    rows.append(run.evaluate_method("explicit", None, None, lambda x: explicit(x), param_count(explicit)))
    table = {
        "task": config.task, "command": config.command, "device": device_name(run.device), "commit": run.commit,
        "seed": config.seed, "preset": config.preset, "teacher_converged": run.converged_teacher(),
        "metric": run.task.metric, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "latency": run.latency(cdeq_student, list(s["nfe"])),
        "latency_ratio": LATENCY_RATIO,
        "rows": rows,
    }
    write_report(run.run_dir, table, figures=figures)
    print(markdown_table(table), flush=True)
    return table

