"""How many CPU threads torch uses in a run: the ``threads`` setting.

``auto`` (the default) gives each process the cores that nothing else is using when the run starts,
shared among the processes of one launch on this machine, and at least one. Measured on a 2-core machine
(`docs/benchmarks.md`, section "Threads"): on an idle machine two threads run the tiny default model's RL
steps 1.55x faster than one; beside two busy processes two threads are 9% slower than one, because
torch's OpenMP threads wait for each other at every operation while the neighbours hold the cores. The
count is decided once, at the start (an environment's ``OMP_NUM_THREADS`` wins over the measurement):
torch's results depend on the thread count in their last bits, so a run keeps one count throughout, and
a resumed run takes its checkpoint's (`Session.restore`), so that it continues bit for bit.

OpenMP's wait policy is left as it is: ``OMP_WAIT_POLICY=PASSIVE`` with two threads was slower than the
default both idle (0.72x) and beside busy processes (0.93x of one thread). Inter-op threads are left to
torch: a training step runs no inter-op parallel work.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import attrs

from proxim.errors import ConfigurationError

#: How long `idle_cores` watches the machine before a run starts.
SAMPLE_SECONDS = 0.3


def check_setting(value: str) -> None:
    """Refuse a ``threads`` value that is neither ``auto`` nor a positive whole number."""
    if value == "auto":
        return
    if not value.isdigit() or int(value) < 1:
        raise ConfigurationError(f"threads={value!r}: expected 'auto' (the idle cores, decided at the start) or a number of threads of at least 1.")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system says, else all of them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _busy_and_total() -> tuple[int, int] | None:
    """The machine's busy and total CPU time so far, in clock ticks (Linux ``/proc/stat``); None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def idle_cores(seconds: float = SAMPLE_SECONDS, read: Callable[[], tuple[int, int] | None] = _busy_and_total) -> float | None:
    """How many of the machine's cores other processes left idle over the next `seconds` (this process sleeps
    meanwhile); None where the system does not say (then `auto` takes every usable core)."""
    before = read()
    time.sleep(seconds)
    after = read()
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy_share = (after[0] - before[0]) / (after[1] - before[1])
    return (1.0 - busy_share) * (os.cpu_count() or 1)


@attrs.frozen
class ThreadChoice:
    """The threads a process uses and why (printed in the run's header)."""

    count: int
    reason: str


def choose(setting: str, local_processes: int = 1, idle: Callable[[], float | None] = idle_cores) -> ThreadChoice:
    """The thread count for `setting` (``auto`` or a number) in one of `local_processes` processes on this machine."""
    check_setting(setting)
    if setting != "auto":
        return ThreadChoice(int(setting), "threads setting")
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return ThreadChoice(max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS")
    usable = usable_cores()
    free = idle()
    if free is None:
        return ThreadChoice(max(1, usable // local_processes), f"{usable} usable cores over {local_processes} process(es)")
    count = max(1, min(usable, math.floor(free + 0.5)) // local_processes)
    return ThreadChoice(count, f"auto: {free:.1f} of {usable} cores idle, {local_processes} process(es) here")


def apply(count: int) -> None:
    """Make torch use `count` threads in this process."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
