"""Processes and devices: the accelerator every recipe runs on, one reduction of a step's metrics, and the
check that every process runs the same objective and configuration.

Launch several processes with ``accelerate launch`` (or torchrun); on a machine without CUDA the processes
form a gloo group on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from proxim.errors import ConfigurationError, TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(mixed_precision: str, tracker: str, project_dir: str | os.PathLike[str]) -> Accelerator:
    """The `accelerate.Accelerator` of a run: devices, mixed precision, processes, and its tracker.

    Trackers write under ``<run folder>/tensorboard``; `project_dir` is the folder that holds run folders.
    """
    from accelerate import Accelerator

    return Accelerator(
        cpu=cpu_processes(),
        mixed_precision=mixed_precision,
        log_with=tracker_name(tracker),
        project_dir=str(Path(project_dir)),
        step_scheduler_with_optimizer=False,
    )


def cpu_processes() -> bool:
    """True for a multi-process launch (torchrun's WORLD_SIZE > 1) on a machine without CUDA.

    accelerate only forms a CPU process group (gloo) when told it runs on CPU; `accelerate launch
    --multi_gpu --num_processes N` or `torchrun --nproc_per_node N` on a CPU-only machine sets the
    process variables but not that flag, and each process would otherwise train alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return not torch.cuda.is_available()
    if os.environ.get("MASTER_ADDR") and "ACCELERATE_MIXED_PRECISION" in os.environ and not torch.cuda.is_available():
        # accelerate's simple launcher: `--num_processes N` without --multi_gpu starts ONE process on CPU
        print(
            "proxim: accelerate started a single process. On a machine without GPUs, accelerate launch needs "
            "--multi_gpu to start several (it then runs them on CPU): accelerate launch --multi_gpu --num_processes 2 -m proxim train",
            file=sys.stderr,
        )
    return False


def tracker_name(choice: str) -> str | None:
    """The accelerate tracker for the ``tracker`` setting: auto (tensorboard when installed), tensorboard, none."""
    if choice == "none":
        return None
    available = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
    if choice == "tensorboard" and not available:
        raise ConfigurationError("tracker='tensorboard' but neither tensorboard nor tensorboardX is installed.")
    return "tensorboard" if available else None


def reduce_mean(accelerator: Accelerator, values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each metric (the keys are the same on every process), in one all-reduce."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(()) for k in keys]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(keys, stacked.cpu().tolist()))


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process (one all-reduce with several processes), so that all take the same branch."""
    if accelerator.num_processes == 1:
        return flag
    value = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="max")
    return bool(value > 0)


def check_same_across_ranks(values: Sequence[str], what: str) -> None:
    """Raise `TrainingError` naming each rank's value unless all processes hold the same `what`."""
    if len(set(values)) > 1:
        listing = "\n".join(f"  rank {i}: {v}" for i, v in enumerate(values))
        raise TrainingError(
            f"the processes disagree on the {what}; every process must build the same objective (same proxim version, plugins and configuration):\n{listing}"
        )


def agree(accelerator: Accelerator, value: str, what: str) -> None:
    """Gather `value` from every process and check that they are all the same (`check_same_across_ranks`)."""
    from accelerate.utils import gather_object

    check_same_across_ranks(gather_object([value]) if accelerator.num_processes > 1 else [value], what)


def leave_process_group() -> None:
    """Release the process group before the process exits: under `accelerate launch`, a rank that exits while
    gloo still holds it can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
