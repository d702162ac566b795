"""The kit's settings for this process: hypothesis examples per check, and the device parts are called on.

Each is resolved as: the explicit argument, else the process default (set by the pytest options), else
the environment variable, else the built-in default.
"""

from __future__ import annotations

import os

import torch

DEFAULT_MAX_EXAMPLES = 25
"""Examples per check unless told otherwise (``max_examples=``, ``--proxim-max-examples``, or the
``PROXIM_TESTING_MAX_EXAMPLES`` environment variable).
"""
_MAX_EXAMPLES_ENV = "PROXIM_TESTING_MAX_EXAMPLES"
_DEVICE_ENV = "PROXIM_TESTING_DEVICE"
"""The device parts are called on unless told otherwise (``device=``, ``--proxim-device``, or
``PROXIM_TESTING_DEVICE``). Inputs are drawn on the CPU and moved there; outputs are compared on the CPU.
"""

_configured_max_examples: int | None = None
_configured_device: str | None = None


def set_default_max_examples(n: int | None) -> None:
    """Set the examples per check for this process (the pytest option does this); None restores the default."""
    global _configured_max_examples
    _configured_max_examples = n


def set_default_device(device: str | None) -> None:
    """Set the device parts are called on for this process (the pytest option does this); None: the default."""
    global _configured_device
    _configured_device = device


def resolve_device(explicit: str | None = None) -> torch.device:
    """`explicit`, else the configured default, else ``$PROXIM_TESTING_DEVICE``, else the CPU."""
    name = explicit or _configured_device or os.environ.get(_DEVICE_ENV, "").strip() or "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # what tensors report: cuda:0, not cuda
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_max_examples(explicit: int | None = None) -> int:
    """`explicit`, else the configured default, else ``$PROXIM_TESTING_MAX_EXAMPLES``, else `DEFAULT_MAX_EXAMPLES`."""
    if explicit is not None:
        return explicit
    if _configured_max_examples is not None:
        return _configured_max_examples
    env = os.environ.get(_MAX_EXAMPLES_ENV, "").strip()
    return int(env) if env else DEFAULT_MAX_EXAMPLES
