"""Shared plumbing for the hand-run benchmarks: timing, machine description, optional peers, docs/benchmarks.md.

Not part of the package and never run in CI. Timing: every implementation of one cell is timed in the
same process, round-robin (the order rotates each repeat), and the median over repeats is reported;
ratios are ratios of those medians. On a shared CPU machine other processes steal time, so use enough
repeats (a 5-50x outlier in one repeat does not move a median of 7).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEAD = """# Benchmarks

Run by hand, never in CI. Each script times its cells side by side in one process, repeats them, and
writes its own section below (the command, the machine, the versions, medians and ratios). Numbers from
different machines or different runs are not comparable; ratios within one table are. Scripts that
compare with verl and TRL need the peer environment (see [parity.md](parity.md)); without it those
columns are left out.
"""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"torch device (default: {default_device})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core machine more threads make timings erratic)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per cell; the median is reported")
    p.add_argument(
        "--clock",
        choices=("auto", "thread", "wall"),
        default="auto",
        help="thread: CPU time of this thread (time.thread_time), robust when other processes share the "
        "cores; wall: perf_counter. auto: thread on CPU with --threads 1, wall otherwise",
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats and cells: a smoke run, not for the docs")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave docs/benchmarks.md alone")
    return p


CLOCK: dict[str, Any] = {"name": "wall", "fn": time.perf_counter}


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    clock = args.clock
    if clock == "auto":
        clock = "thread" if device.type == "cpu" and args.threads == 1 else "wall"
    if clock == "thread" and (device.type != "cpu" or args.threads != 1):
        raise SystemExit("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    CLOCK.update(name=clock, fn=time.thread_time if clock == "thread" else time.perf_counter)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, min_time: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin. Each fn is first called twice (warm-up),
    then called `number` times per repeat, `number` chosen so that one repeat lasts about `min_time`."""
    clock = CLOCK["fn"]
    number = {}
    for name, fn in fns.items():
        fn()
        sync(device)
        start = clock()
        fn()
        sync(device)
        once = max(clock() - start, 1e-7)
        number[name] = max(1, min(1000, int(min_time / once)))
    samples: dict[str, list[float]] = defaultdict(list)
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = fns[name], number[name]
            sync(device)
            start = clock()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((clock() - start) / n)
    return {name: statistics.median(samples[name]) for name in names}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", "?").strip()
        cpus = fields.get("CPU(s)", "?").strip()
        return f"{model}, {cpus} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def machine(device: torch.device, threads: int) -> str:
    where = cpu_model()
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (host: {where})"
    else:
        where = f"{where}; torch threads {threads}"
    return where


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("proxim", "verl", "trl"):
        v = version(dist)
        parts.append(f"{dist} {v}" if v else f"{dist} absent")
    return ", ".join(parts)


def command() -> str:
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(ROOT)
    except ValueError:
        pass
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([str(exe), str(script), *sys.argv[1:]])


def load_verl() -> Any | None:
    """verl.trainer.ppo.core_algos, or None when verl is not installed (its columns are then skipped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import verl.trainer.ppo.core_algos as core_algos
    except Exception as exc:
        print(f"verl not importable ({type(exc).__name__}: {exc}); its columns are skipped", file=sys.stderr)
        return None
    return core_algos


def verl_actor_config(**kwargs: Any) -> Any:
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    mode = kwargs.pop("loss_mode", "vanilla")
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=PolicyLossConfig(loss_mode=mode), **kwargs)


def trl_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import trl  # noqa: F401
            from trl import GRPOTrainer  # noqa: F401
    except Exception as exc:
        print(f"trl not importable ({type(exc).__name__}: {exc}); its columns are skipped", file=sys.stderr)
        return False
    return True


def _load_peer_module(name: str) -> ModuleType:
    """``peers/<name>.py`` at the repository root, loaded by file path: the peer harnesses shared with
    tests/parity live there, outside both, so that benchmarks never import from tests (nor tests from here)."""
    path = ROOT / "peers" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"proxim_peers_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trl_harness = _load_peer_module("trl_harness")  # imports torch only; trl when called


def trl_grpo_loss(loss_type: str, mask: torch.Tensor, **config: Any) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on a stub trainer (docs/parity.md, peers/trl_harness.py); returns
    ``loss(logprobs, inputs)``. Built once; each call runs only TRL's loss code (metrics included, as in training).
    Build `inputs` with ``trl_harness.grpo_inputs``."""
    import tempfile

    return trl_harness.grpo_loss(
        loss_type, output_dir=tempfile.mkdtemp(prefix="proxim-bench-"), use_cpu=mask.device.type == "cpu", max_completion_length=mask.shape[1], **config
    )


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def proxim_train(flags: Sequence[str], env: Mapping[str, str], output_dir: Path) -> tuple[str, float]:
    """Run ``python -m proxim train FLAGS`` in a child process with `env` (over this one's, less its
    OpenMP settings), no tracker, writing into `output_dir`; returns (its stdout and stderr, whole seconds).
    A failed run ends the benchmark with the run's last output."""
    child = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    child.update(env, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "proxim", "train", *flags, "--output-dir", str(output_dir), "--tracker", "none"], env=child, capture_output=True, text=True
    )
    whole = time.perf_counter() - start
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"proxim train failed:\n{text[-3000:]}")
    return text, whole


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the section between this key's markers in docs/benchmarks.md."""
    start, end = f"<!-- benchmark:{key}:start -->", f"<!-- benchmark:{key}:end -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else DOC_HEAD
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote the '{key}' section of {DOC.relative_to(ROOT)}")


CLOCK_NOTE = {
    "thread": "CPU time of the benchmarking thread (`time.thread_time`, one torch thread): the machine is shared, "
    "and wall time there mostly measures the other tenants",
    "wall": "wall time (`time.perf_counter`, with a device synchronize around each timed batch)",
}


def header_lines(device: torch.device, threads: int, repeats: int) -> str:
    return "\n".join(
        [
            f"- command: `{command()}`",
            f"- machine: {machine(device, threads)}",
            f"- versions: {versions()}",
            f"- date: {time.strftime('%Y-%m-%d')}; medians of {repeats} repeats, all columns of a row timed round-robin in one process",
            f"- clock: {CLOCK_NOTE[CLOCK['name']]}",
        ]
    )
