"""``proxim compare``: the same task, seeds and budget under several presets; one plot and one table.

Runs go one after another in this process (they share the warm-start cache), each into
``OUTPUT_DIR/NAME/<preset>/``, through the runner it is given (``proxim.train.train``: an online run, or
an offline one for a preference preset); the comparison writes ``compare.md``, ``compare.json`` and
``compare.png`` into ``OUTPUT_DIR/NAME/``: the outcome of each run, and what its trust region did to the
tokens' gradients (zero-gradient and reversed fractions by the advantage's sign, the mean gradient weight,
the ratio's spread, the KL to the old policy), in a table and against step, one line per preset.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxim.figures import Panel, Series, informative, write_figure
from proxim.train.config import CompareConfig, TrainConfig
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


#: What each objective's trust region did, in the terms every region shares (`proxim.Objective.gradient_diagnostics`),
#: averaged over the run's updates: (column, metric key, shown as a percentage).
DIAGNOSTICS = (
    ("zero gradient, A > 0", "gradient/zero_fraction_pos", True),
    ("zero gradient, A < 0", "gradient/zero_fraction_neg", True),
    ("reversed, A > 0", "gradient/reversed_fraction_pos", True),
    ("reversed, A < 0", "gradient/reversed_fraction_neg", True),
    ("mean gradient weight", "gradient/weight_mean", False),
    ("ratio std", "gradient/ratio_std", False),
    ("KL to old", "region/approx_kl", False),
)


def compare_table(rows: Sequence[dict[str, Any]], task: str, steps: int, regime: str) -> str:
    """The comparison in markdown: the outcome of each run, then what its trust region did to the gradient."""
    lines = [
        f"comparison on {task}, {steps} steps each (same seeds, prompts and settings; {regime}); held-out numbers with greedy decoding",
        "",
        "| preset | accuracy before | accuracy after | reward after | train reward (last 10%) | KL to reference (last 10%) | wall time (s) | steps/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {_fmt(r['accuracy_before'], True)} | {_fmt(r['accuracy_after'], True)} | {_fmt(r['reward_after'])} | "
            f"{_fmt(r['train_reward'])} | {_fmt(r['kl'], digits=4)} | {r['wall_time']:.0f} | {r['steps_per_second']:.2f} |"
        )
    lines += [
        "",
        "what each trust region did to the tokens' gradients, mean over all updates (a token's weight is its gradient over the "
        "on-policy one, A; zero: clipped or masked; reversed: pushed against its advantage)",
        "",
        "| preset | " + " | ".join(column for column, _, _ in DIAGNOSTICS) + " |",
        "| --- |" + " ---: |" * len(DIAGNOSTICS),
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | " + " | ".join(_fmt(r["diagnostics"].get(key), pct, digits=4) for _, key, pct in DIAGNOSTICS) + " |")
    return "\n".join(lines)


def _run_mean(history: list[dict[str, Any]], key: str) -> float | None:
    return _tail_mean(history, key, frac=1.0)


def _regime(config: CompareConfig) -> str:
    split = (
        f"{config.minibatches} minibatch{'es' if config.minibatches > 1 else ''}"
        if config.minibatches
        else f"minibatches of {config.minibatch_size}"
        if config.minibatch_size
        else "one minibatch"
    )
    return f"{config.epochs} pass{'es' if config.epochs > 1 else ''} of {split} per rollout"


#: The plots: (panel title, y label, metric key, percent).
PLOTS = (
    ("Training reward", "reward", "reward/mean", False),
    ("Training accuracy", "accuracy", "reward/accuracy", True),
    ("Zero-gradient tokens", "fraction of tokens (A != 0)", "gradient/zero_fraction", True),
    ("Mean gradient weight", "g / A", "gradient/weight_mean", False),
    ("Ratio spread", "std of pi / pi_old", "gradient/ratio_std", False),
    ("KL to the old policy", "nats / token", "region/approx_kl", False),
)


def compare(config: CompareConfig, presets: Sequence[str], run: Callable[[TrainConfig], RunResult], name: str | None = None) -> list[RunResult]:
    """Train `config` once per preset with `run` and write the comparison; returns the runs' results.

    Every preset trains in the comparison's own regime (by default 2 passes of 4 minibatches per rollout,
    `CompareConfig`), not its own training regime, so that the differences are the objectives'."""
    name = name or f"compare-{config.task or 'prompts'}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    root = Path(config.output_dir) / name
    results: list[RunResult] = []
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[Series]] = {key: [] for _, _, key, _ in PLOTS}
    for preset in presets:
        result = run(TrainConfig(**{**config.to_dict(), "preset": preset, "output_dir": str(root), "run_name": preset}))
        results.append(result)
        history = _history(result.run_dir)
        for _, _, key, _ in PLOTS:
            curves[key].append(Series(preset, [(h["step"], h[key]) for h in history if key in h]))
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
                "regime": _regime(config),
                "diagnostics": {key: _run_mean(history, key) for _, key, _ in DIAGNOSTICS},
            }
        )
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch, one process writes the comparison
        return results
    table = compare_table(rows, config.task or "prompts", config.steps, _regime(config))
    if not root.exists():
        root.mkdir(parents=True)
    (root / "compare.md").write_text(table + "\n")
    (root / "compare.json").write_text(json.dumps(rows, indent=2))
    panels = [Panel(title, ylabel, curves[key], essential=key == "reward/mean", percent=pct) for title, ylabel, key, pct in PLOTS]
    write_figure(
        root / "compare.png", informative(panels), title=f"{', '.join(presets)} on {config.task or 'prompts'}: {config.steps} steps each, {_regime(config)}"
    )
    print(table)
    print(f"\nwritten: {root / 'compare.md'}, {root / 'compare.json'}, {root / 'compare.png'}")
    return results
