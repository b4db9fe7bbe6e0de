"""The ``cdeq`` command.

- ``cdeq run TASK``: the whole method on a real task (teacher -> trajectories -> C-DEQ and its
  baselines -> evaluation grid -> table and figures), each stage cached and resumable;
- ``cdeq report RUN_DIR``: rebuild ``table.md`` and the figures from ``table.json``;
- ``cdeq ablate {lambdas,timemap} TASK``: the loss-weight grid (C-DEQ Table 4) and the time-map grid;
  ``cdeq ablate {warmstart,adaptive} TASK``: warm-started exact solves and adaptive budgets of the run's student;
- ``cdeq data {list,describe,fetch}``: the data sets and their sources.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cdeq.pipeline import PipelineConfig


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    from cdeq.config import add_deq_args
    from cdeq.pipeline.settings import PRESETS
    from cdeq.tasks import NAMES

    parser.add_argument("task", choices=NAMES, help="the real task to run")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="size of every stage: tiny (a smoke test), small (Cora: about 9 min on 2 CPU cores), "
                             "cpu (under an hour on 2 CPU cores), gpu")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)")
    parser.add_argument("--out", default=None, help="run directory (default runs/TASK-PRESET-seedSEED)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one pipeline setting (e.g. --set distill_steps=2000); "
                             "`cdeq run TASK --show-config` lists them")
    parser.add_argument("--show-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    add_deq_args(parser)  # the teacher's DEQ, with TorchDEQ's flag names


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``cdeq`` parser and its subcommands' parsers (for usage errors that name the subcommand)."""
    from cdeq.pipeline.ablation import GRIDS

    parser = argparse.ArgumentParser(prog="cdeq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the whole pipeline on a task and print the table")
    _add_run_args(p_run)
    p_report = sub.add_parser("report", help="rebuild table.md and the figures from RUN_DIR/table.json")
    p_report.add_argument("run_dir")
    p_ablate = sub.add_parser("ablate", help="loss-weight (Table 4) or time-map grid, or the student's warm-start "
                                             "or adaptive-budget study, on one task")
    p_ablate.add_argument("grid", choices=GRIDS)
    _add_run_args(p_ablate)
    sub.add_parser("data", help="data sets: list, describe NAME, fetch NAME... | --all")
    return parser, {"run": p_run, "report": p_report, "ablate": p_ablate}


def _report(run_dir: str, parser: argparse.ArgumentParser) -> int:
    from cdeq.report import markdown_table, write_report

    try:
        table = write_report(run_dir)
    except (FileNotFoundError, ValueError) as err:  # no table.json, or one that breaks the binding form
        parser.error(str(err))
    print(markdown_table(table))
    return 0


def _execute(args: argparse.Namespace, config: "PipelineConfig") -> int:
    """Run the pipeline or the ablation; a locked or unwritable run directory and an interruption
    end with a message and an exit status, not a traceback."""
    from cdeq.lock import RunDirLocked
    from cdeq.pipeline import run_ablation, run_pipeline

    try:
        if args.command == "ablate":
            run_ablation(config, args.grid)
        else:
            run_pipeline(config, figures=not args.no_figures)
    except RunDirLocked as err:
        print(f"cdeq {args.command}: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:
        print(f"cdeq {args.command}: --out {config.out}: cannot write there ({err})", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # SIGINT or SIGTERM: the training loop saved a checkpoint first
        print(f"\ncdeq {args.command}: interrupted ({err or 'no checkpoint was due'}); rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        from cdeq.data.__main__ import main as data_main

        return data_main(argv[1:])
    parser, subs = _parser()
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.run_dir, subs["report"])

    from cdeq import distributed
    from cdeq.pipeline import PipelineConfig
    from cdeq.runtime import quiet_profiler, tune_cpu_allocator

    tune_cpu_allocator()
    quiet_profiler()
    sub_parser = subs[args.command]
    if args.threads is not None:
        import torch

        if args.threads < 1:
            sub_parser.error(f"--threads: expected an int >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:  # a bad setting, task, device or DEQ flag: a usage error, before any stage runs
        config = PipelineConfig.from_args(args, command="cdeq " + " ".join(argv))
    except ValueError as err:
        sub_parser.error(str(err))
    config.device = str(distributed.init(config.device))  # under torchrun: join the ranks, cuda:LOCAL_RANK
    if args.show_config:
        print(config.describe())
        return 0
    return _execute(args, config)


if __name__ == "__main__":
    sys.exit(main())
