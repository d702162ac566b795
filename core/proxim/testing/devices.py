"""The device the running check calls parts on, and moving inputs and outputs to and from it.

Inputs are drawn on the CPU and moved to the check's device; outputs are compared on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import overload

import torch
from torch import Tensor

from proxim.parts import RegionOutput
from proxim.rollout import Estimate, Rollout

CPU = torch.device("cpu")

_DEVICE: ContextVar[torch.device] = ContextVar("proxim_testing_device", default=CPU)


def current_device() -> torch.device:
    """The device the running check calls parts on (the CPU outside a check)."""
    return _DEVICE.get()


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Within the block, `current_device` is `device`."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


@overload
def to_device(obj: Tensor, device: torch.device) -> Tensor: ...
@overload
def to_device(obj: Rollout, device: torch.device) -> Rollout: ...
@overload
def to_device(obj: None, device: torch.device) -> None: ...
@overload
def to_device(obj: Tensor | None, device: torch.device) -> Tensor | None: ...
@overload
def to_device(obj: object, device: torch.device) -> object: ...


def to_device(obj: object, device: torch.device) -> object:
    """`obj` (a tensor, Rollout, Estimate or RegionOutput; anything else unchanged) with its tensors on `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Rollout):
        fields = {name: getattr(obj, name) for name in Rollout._FIELDS}
        if all(t is None or t.device == device for t in fields.values()):
            return obj
        return Rollout(**{name: to_device(t, device) for name, t in fields.items()})
    if isinstance(obj, Estimate):
        metrics = {k: to_device(v, device) for k, v in obj.metrics.items()} if isinstance(obj.metrics, Mapping) else obj.metrics
        return Estimate(
            advantages=to_device(obj.advantages, device), returns=to_device(obj.returns, device), rewards=to_device(obj.rewards, device), metrics=metrics
        )
    if isinstance(obj, RegionOutput):
        metrics = {k: to_device(v, device) for k, v in obj.metrics.items()} if isinstance(obj.metrics, Mapping) else obj.metrics
        return RegionOutput(loss=to_device(obj.loss, device), metrics=metrics)
    return obj
