"""The trust-region experiment (docs/experiments.md): what each region does once updates are off-policy.

At the built-in scale (the tiny Llama, warm-started, on the built-in tasks), several seeds per cell, each
run a real ``proxim.train.train`` in its own process with one thread. Experiments:

    offpolicy   every trust region on the same GRPO objective (group z-score, 1/|o| per sequence, k3 KL 0.04),
                and the published presets, 2 passes of 4 minibatches per rollout (8 updates, 7 off-policy):
                accuracy and what each region does to the gradient (zero, reversed, mean weight)
    aggressive  the same regions at 10x the learning rate and 4 passes of 4 minibatches: which hold
    aggressive3x  the same at 3x the learning rate
    lampo       LamPO's pairwise advantage against GRPO's group z-score on ``reverse`` (graded rewards; a 60-step
                warm start, which leaves the model at a mean reward of about 0.28: the default one solves it)
    delta       DRPO's delta (12.5, 1, 0.1, 0.05), DRPO (mu-weighted) and SPO (mu_weighted=False), off-policy
    halflr      clip and the regions that never zero a gradient, off-policy at half the learning rate
    withkl      the cispo and sapo presets with GRPO's KL to the reference (k3, 0.04, in the loss)

    python benchmarks/trust_regions.py run offpolicy delta aggressive aggressive3x lampo withkl halflr --seeds 0 1 2 --workers 2
    python benchmarks/trust_regions.py report          # writes docs/experiments.md's tables and figures

Runs are kept in ``--out`` (default ``runs/experiments``), one JSON summary each; ``run`` skips a cell whose
summary exists, so an interrupted sweep continues where it stopped. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

ROOT = Path(__file__).resolve().parent.parent

FIGURES = ROOT / "docs" / "figures" / "experiments"

#: The GRPO objective every region is put on (region swapped, everything else the preset's).
BASE = "grpo"
#: (label, preset, region, objective settings): each region on the GRPO base, then the presets as published.
REGIONS = (
    ("clip", BASE, None, {}),
    ("clip-higher", BASE, None, {"eps_high": 0.28}),
    ("none", BASE, "none", {}),
    ("cispo", BASE, "cispo", {}),
    ("dppo-tv", BASE, "divergence_mask", {}),
    ("drpo", BASE, "quadratic", {}),
    ("drpo-0.1", BASE, "quadratic", {"delta": 0.1}),
    ("sapo", BASE, "sapo", {}),
    ("gspo", BASE, "sequence_clip", {}),
)
#: The published presets other than grpo (the clip cell) and drpo (the delta experiment's drpo-12.5), each with
#: its own advantage, aggregation and KL, in the same off-policy regime.
PRESETS = tuple((f"preset:{p}", p, None, {}) for p in ("cispo", "sapo", "dapo", "dppo", "gspo"))
#: The drpo preset at each delta, and SPO (mu_weighted=False) at the reference code's delta and at 0.1.
DELTAS = tuple((f"drpo-{delta:g}", "drpo", None, {"delta": delta, "mu_weighted": True}) for delta in (12.5, 1.0, 0.1, 0.05)) + tuple(
    (f"spo-{delta:g}", "drpo", None, {"delta": delta, "mu_weighted": False}) for delta in (12.5, 0.1)
)

OFF_POLICY = {"epochs": 2, "minibatches": 4}
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "offpolicy": {"cells": REGIONS + PRESETS, "train": {**OFF_POLICY, "steps": 100}},
    "aggressive": {"cells": REGIONS, "train": {"epochs": 4, "minibatches": 4, "lr": 1e-3, "steps": 60}},
    # lr 1e-3 sank every region; at 3x the default learning rate the regions part ways
    "aggressive3x": {"cells": REGIONS, "train": {"epochs": 4, "minibatches": 4, "lr": 3e-4, "steps": 60}},
    "lampo": {
        "cells": (("grpo", "grpo", None, {}), ("lampo", "lampo", None, {}), ("grpo-pairwise", "grpo", None, {"advantage": "pairwise"})),
        "train": {"task": "reverse", "warmstart_steps": 60, "steps": 150},
    },
    "delta": {"cells": DELTAS, "train": {**OFF_POLICY, "steps": 100}},
    # Why cispo, sapo and drpo fall behind off-policy: at half the learning rate (does each update move too far?) ...
    "halflr": {
        "cells": tuple(c for c in REGIONS + PRESETS if c[0] in ("clip", "cispo", "sapo", "drpo", "preset:cispo", "preset:sapo")),
        "train": {**OFF_POLICY, "lr": 5e-5, "steps": 100},
    },
    # ... and the presets that fell, with GRPO's KL to the reference (what else their presets lack)
    "withkl": {
        "cells": tuple((f"{p}+kl", p, None, {"kl_coef": 0.04, "kl_estimator": "k3", "kl_in": "loss"}) for p in ("cispo", "sapo")),
        "reference": {f"{p}+kl": ("offpolicy", f"preset:{p}") for p in ("cispo", "sapo")},
        "train": {**OFF_POLICY, "steps": 100},
    },
}
COMMON = {"eval_size": 100, "quiet": True, "tracker": "none", "threads": "1"}


def _summary(run_dir: Path, result: Any, cell: dict[str, Any]) -> dict[str, Any]:
    """What the report needs from a run: accuracy before and after, the per-step curves, the means of the diagnostics."""
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = sorted({k for h in history for k in h if k.startswith(("gradient/", "region/", "reward/", "kl/", "loss/", "optim/"))})
    mean = {k: statistics.fmean(h[k] for h in history if k in h and math.isfinite(h[k])) for k in keys if any(k in h and math.isfinite(h[k]) for h in history)}
    curves = {k: [h.get(k) for h in history] for k in ("reward/mean", "reward/accuracy", "gradient/zero_fraction", "region/approx_kl", "gradient/weight_mean")}
    return {
        **cell,
        "accuracy_before": result.before.accuracy if result.before else None,
        "accuracy_after": result.after.accuracy if result.after else None,
        "reward_before": result.before.mean_reward if result.before else None,
        "reward_after": result.after.mean_reward if result.after else None,
        "steps_done": len(history),
        "skipped_updates": sum(h.get("optim/skipped", 0.0) for h in history),
        "mean": mean,
        "curves": curves,
        "wall_time": result.wall_time,
    }


def _run_cell(job: tuple[str, dict[str, Any], Path]) -> str:
    name, cell, path = job
    import torch

    torch.set_num_threads(1)
    from proxim.errors import ProximError
    from proxim.train import TrainConfig, train

    overrides = {k: v for k, v in cell["settings"].items() if k not in ("advantage",)}
    settings = {
        **COMMON,
        **cell["train"],
        "preset": cell["preset"],
        "region": cell["region"],
        "advantage": cell["settings"].get("advantage"),
        "set": overrides,
        "seed": cell["seed"],
        "output_dir": str(path.parent / "folders"),
        "run_name": path.stem,
    }
    start = time.perf_counter()
    try:
        result = train(TrainConfig(**{k: v for k, v in settings.items() if v is not None}))
    except ProximError as exc:  # a run that stopped (non-finite updates): a result of the experiment, kept as such
        path.write_text(json.dumps({**cell, "failed": str(exc), "wall_time": time.perf_counter() - start}, indent=1))
        return f"{name}: stopped ({exc})"
    summary = _summary(result.run_dir, result, cell)
    path.write_text(json.dumps(summary, indent=1))
    return f"{name}: {summary['accuracy_before']} -> {summary['accuracy_after']} ({summary['wall_time']:.0f} s)"


def run(names: Sequence[str], seeds: Sequence[int], out: Path, workers: int, steps: int | None = None, only: Sequence[str] = ()) -> None:
    jobs = []
    for experiment in names:
        spec = EXPERIMENTS[experiment]
        folder = out / experiment
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            for label, preset, region, settings in spec["cells"]:
                if only and label not in only:
                    continue
                path = folder / f"{label.replace(':', '_')}-s{seed}.json"
                if not path.exists():
                    cell = {
                        "experiment": experiment,
                        "label": label,
                        "preset": preset,
                        "region": region,
                        "settings": settings,
                        "seed": seed,
                        "train": {**spec["train"], **({"steps": steps} if steps else {})},
                    }
                    jobs.append((f"{experiment}/{label}/seed {seed}", cell, path))
    print(f"{len(jobs)} runs to do, {workers} at a time", flush=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for line in pool.imap_unordered(_run_cell, jobs):
            print(time.strftime("%H:%M:%S"), line, flush=True)


# -- the report ------------------------------------------------------------------------------------


def _load(out: Path, experiment: str) -> dict[str, list[dict[str, Any]]]:
    by_label: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((out / experiment).glob("*.json")):
        row = json.loads(path.read_text())
        by_label.setdefault(row["label"], []).append(row)
    order = [c[0] for c in EXPERIMENTS[experiment]["cells"]]
    return {label: sorted(by_label[label], key=lambda r: r["seed"]) for label in order if label in by_label}


def _stat(values: Sequence[float | None], pct: bool = False, digits: int = 3) -> str:
    """``mean ± sd (n)`` over seeds; a run that stopped counts as missing and is shown."""
    got = [v for v in values if v is not None and math.isfinite(v)]
    if not got:
        return "n/a"
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(got) * scale
    sd = statistics.stdev(got) * scale if len(got) > 1 else 0.0
    unit = "%" if pct else ""
    text = f"{mean:.1f}{unit} ± {sd:.1f}" if pct else f"{mean:.{digits}f} ± {sd:.{digits}f}"
    return text + (f" ({len(got)} of {len(values)})" if len(got) < len(values) else "")


def _mean_of(rows: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    return [r.get("mean", {}).get(key) if "failed" not in r else None for r in rows]


def _after(row: dict[str, Any]) -> float | None:
    return None if "failed" in row else row.get("accuracy_after")


def _paired(rows: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]]) -> list[float | None]:
    """Each seed's accuracy after training less that of `against` for the same seed (the same warm start and
    prompts): the seed's starting point cancels, which the plain means over seeds cannot do."""
    base = {r["seed"]: _after(r) for r in against}
    return [a - b if (a := _after(r)) is not None and (b := base.get(r["seed"])) is not None else None for r in rows]


