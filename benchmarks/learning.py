"""Benchmark 5: held-out accuracy against step on the default task, for every preset, over several seeds.

Each (preset, seed) is one `proxim train` run in its own process with `--eval-every K`: the held-out set
(greedy decoding) is scored before training, every K steps and after the last step. Runs go through a pool
of `--jobs` processes (each with `--threads` torch threads) and their curves are collected from the run
folders, so a sweep that was cut short can be finished or re-tabled with `--collect` alone. With `--trl`
(in the peer environment) TRL's `GRPOTrainer` is trained with the same budget on the same model, prompts and
reward through `peers/trl_trainer.py`, and appears as one more row.

The table gives mean and spread over seeds at a few steps; the plot (docs/learning.png) draws the mean
curve of each preset.

    python benchmarks/learning.py --jobs 2                     # every preset, seeds 0 1 2, 200 steps
    python benchmarks/learning.py --collect --output-dir DIR   # only re-read finished runs
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

LEARNING_PNG = _common.ROOT / "docs" / "learning.png"


def online_presets() -> list[str]:
    """Every registered preset (the online ones: preference losses such as dpo are a registry of their own)."""
    import proxim

    return sorted(proxim.available()["preset"])


def train_command(preset: str, seed: int, args: argparse.Namespace, output_dir: Path | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxim",
        "train",
        "--preset",
        preset,
        "--seed",
        str(seed),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--output-dir",
        str(output_dir or args.output_dir),
        "--run-name",
        f"{preset}-seed{seed}",
        "--save-every",
        "0",
        "--tracker",
        "none",
        "--quiet",
        *args.train_args,
    ]


def run_one(cmd: list[str], run_dir: Path, threads: int, deadline: float) -> tuple[Path, str, float]:
    """Run one `proxim train`; it is skipped, or stopped, at `deadline` (a perf_counter time)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if start >= deadline:
        return run_dir, "skipped (--time-limit)", 0.0
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=deadline - start).returncode
        except subprocess.TimeoutExpired:
            return run_dir, "stopped (--time-limit)", time.perf_counter() - start
    status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {run_dir}.log)"
    return run_dir, status, time.perf_counter() - start


def curve(run_dir: Path) -> list[tuple[int, float]] | None:
    """(step, held-out accuracy) from a finished run folder: before at step 0, every K steps, after."""
    eval_path, metrics_path = run_dir / "eval.json", run_dir / "metrics.jsonl"
    if not eval_path.is_file() or not metrics_path.is_file():
        return None
    evals = json.loads(eval_path.read_text())
    if "after" not in evals:
        return None
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    points = [(0, evals["before"]["accuracy"])]
    points += [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
    points.append((history[-1]["step"], evals["after"]["accuracy"]))
    return points


def collect(output_dir: Path) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """{preset: {seed: curve}} for every finished run under output_dir (folders named <preset>-seed<k>)."""
    found: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for run_dir in sorted(p for p in output_dir.glob("*-seed*") if p.is_dir()):
        preset, _, seed = run_dir.name.rpartition("-seed")
        points = curve(run_dir)
        if points is not None:
            found.setdefault(preset, {})[int(seed)] = points
    return found


def mean_curve(curves: dict[int, list[tuple[int, float]]]) -> list[tuple[float, float]]:
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves.values())))
    by_seed = [dict(c) for c in curves.values()]
    return [(float(s), statistics.fmean(c[s] for c in by_seed)) for s in steps]


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}%"
    return f"{100 * statistics.fmean(values):.1f}% ± {100 * statistics.stdev(values):.1f}"


