"""The README's examples run as printed, and its results table and docs/results.md match the
committed tables (documentation that cannot drift from the API or from the figures)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_toolkit_example_runs_and_its_gradients_reach_the_layer():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md: The toolkit", "exec"), namespace)  # noqa: S102
    z, info, lin = namespace["z"], namespace["info"], namespace["lin"]
    assert z.shape == (32, 64) and info.nfe >= 1
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_the_cdeq_example_runs_and_distils_a_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes its trajectories to ./traj/
    namespace: dict = {}
    exec(compile(python_blocks()[1], "README.md: C-DEQ on your own DEQ", "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (64, 4) and namespace["student"].nfe == 2
    assert (tmp_path / "traj").is_dir()


def test_the_results_table_and_docs_results_are_generated_from_the_committed_tables():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "results_summary.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