def _accuracy_table(data: dict[str, list[dict[str, Any]]], reference: dict[str, tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """Accuracy before and after per objective; `reference` maps a label to (its name, the runs it is paired with)."""
    lines = [
        "| objective | accuracy before | accuracy after | change | after, less the reference's (same seed) | held-out reward after | runs that stopped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in data.items():
        change = [(a - r["accuracy_before"]) if (a := _after(r)) is not None else None for r in rows]
        name, against = reference.get(label, ("", []))
        paired = "(the reference)" if name == label else (f"{_stat(_paired(rows, against), True)} vs {name}" if against else "–")
        lines.append(
            f"| {label} | {_stat([r.get('accuracy_before') for r in rows], True)} | {_stat([_after(r) for r in rows], True)} | "
            f"{_stat(change, True)} | {paired} | {_stat([r.get('reward_after') for r in rows])} | {sum('failed' in r for r in rows)} of {len(rows)} |"
        )
    return lines


def _references(out: Path, experiment: str, data: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """What each cell is paired with: the experiment's first cell, or the cell named in its ``reference`` mapping
    (``label -> (experiment, label)``, for a cell whose counterpart ran in another experiment)."""
    first = next(iter(data))
    mapping = EXPERIMENTS[experiment].get("reference", {})
    pairs = {}
    for label in data:
        other_experiment, other = mapping.get(label, (experiment, first))
        rows = data.get(other, []) if other_experiment == experiment else _load(out, other_experiment).get(other, [])
        pairs[label] = (other if other_experiment == experiment else f"{other} ({other_experiment})", rows)
    return pairs


DIAGNOSTIC_COLUMNS = (
    ("zero gradient, A > 0", "gradient/zero_fraction_pos", True),
    ("zero gradient, A < 0", "gradient/zero_fraction_neg", True),
    ("reversed, A > 0", "gradient/reversed_fraction_pos", True),
    ("reversed, A < 0", "gradient/reversed_fraction_neg", True),
    ("mean weight", "gradient/weight_mean", False),
    ("ratio std", "gradient/ratio_std", False),
    ("KL to old", "region/approx_kl", False),
)


def _diagnostics_table(data: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| objective | " + " | ".join(c for c, _, _ in DIAGNOSTIC_COLUMNS) + " |", "| --- |" + " ---: |" * len(DIAGNOSTIC_COLUMNS)]
    for label, rows in data.items():
        lines.append(f"| {label} | " + " | ".join(_stat(_mean_of(rows, key), pct, digits=4) for _, key, pct in DIAGNOSTIC_COLUMNS) + " |")
    return lines


def _figure(
    data: dict[str, list[dict[str, Any]]],
    key: str,
    title: str,
    ylabel: str,
    path: Path,
    percent: bool = False,
    against: tuple[str, list[dict[str, Any]]] | None = None,
) -> None:
    """One line per objective: the mean over seeds of a per-step metric (moving average over 9 steps), with a band
    of one sd over seeds either side; the legend beside the axes, so that no line hides under it.

    against: (name, runs): plot each seed's curve less that of the same seed's run here, so that the seeds'
    different starting points (their warm starts) leave the band and only the difference between objectives stays."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(10.5, 4.8), dpi=110)
    ax = fig.add_subplot()
    styles = ("-", "--", "-.", ":")
    colors = colormaps["tab10"].colors
    for i, (label, rows) in enumerate(data.items()):
        series = [r["curves"][key] for r in rows if "failed" not in r and key in r.get("curves", {})]
        if against is not None:
            if label == against[0]:
                continue
            base = {r["seed"]: r["curves"][key] for r in against[1] if "failed" not in r}
            series = [
                [a - b if a is not None and b is not None else None for a, b in zip(r["curves"][key], base[r["seed"]])]
                for r in rows
                if "failed" not in r and r["seed"] in base
            ]
        if not series:
            continue
        n = min(len(s) for s in series)
        smoothed = [
            [statistics.fmean(w) if (w := [v for v in s[max(0, t - 4) : t + 5] if v is not None and math.isfinite(v)]) else math.nan for t in range(n)]
            for s in series
        ]
        steps = list(range(1, n + 1))
        means = [statistics.fmean(col) for col in zip(*smoothed)]
        sds = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*smoothed)]
        style = styles[(i // len(colors)) % len(styles)]  # ten colours, then the next line style
        line = ax.plot(steps, means, style, color=colors[i % len(colors)], label=f"{label} ({len(series)} seeds)", linewidth=1.6)[0]
        ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)], color=line.get_color(), alpha=0.12)
    if against is not None:
        ax.axhline(0.0, color="black", linewidth=1.0, label=f"{against[0]} (the reference)")
    ax.set_title(title, loc="left", fontweight="bold", fontsize=11)
    ax.set_xlabel("step (moving average over 9 steps; band: one sd over seeds)")
    ax.set_ylabel(ylabel)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def report(out: Path) -> str:
    """The markdown of every experiment that has runs, and its figures in docs/figures/experiments/."""
    import torch
    import transformers

    sections = [
        f"Machine: {common.cpu_model()}; torch {torch.__version__}, transformers {transformers.__version__}; "
        "each run one process with one thread. Values are mean ± sd over seeds."
    ]
    steps = {name: spec["train"]["steps"] for name, spec in EXPERIMENTS.items()}
    titles = {
        "offpolicy": f"Every region off-policy (2 passes of 4 minibatches per rollout, {steps['offpolicy']} steps, arithmetic)",
        "aggressive": f"Aggressive off-policy (lr 1e-3, 4 passes of 4 minibatches, {steps['aggressive']} steps, arithmetic)",
        "aggressive3x": f"Aggressive off-policy at 3x the learning rate (lr 3e-4, 4 passes of 4 minibatches, {steps['aggressive3x']} steps, arithmetic)",
        "lampo": f"LamPO's pairwise advantage against GRPO's on reverse (on-policy, {steps['lampo']} steps, 60-step warm start)",
        "delta": f"DRPO's delta and mu weighting (off-policy as above, {steps['delta']} steps, arithmetic)",
        "halflr": f"The regions that never zero a gradient at half the learning rate (lr 5e-5, off-policy as above, {steps['halflr']} steps)",
        "withkl": f"The cispo and sapo presets with GRPO's KL to the reference (off-policy as above, {steps['withkl']} steps)",
    }
    for experiment, title in titles.items():
        data = _load(out, experiment)
        if not data:
            continue
        seeds = sorted({r["seed"] for rows in data.values() for r in rows})
        sections += [f"### {title}", "", f"Seeds: {', '.join(map(str, seeds))}.", "", *_accuracy_table(data, _references(out, experiment, data)), ""]
        if experiment != "lampo":
            sections += ["What the region did to the tokens' gradients (mean over every update of every step):", "", *_diagnostics_table(data), ""]
        figure = FIGURES / f"{experiment}.png"
        pairs = _references(out, experiment, data)
        first = next(iter(data))
        if all(name == first for name, _ in pairs.values()):  # one reference for every cell: plot the differences from it
            if experiment == "lampo":  # graded rewards: the mean reward, not exact-match accuracy, is what moves
                _figure(
                    data,
                    "reward/mean",
                    f"{experiment}: training reward, less {first}'s (same seed)",
                    "difference in mean reward",
                    figure,
                    against=(first, data[first]),
                )
            else:
                _figure(
                    data, "reward/accuracy", f"{experiment}: training accuracy, less {first}'s (same seed)", "difference in accuracy (points)", figure,
                    percent=True, against=(first, data[first]),
                )  # fmt: skip
        else:
            _figure(data, "reward/accuracy", f"{experiment}: training accuracy", "accuracy of the sampled responses", figure, percent=True)
        sections += [f"![{experiment}](figures/experiments/{experiment}.png)", ""]
        if experiment == "offpolicy":
            _figure(
                data,
                "gradient/zero_fraction",
                "offpolicy: tokens whose gradient is zero",
                "share of the tokens with A != 0",
                FIGURES / "zero_gradient.png",
                percent=True,
            )
            _figure(data, "region/approx_kl", "offpolicy: KL to the old policy per update", "nats / token", FIGURES / "kl_old.png")
            sections += ["![zero gradient](figures/experiments/zero_gradient.png)", "", "![KL to old](figures/experiments/kl_old.png)", ""]
    return "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run experiments (skipping cells already done)")
    go.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    go.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    go.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each (default 2)")
    go.add_argument("--steps", type=int, default=None, help="steps per run instead of the experiment's (a smoke run: use another --out)")
    go.add_argument("--only", nargs="+", default=(), metavar="LABEL", help="only these cells (e.g. clip drpo)")
    show = sub.add_parser("report", help="print the tables and write the figures")
    for p in (go, show):
        p.add_argument("--out", type=Path, default=Path("runs/experiments"), help="where the runs are kept (default runs/experiments)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.experiments, args.seeds, args.out, args.workers, args.steps, args.only)
    else:
        print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