def table(results: dict[str, dict[int, list[tuple[int, float]]]]) -> str:
    steps = [s for s, _ in next(iter(next(iter(results.values())).values()))]
    marks = sorted({min(steps, key=lambda s: abs(s - target)) for target in (0, steps[-1] / 4, steps[-1] / 2, steps[-1])})
    lines = [
        "| preset | seeds | " + " | ".join(f"step {m}" for m in marks) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in marks) + " |",
    ]
    for preset in sorted(results, key=lambda p: (p.startswith("trl"), p)):
        curves = results[preset]
        cells = []
        for m in marks:
            values = [dict(c)[m] for c in curves.values() if m in dict(c)]
            cells.append(_cell(values) if values else "n/a")
        lines.append(f"| {preset} | {len(curves)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(results: dict[str, dict[int, list[tuple[int, float]]]]) -> str:
    """Accuracy before -> after of each run: the seeds' warm starts differ, and the mean hides that."""
    seeds = sorted({seed for curves in results.values() for seed in curves})
    lines = ["| preset | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- | " + " | ".join("---:" for _ in seeds) + " |"]
    for preset in sorted(results):
        curves = results[preset]
        cells = [f"{100 * curves[s][0][1]:.1f}% → {100 * curves[s][-1][1]:.1f}%" if s in curves else "n/a" for s in seeds]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> None:
    jobs = [(p, s) for s in args.seeds for p in args.presets]  # seed-major: every preset gets a first seed early
    todo = [(p, s) for p, s in jobs if curve(args.output_dir / f"{p}-seed{s}") is None]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already finished; {args.jobs} at a time", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # one 1-step run per seed first, so that the warm start of each seed is made once and cached,
        # rather than by every run of the first wave at the same time
        warm = args.output_dir / ".warm"
        seeds = sorted({s for _, s in todo})
        deadline = time.perf_counter() + args.time_limit
        list(
            pool.map(
                lambda s: run_one([*train_command("grpo", s, args, warm), "--steps", "1", "--eval-size", "1"], warm / f"seed{s}", args.threads, deadline), seeds
            )
        )
        futures = [pool.submit(run_one, train_command(p, s, args), args.output_dir / f"{p}-seed{s}", args.threads, deadline) for p, s in todo]
        for future in concurrent.futures.as_completed(futures):
            run_dir, status, seconds = future.result()
            print(f"  {run_dir.name}: {status}, {seconds:.0f} s", file=sys.stderr)


def trl_sweep(args: argparse.Namespace) -> None:
    """proxim grpo and TRL GRPO, each seed from the same saved warm start, on this machine, one after the other.

    The warm start of each seed is saved by `proxim sft` (it is `proxim train`'s own warm start), and both
    trainers start from that directory: proxim with `--init`, TRL through `peers/trl_trainer.py`. Their rows
    are `grpo_vs_trl` and `trl_grpo`.
    """
    for seed in args.seeds:
        sft_dir = args.output_dir / ".sft" / f"seed{seed}"
        if not (sft_dir / "model" / "config.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "proxim", "sft", "--seed", str(seed), "--output-dir", str(sft_dir.parent), "--run-name", sft_dir.name, "--quiet"],
                check=True,
                env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
            )
        proxim_run = args.output_dir / f"grpo_vs_trl-seed{seed}"
        if curve(proxim_run) is None:
            cmd = [*train_command("grpo", seed, args), "--init", str(sft_dir / "model"), "--run-name", proxim_run.name]
            print(f"  {proxim_run.name}: {run_one(cmd, proxim_run, args.threads, float('inf'))[1]}", file=sys.stderr)
        trl_run = args.output_dir / f"trl_grpo-seed{seed}"
        if curve(trl_run) is None:
            cmd = [
                sys.executable,
                __file__,
                "--trl-child",
                json.dumps({"seed": seed, "steps": args.steps, "eval_every": args.eval_every, "model": str(sft_dir / "model"), "run_dir": str(trl_run)}),
            ]
            print(f"  {trl_run.name}: {run_one(cmd, trl_run, args.threads, float('inf'))[1]}", file=sys.stderr)


def trl_child(spec: dict[str, Any]) -> None:
    """One TRL GRPO run with proxim grpo's default settings, evaluated like proxim's runs (same generator, greedy,
    the task's held-out set), written in proxim's run-folder format (eval.json, metrics.jsonl) for `collect`."""
    import warnings

    import torch
    from transformers import TrainerCallback

    import proxim
    from proxim.train import TrainConfig
    from proxim.train.evaluation import task_accuracy

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    defaults = TrainConfig()
    grpo = proxim.objective("grpo")
    task = proxim.default_registry().get("task", defaults.task)()
    peer = _common._load_peer_module("trl_trainer")
    rows, reward = peer.task_prompts_and_reward(task, spec["seed"], spec["steps"], defaults.prompts_per_step)
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("")
    evals: dict[str, Any] = {}

    def evaluate(model: Any, tokenizer: Any) -> float:
        accuracy = task_accuracy(model, tokenizer, task, defaults.max_new_tokens_for(task))
        assert accuracy is not None
        return accuracy

    def record(step: int, accuracy: float | None) -> None:
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **({"eval/accuracy": accuracy} if accuracy is not None else {})}) + "\n")

    class HeldOut(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **_: Any) -> None:
            evals["before"] = {"accuracy": evaluate(model, processing_class)}

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **_: Any) -> None:
            step = state.global_step
            periodic = step % spec["eval_every"] == 0 and step < spec["steps"]
            record(step, evaluate(model, processing_class) if periodic else None)

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **_: Any) -> None:
            evals["after"] = {"accuracy": evaluate(model, processing_class)}
            (run_dir / "eval.json").write_text(json.dumps(evals, indent=2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = peer.grpo_trainer(
            spec["model"],
            rows,
            reward,
            output_dir=str(run_dir / "trl"),
            group_size=defaults.group_size,
            prompts_per_step=defaults.prompts_per_step,
            steps=spec["steps"],
            max_new_tokens=defaults.max_new_tokens_for(task),
            lr=defaults.lr,
            beta=grpo.options.kl_coef,
            temperature=defaults.temperature,
            seed=spec["seed"],
            callbacks=[HeldOut()],
        )
        trainer.train()


def record_sweep(args: argparse.Namespace, seconds: float) -> None:
    """Write where and how the runs were made into output_dir/sweep.json, for the docs (also after --collect)."""
    import torch

    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the runs see this process's devices
    info = {
        "command": f"`{_common.command()}`",
        "machine": f"{_common.machine(where, args.threads)}; {args.jobs} runs at a time",
        "versions": _common.versions(),
        "date": time.strftime("%Y-%m-%d"),
        "budget": f"{args.steps} steps per run, held-out evaluation every {args.eval_every} steps; sweep wall time {seconds:.0f} s",
    }
    (args.output_dir / "sweep.json").write_text(json.dumps(info, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=None, help="presets to train (default: every online preset; none with --trl alone)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--output-dir", type=Path, default=Path("runs/learning"))
    p.add_argument("--time-limit", type=float, default=float("inf"), help="seconds: start no run after this, stop those running")
    p.add_argument("--collect", action="store_true", help="train nothing; table and plot the finished runs")
    p.add_argument("--trl", action="store_true", help="also train TRL's GRPOTrainer with the same budget (peer environment)")
    p.add_argument("--quick", action="store_true", help="2 presets, 1 seed, 10 steps on a tiny model: a smoke run")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/ alone")
    p.add_argument("train_args", nargs="*", help="more `proxim train` flags, after --")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_child:
        trl_child(json.loads(args.trl_child))
        return
    if args.quick:
        args.presets = args.presets or ["grpo", "rloo"]
        args.seeds, args.steps, args.eval_every = args.seeds[:1], 10, 5
        args.train_args += ["--tiny-hidden-size", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--warmstart-steps", "20", "--eval-size", "16"]
        args.no_write = True
    args.presets = online_presets() if args.presets is None else args.presets
    started = time.perf_counter()
    if not args.collect:
        sweep(args)
        if args.trl:
            trl_sweep(args)
        record_sweep(args, time.perf_counter() - started)
    results = collect(args.output_dir)
    if not results:
        raise SystemExit(f"no finished run under {args.output_dir}")
    text = table(results)
    print(text)
    if args.no_write:
        return
    from proxim.figures import Panel, Series, write_figure

    trl = "trl_grpo" in results
    png = LEARNING_PNG.with_name("learning_trl.png") if trl else LEARNING_PNG
    names = sorted(results)
    per_panel = 6  # the legend of one panel holds about six names
    panels = [names[i : i + per_panel] for i in range(0, len(names), per_panel)]
    curves = [
        Panel("Held-out accuracy, mean over seeds", "accuracy (greedy)", [Series(p, mean_curve(results[p])) for p in panel], percent=True) for panel in panels
    ]
    write_figure(png, curves, title="proxim presets on arithmetic")
    intro = (
        "proxim grpo (`grpo_vs_trl`) and TRL's GRPOTrainer (`trl_grpo`), each seed starting from the same saved warm "
        "start (`proxim sft --seed S`), with proxim grpo's defaults on both sides (TRL's settings: `peers/trl_trainer.py`, "
        "listed in section 4) and the same prompts in the same order; TRL's model is evaluated by proxim's own greedy "
        "generator on the same held-out set every K steps (a callback)."
        if trl
        else "Held-out accuracy (greedy decoding, the task's 200 held-out prompts) against training step, mean ± standard "
        "deviation over seeds; every other setting is `proxim train`'s default."
    )
    body = "\n".join(
        [
            intro + " The mean curves:",
            "",
            f"![held-out accuracy against step]({png.name})",
            "",
            text,
            "",
            "Each run, before → after:",
            "",
            per_seed_table(results),
        ]
    )
    sweep_info = json.loads((args.output_dir / "sweep.json").read_text())
    header = "\n".join(f"- {key}: {sweep_info[key]}" for key in ("command", "machine", "versions", "date", "budget"))
    key, title = ("learning-trl", "5b. Learning curves: proxim and TRL from the same warm start") if trl else ("learning", "5. Learning curves")
    _common.write_section(key, title, header + "\n\n" + body)


if __name__ == "__main__":
    main()
