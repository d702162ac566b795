"""What a run returns: held-out evaluations before and after, and timing; and its before/after table."""

from __future__ import annotations

from pathlib import Path

import attrs

from proxim.train.reporting import before_after_table, number, pct


@attrs.frozen
class EvalResult:
    """Held-out evaluation with greedy decoding: `accuracy` (None without a task) and mean total reward."""

    n: int
    accuracy: float | None
    mean_reward: float


@attrs.frozen
class RunResult:
    run_dir: Path
    steps: int
    before: EvalResult | None
    after: EvalResult | None
    wall_time: float
    train_time: float
    interrupted: int | None = None
    """The signal number that stopped the run early, if one did."""

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.train_time if self.train_time > 0 else float("nan")


def summary_table(result: RunResult, label: str) -> str:
    """The before/after held-out table (markdown), with wall time and speed."""
    b, a = result.before, result.after
    shown = a or b
    return before_after_table(
        f"held-out evaluation ({shown.n if shown is not None else 0} prompts, greedy) -- {label}, {result.steps} steps",
        [
            ("accuracy", pct(b.accuracy if b else None), pct(a.accuracy if a else None)),
            ("mean reward", number(b.mean_reward if b else None), number(a.mean_reward if a else None)),
        ],
        f"wall time {result.wall_time:.0f} s (training loop {result.train_time:.0f} s, {result.steps_per_second:.2f} steps/s); run folder {result.run_dir}",
    )
