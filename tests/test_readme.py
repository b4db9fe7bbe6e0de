"""The README's toolkit example runs as printed (documentation that cannot drift from the API)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_toolkit_example_runs_and_its_gradients_reach_the_layer():
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md: Using the toolkit", "exec"), namespace)  # noqa: S102
    z, info, lin = namespace["z"], namespace["info"], namespace["lin"]
    assert z.shape == (32, 64) and info.nfe >= 1
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
