"""``proxim compare``: the same task, seeds and budget under several presets; one plot and one table.

Runs go one after another in this process (they share the warm-start cache), each into
``OUTPUT_DIR/NAME/<preset>/``, through the runner it is given (``proxim.train.train``: an online run, or
an offline one for a preference preset); the comparison writes ``compare.md``, ``compare.json`` and
``compare.png`` (reward and KL against step, one line per preset) into ``OUTPUT_DIR/NAME/``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxim.train.config import CompareConfig, TrainConfig
from proxim.train.figures import Panel, Series, informative, write_figure
from proxim.train.results import RunResult


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _tail_mean(history: list[dict[str, Any]], key: str, frac: float = 0.1) -> float | None:
    values = [h[key] for h in history if key in h]
    if not values:
        return None
    k = max(1, int(len(values) * frac))
    mean: float = sum(values[-k:]) / k
    return mean


def _fmt(x: float | None, pct: bool = False, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def compare_table(rows: Sequence[dict[str, Any]], task: str, steps: int) -> str:
    lines = [
        f"comparison on {task}, {steps} steps each (same seeds, prompts and settings); held-out numbers with greedy decoding",
        "",
        "| preset | accuracy before | accuracy after | reward after | train reward (last 10%) | KL to reference (last 10%) | wall time (s) | steps/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {_fmt(r['accuracy_before'], True)} | {_fmt(r['accuracy_after'], True)} | {_fmt(r['reward_after'])} | "
            f"{_fmt(r['train_reward'])} | {_fmt(r['kl'], digits=4)} | {r['wall_time']:.0f} | {r['steps_per_second']:.2f} |"
        )
    return "\n".join(lines)


def compare(config: CompareConfig, presets: Sequence[str], run: Callable[[TrainConfig], RunResult], name: str | None = None) -> list[RunResult]:
    """Train `config` once per preset with `run` and write the comparison; returns the runs' results."""
    name = name or f"compare-{config.task or 'prompts'}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    root = Path(config.output_dir) / name
    results: list[RunResult] = []
    rows: list[dict[str, Any]] = []
    reward: list[Series] = []
    kl: list[Series] = []
    for preset in presets:
        result = run(TrainConfig(**{**config.to_dict(), "preset": preset, "output_dir": str(root), "run_name": preset}))
        results.append(result)
        history = _history(result.run_dir)
        reward.append(Series(preset, [(h["step"], h["reward/mean"]) for h in history if "reward/mean" in h]))
        kl.append(Series(preset, [(h["step"], h["kl/ref"]) for h in history if "kl/ref" in h]))
        rows.append(
            {
                "preset": preset,
                "run_dir": str(result.run_dir),
                "accuracy_before": result.before.accuracy if result.before else None,
                "accuracy_after": result.after.accuracy if result.after else None,
                "reward_after": result.after.mean_reward if result.after else None,
                "train_reward": _tail_mean(history, "reward/mean"),
                "kl": _tail_mean(history, "kl/ref"),
                "wall_time": result.wall_time,
                "steps_per_second": result.steps_per_second,
            }
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch, one process writes the comparison
        return results
    table = compare_table(rows, config.task or "prompts", config.steps)
    if not root.exists():
        root.mkdir(parents=True)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(json.dumps(rows, indent=2))
    panels = [Panel("Training reward", "reward", reward, essential=True), Panel("KL to the reference", "nats / token", kl)]
    write_figure(root / "compare.png", informative(panels), title=f"{', '.join(presets)} on {config.task or 'prompts'}: {config.steps} steps each")
    print(table)
    print(f"\nwritten: {root / 'compare.md'}, {root / 'compare.png'}")
    return results
