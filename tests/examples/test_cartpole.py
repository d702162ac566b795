"""examples/cartpole.py: PPO with proxim's objective solves CartPole-v1 (20-60 s on one CPU core: slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("gymnasium", reason="examples/cartpole.py needs gymnasium (pip install gymnasium)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cartpole.py"
BUDGET = 300_000  # the example's default; seed 1 solves at about 151k steps, seeds 1-10 within 68k-151k


def _load_example():
    spec = importlib.util.spec_from_file_location("cartpole_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cartpole_example_solves_within_budget() -> None:
    result = _load_example().main(max_steps=BUDGET, seed=1, quiet=True)
    assert result.solved, f"mean return of the last 20 episodes {result.mean_return:.1f} < 475 after {result.steps} steps"
    assert result.steps <= BUDGET
