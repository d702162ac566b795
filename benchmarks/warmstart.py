"""Benchmark 8: the warm start of ``proxim train``: its cost cold and cached, and how far its result moves.

The "before" accuracy of the README job is the held-out accuracy of the warm-started model: 600 supervised
steps, computed on the user's machine, not shipped. This runs ``python -m proxim train --steps 1`` in a child
process for each seed and torch thread count, each from an empty cache, and reads the warm start's time
and the "before" accuracy (200 held-out prompts, greedy) from its output; then the first cell again with
its cache kept, to time a cached start. A thread count may change the last bits of torch's sums, as another
machine or torch build does; the thread columns show whether that moves the result.

    python benchmarks/warmstart.py                     # seeds 0-4, 1 and 2 threads
    python benchmarks/warmstart.py --seeds 0 1 --threads 2 --no-write
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common


def _run(seed: int, threads: int, cache: Path, runs: Path) -> tuple[float, float, float, str]:
    """One ``proxim train --steps 1``; returns (before accuracy, warm start seconds, whole seconds, how it started)."""
    flags = ["--steps", "1", "--seed", str(seed), "--threads", str(threads)]
    text, whole = common.proxim_train(flags, {"PROXIM_CACHE_DIR": str(cache)}, runs)
    accuracy = re.search(r"\| accuracy \| ([\d.]+)% \|", text)
    warm = re.search(r"warm start: .*?(trained in (\d+) s|loaded from the cache)", text)
    if accuracy is None or warm is None:
        raise SystemExit(f"no accuracy table or warm start line in the output:\n{text[-2000:]}")
    seconds = float(warm.group(2)) if warm.group(2) else 0.0
    return float(accuracy.group(1)), seconds, whole, "cached" if warm.group(2) is None else "cold"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    before: dict[tuple[int, int], float] = {}
    cold: list[float] = []
    whole_cold: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                cache = Path(tmp) / f"cache-{seed}-{threads}"
                accuracy, seconds, whole, how = _run(seed, threads, cache, Path(tmp) / "runs")
                before[(seed, threads)] = accuracy
                cold.append(seconds)
                whole_cold.append(whole)
                print(f"seed {seed}, {threads} thread(s): before {accuracy:.1f}%, warm start {seconds:.0f} s ({how}), whole {whole:.1f} s", flush=True)
        first = Path(tmp) / f"cache-{args.seeds[0]}-{args.threads[0]}"
        again, seconds, whole_cached, how = _run(args.seeds[0], args.threads[0], first, Path(tmp) / "runs")
        print(f"seed {args.seeds[0]}, {args.threads[0]} thread(s) again: before {again:.1f}%, {how}, whole {whole_cached:.1f} s", flush=True)
    rows = [[str(seed), *(f"{before[(seed, t)]:.1f}%" for t in args.threads)] for seed in args.seeds]
    values = list(before.values())
    for t in args.threads:
        column = [before[(s, t)] for s in args.seeds]
        rows.append([f"range over seeds, {t} thread(s)", f"{min(column):.1f}% to {max(column):.1f}%", *([""] * (len(args.threads) - 1))])
    body = (
        "`python -m proxim train --steps 1 --seed S --threads N`, each from an empty cache: the held-out accuracy of the "
        "warm-started model ('before', 200 prompts, greedy) and the warm start's time.\n\n"
        f"- command: `{common.command()}`\n- machine: {common.cpu_model()}\n- versions: {common.versions()}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        + common.table(["seed", *(f"{t} thread(s)" for t in args.threads)], rows)
        + f"\n\n- every cell: {min(values):.1f}% to {max(values):.1f}% (median {statistics.median(values):.1f}%)\n"
        f"- warm start, cold: median {statistics.median(cold):.0f} s ({min(cold):.0f} to {max(cold):.0f} s); "
        f"whole process `--steps 1` cold: median {statistics.median(whole_cold):.1f} s, cached: {whole_cached:.1f} s "
        f"(the same cell again: before {again:.1f}%, {how})"
    )
    print(body)
    if not args.no_write:
        common.write_section("warmstart", "8. Warm start", body)


if __name__ == "__main__":
    main()
