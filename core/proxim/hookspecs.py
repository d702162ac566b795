"""Hook specifications of the ``proxim`` plugin system.

Each hook hands the plugin a typed ``register`` callable. A plugin calls ``register(PartClass)`` once
per part it supplies (or ``register(Preset(...))`` for presets); ``register`` validates the part on
the spot, so a broken part fails at the plugin's own ``register(...)`` line, and that plugin alone is
left out of the registry. Hooks run once, when the registry is built, each plugin's through a pluggy
manager of its own; nothing here is called while computing advantages or losses.

Compatibility promise: a hook spec may gain arguments in a later release; an implementation that
accepts fewer arguments keeps working (pluggy passes only the arguments an implementation names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import pluggy

if TYPE_CHECKING:
    from proxim.parts import Advantage, Baseline, Preference, Preset, TrustRegion
    from proxim.tasks import Task

PROJECT = "proxim"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""The marker plugin authors put on their hook implementations: ``@proxim.hookimpl``."""

P = TypeVar("P")


class Register(Protocol[P]):
    """``register(part)`` validates `part`, records it under its name, and returns it unchanged."""

    def __call__(self, part: P, /) -> P: ...


@hookspec
def proxim_register_baselines(register: Register[type[Baseline]]) -> None:
    """Register `Baseline` subclasses: ``register(MyBaseline)``."""


@hookspec
def proxim_register_advantages(register: Register[type[Advantage]]) -> None:
    """Register `Advantage` subclasses: ``register(MyAdvantage)``."""


@hookspec
def proxim_register_regions(register: Register[type[TrustRegion]]) -> None:
    """Register `TrustRegion` subclasses: ``register(MyRegion)``."""


@hookspec
def proxim_register_presets(register: Register[Preset]) -> None:
    """Register `Preset` records naming a combination of parts by name: ``register(Preset(...))``."""


@hookspec
def proxim_register_preferences(register: Register[type[Preference]]) -> None:
    """Register `Preference` subclasses (offline pairwise losses such as DPO): ``register(MyLoss)``."""


@hookspec
def proxim_register_tasks(register: Register[type[Task]]) -> None:
    """Register `proxim.tasks.Task` subclasses (prompt sources with a verifiable reward): ``register(MyTask)``."""


HOOKS = {
    "baseline": "proxim_register_baselines",
    "advantage": "proxim_register_advantages",
    "region": "proxim_register_regions",
    "preset": "proxim_register_presets",
    "preference": "proxim_register_preferences",
    "task": "proxim_register_tasks",
}
"""kind -> the hook that registers it, in the order the registry calls them."""
