"""Processes and devices: the accelerator every recipe runs on, its precision, one reduction of a step's
metrics, and the check that every process runs the same objective and configuration.

Launch several processes with ``accelerate launch`` (or torchrun); on a machine without CUDA the processes
form a gloo group on the CPU. An FSDP configuration (``examples/accelerate/fsdp2.yaml``) shards the models
on CPU as on GPUs (`proxim.train.sharding`).

Precision (`choose_precision`): the ``mixed_precision`` setting, ``auto`` by default, is bf16 autocast on a
CUDA GPU that supports bfloat16, and float32 elsewhere (CPU, older GPUs); ``fp16`` is chosen explicitly and
then trains with accelerate's loss scaler (`loss_scaling`); ``no`` is float32 everywhere. The weights stay
float32 in every case (autocast computes in the low precision; the optimiser updates float32 weights).
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

#: The ``mixed_precision`` setting's values: ``auto`` (chosen from the device) and accelerate's own three.
PRECISIONS = ("auto", "no", "fp16", "bf16")


def make_accelerator(mixed_precision: str, tracker: str, project_dir: str | os.PathLike[str]) -> Accelerator:
    """The `accelerate.Accelerator` of a run: devices, precision (`choose_precision`), processes, sharding, and its tracker.

    Trackers write under ``<run folder>/tensorboard``; `project_dir` is the folder that holds run folders.
    """
    from accelerate import Accelerator

    from proxim.train import sharding

    cpu = cpu_processes()
    precision = resolved_precision(mixed_precision)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=tracker_name(tracker),
        project_dir=str(Path(project_dir)),
        step_scheduler_with_optimizer=False,
    )
    if cpu:
        sharding.enable_on_cpu(accelerator, precision)
    sharding.check_supported(accelerator)
    return accelerator


def resolved_precision(setting: str) -> str:
    """`choose_precision` on this machine under this launch: whether the processes run on a CUDA GPU (not with
    ``accelerate launch --cpu``), whether it supports bfloat16, and the launcher's ``--mixed_precision``."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    on_cuda = torch.cuda.is_available() and not use_cpu
    return choose_precision(
        setting, cuda=on_cuda, bf16_supported=on_cuda and torch.cuda.is_bf16_supported(), launcher=os.environ.get("ACCELERATE_MIXED_PRECISION")
    )


def choose_precision(setting: str, *, cuda: bool, bf16_supported: bool, launcher: str | None = None) -> str:
    """The accelerate ``mixed_precision`` of a run: ``no`` (float32), ``fp16`` or ``bf16``.

    setting: the ``mixed_precision`` setting. ``auto`` takes the launcher's ``fp16`` or ``bf16`` when
    ``accelerate launch`` names one (`launcher`: its ACCELERATE_MIXED_PRECISION; its ``no`` is also its
    default, so it does not count as a choice), else ``bf16`` on a CUDA GPU with bfloat16
    (``torch.cuda.is_bf16_supported()``: Ampere and later), else ``no``. An explicit value is kept, and
    overrides the launcher's. fp16 needs a CUDA GPU: its loss scaler (`loss_scaling`) runs there only,
    and accelerate would otherwise train in float32 without saying so.
    """
    if setting not in PRECISIONS:
        raise ConfigurationError(f"mixed_precision={setting!r}: expected one of {', '.join(PRECISIONS)}.")
    chosen = setting
    if setting == "auto":
        chosen = launcher if launcher in ("fp16", "bf16") else "bf16" if cuda and bf16_supported else "no"
    if chosen == "fp16" and not cuda:
        raise ConfigurationError(
            "mixed_precision='fp16' needs a CUDA GPU (float16 autocast and its loss scaling run there); "
            "on CPU use mixed_precision='no' (float32, the default there) or 'bf16'."
        )
    return chosen


def loss_scaling(precision: str, device_type: str) -> bool:
    """Whether accelerate scales the loss (a ``torch.amp.GradScaler``, ``accelerator.scaler``): fp16 on a GPU.

    bf16 has float32's exponent range and needs none; accelerate never creates one on CPU."""
    return precision == "fp16" and device_type != "cpu"


def cpu_processes() -> bool:
    """True for a multi-process launch (torchrun's WORLD_SIZE > 1) on a machine without CUDA.

    accelerate only forms a CPU process group (gloo) when told it runs on CPU; `accelerate launch
    --multi_gpu --num_processes N` (or with a DDP or FSDP config file) or `torchrun --nproc_per_node N` on a
    CPU-only machine sets the process variables but not that flag, and each process would otherwise train
    alone. (`accelerate launch --cpu` is no way round it: it starts a single process.)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return not torch.cuda.is_available()
    if os.environ.get("MASTER_ADDR") and "ACCELERATE_MIXED_PRECISION" in os.environ and not torch.cuda.is_available():
        # accelerate's simple launcher: `--num_processes N` without --multi_gpu (or with --cpu) starts ONE process on CPU
        print(
            "proxim: accelerate started a single process. On a machine without GPUs, accelerate launch starts several only "
            "with --multi_gpu or a config file (and without --cpu; proxim runs them on CPU itself): accelerate launch --multi_gpu "
            "--num_processes 2 -m proxim train, or accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 -m proxim train",
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
    """The mean over processes of each metric, in one all-reduce; a metric that only some processes report
    (a diagnostic of data only one of them has) is averaged over those that do.

    With several processes the metric names are gathered first: a reduction over name lists that differ
    would mix up metrics, or, with different lengths, fail inside the collective."""
    keys = sorted(values)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted({k for names in gather_object([keys]) for k in names})
    if not keys:
        return {}
    present = [k in values for k in keys]
    numbers = [
        torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(()) if k in values else torch.zeros((), dtype=torch.float64) for k in keys
    ]
    stacked = torch.stack([torch.stack(numbers), torch.tensor(present, dtype=torch.float64)]).to(accelerator.device)
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="sum")
    total, count = stacked.cpu()
    return {k: float(t / c) for k, t, c in zip(keys, total.tolist(), count.tolist())}


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
