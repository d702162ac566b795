"""The errors proxim raises. User errors derive from `LookupError` or `ValueError`, never `KeyError`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ProximError(Exception):
    """Base class of every error proxim raises on purpose."""


class UnknownNameError(ProximError, LookupError):
    """A part, preset or hyperparameter name that nothing registered."""


class PluginError(ProximError, RuntimeError):
    """A plugin failed to import, misnamed a hook, or registered something invalid."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name for the same kind of part; the plugin loaded second is left out."""


class UnavailableError(UnknownNameError, PluginError):
    """A name that a broken plugin registers, or a preset that needs a part no loaded plugin registers.

    The message names the plugin, its distribution and version, and the failure (chained as the cause).
    Both an `UnknownNameError` (a `LookupError`) and a `PluginError`, so either ``except`` catches it.
    """


class PluginWarning(UserWarning):
    """Issued once when a registry is built without some broken plugins; the message lists each with its reason."""


class ConfigurationError(ProximError, ValueError):
    """An objective that cannot work: a bad override, a missing requirement, an incompatible pair."""


class BatchError(ProximError, ValueError):
    """A tensor given to proxim has the wrong shape, dtype, device or values."""


class TrainingError(ProximError, RuntimeError):
    """A training run that cannot continue (too many non-finite updates in a row, processes that disagree)."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix naming the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
