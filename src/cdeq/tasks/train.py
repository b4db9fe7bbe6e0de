"""Train a task's teacher or explicit baseline from the command line (resumable)::

    python -m cdeq.tasks.train TASK RUN_DIR [--kind teacher|explicit] [--preset cpu] [--seed 0]

The command is stored in the run's metrics (``meta.command``) so reports can cite it.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdeq.tasks.train", description=__doc__.split("\n")[0])
    parser.add_argument("task")
    parser.add_argument("run_dir")
    parser.add_argument("--kind", choices=("teacher", "explicit"), default="teacher")
    parser.add_argument("--preset", choices=("tiny", "cpu", "gpu"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--explicit-model", choices=("gcn", "gat"), default=None, help="graphs: the explicit baseline")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from cdeq import tasks
    from cdeq.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"explicit": args.explicit_model} if args.explicit_model else {}
    task = tasks.get(args.task, preset=args.preset, **options)
    command = "python -m cdeq.tasks.train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    train = task.train_teacher if args.kind == "teacher" else task.train_explicit
    train(args.run_dir, preset=args.preset, seed=args.seed, device=args.device,
          progress=False if args.no_progress else None, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
