"""Benchmark 7: torch's thread count for ``proxim train``, on an idle machine and beside busy processes.

Each cell is a fresh ``python -m proxim train`` child process; the machine's load is made by ``--busy N``
child processes that spin a Python loop (what another program on a laptop does to the cores) and run for
the whole cell. Cells, all in one run, alternating:

  threads 1 / threads 2 / auto        ``--threads`` (auto: the idle cores at the start, the default)
  2 + OMP_WAIT_POLICY=PASSIVE         two threads whose OpenMP workers sleep instead of spinning

``--job steps`` (default) times the RL loop of ``proxim train --steps 40 --warmstart-steps 0`` (its own
"steps/s" line); ``--job readme`` times the README's command, ``proxim train`` with no arguments, from an
empty cache (warm start included), whole process.

    python benchmarks/threads.py                       # idle, then beside 2 busy processes
    python benchmarks/threads.py --job readme --busy 0 2 --repeats 1
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

CELLS = {
    "1 thread": ({}, ["--threads", "1"]),
    "2 threads": ({}, ["--threads", "2"]),
    "2, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", "2"]),
    "auto": ({}, ["--threads", "auto"]),
}
JOBS = {"steps": ["--steps", "40", "--warmstart-steps", "0", "--eval-size", "20"], "readme": []}
SPIN = "while True: pass"


def _cell(job: str, env_extra: dict[str, str], flags: list[str]) -> tuple[float, str]:
    """Run one cell; returns (its figure: RL steps/s for `steps`, whole seconds for `readme`, and the thread line)."""
    with tempfile.TemporaryDirectory() as tmp:
        text, whole = common.proxim_train([*JOBS[job], *flags], {**env_extra, "PROXIM_CACHE_DIR": str(Path(tmp) / "cache")}, Path(tmp) / "runs")
    chosen = re.search(r"torch threads: (\d+)", text)
    rate = re.search(r"([\d.]+) steps/s", text)
    if rate is None:
        raise SystemExit(f"no steps/s line in the output:\n{text[-2000:]}")
    return (float(rate.group(1)) if job == "steps" else whole), (chosen.group(1) if chosen else "?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=sorted(JOBS), default="steps")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy processes beside each cell (default: 0, then 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    unit = "RL steps/s (higher is faster)" if args.job == "steps" else "whole-process seconds (lower is faster)"
    results: dict[tuple[int, str], list[float]] = {}
    chosen: dict[tuple[int, str], set[str]] = {}
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            for repeat in range(args.repeats):
                order = args.cells[repeat % len(args.cells) :] + args.cells[: repeat % len(args.cells)]
                for name in order:
                    value, threads = _cell(args.job, *CELLS[name])
                    results.setdefault((busy, name), []).append(value)
                    chosen.setdefault((busy, name), set()).add(threads)
                    print(f"busy {busy}, {name}: {value:.2f} (threads {threads})", flush=True)
        finally:
            for s in spinners:
                s.kill()
    rows = []
    for name in args.cells:
        row = [name]
        for busy in args.busy:
            row.append(f"{statistics.median(results[(busy, name)]):.2f} (threads {'/'.join(sorted(chosen[(busy, name)]))})")
        base = statistics.median(results[(args.busy[0], name)])
        for busy in args.busy[1:]:
            other = statistics.median(results[(busy, name)])
            row.append(f"{(base / other if args.job == 'steps' else other / base):.2f}x")
        rows.append(row)
    header = ["cell", *(f"{b} busy" for b in args.busy), *(f"slowdown at {b} busy" for b in args.busy[1:])]
    body = (
        f"`proxim train` {'--steps 40 --warmstart-steps 0' if args.job == 'steps' else '(the README job, empty cache)'}: {unit}; "
        f"medians of {args.repeats}; busy processes spin a Python loop beside the run.\n\n"
        f"- command: `{common.command()}`\n- machine: {common.cpu_model()}\n- versions: {common.versions()}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n" + common.table(header, rows)
    )
    print(body)
    if not args.no_write:
        common.write_section(f"threads-{args.job}", f"7. Threads ({args.job})", body)


if __name__ == "__main__":
    main()
