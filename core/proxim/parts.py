"""The three axes' base classes, the preset record, and the checks a part must pass to be registered.

A part is a small frozen ``attrs`` class whose fields are its hyperparameters. It is a pure function of
tensors: it never calls ``.item()``, never mutates its inputs, and holds no state. Subclass one of
`Baseline`, `Advantage` or `TrustRegion`, set `name`, and implement `__call__`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import ClassVar, NamedTuple

import attrs
from torch import Tensor

from proxim.errors import PluginError
from proxim.rollout import OPTIONAL_FIELDS, Estimate, Rollout
from proxim.tasks import Task

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Part:
    """Common surface of every part. Concrete parts are ``@attrs.frozen`` subclasses of an axis class."""

    kind: ClassVar[str]
    name: ClassVar[str]
    """The name users write (``region="clip"``); lower_snake_case, unique per kind across all plugins."""
    requires: ClassVar[frozenset[str]] = frozenset()
    """Optional Rollout fields this part reads (a subset of ``proxim.rollout.OPTIONAL_FIELDS``)."""
    min_group_size: ClassVar[int] = 1
    """The smallest group a part can work with; the objective checks it once per rollout."""
    call_arguments: ClassVar[tuple[str, ...]] = ()
    """Positional arguments of ``__call__`` after self, for the signature check at registration."""
    properties: ClassVar[frozenset[str]] = frozenset()
    """Properties beyond the universal contract that the part claims and the conformance kit
    (``proxim.testing``) then checks, e.g. ``frozenset({"zero_sum_per_group", "shift_invariant"})``;
    the names and their meaning are listed in ``proxim.testing.PROPERTIES``. Empty by default.
    """
    metric_names: ClassVar[frozenset[str]] = frozenset()
    """The metric keys the part may return (an advantage's ``Estimate.metrics``, a region's
    ``RegionOutput.metrics``), published as ``advantage/<key>`` or ``region/<key>``. Optional: declared,
    they are checked against the keys the objective publishes itself when the objective is built;
    undeclared, when the part first returns them. Empty by default (baselines return no metrics)."""

    def declared_properties(self) -> frozenset[str]:
        """The `properties` that hold for these hyperparameter values; override when some depend on them."""
        return self.properties

    @classmethod
    def hyperparameters(cls) -> tuple[str, ...]:
        """Names of the fields that overrides may set."""
        return tuple(a.name for a in attrs.fields(cls)) if attrs.has(cls) else ()

    def settings(self) -> dict[str, object]:
        """Hyperparameter values, by name."""
        return {name: getattr(self, name) for name in self.hyperparameters()}

    def describe(self) -> str:
        """``name(field=value, ...)``, stable across runs."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{self.name}({args})"


class Baseline(Part):
    """What a reward is compared against.

    ``__call__(batch) -> [B]`` (one baseline per sequence) or ``[B, T]`` (one per state, e.g. a critic).
    ``batch.rewards`` is always [B]: each sequence's total reward (token rewards summed, KL-in-reward
    applied), whatever kind of advantage follows.
    """

    kind = "baseline"
    call_arguments = ("batch",)
    provides_state_values: ClassVar[bool] = False
    """True when the baseline is V(s_t), a per-token state value that bootstrapping advantages (GAE) need."""

    def __call__(self, batch: Rollout) -> Tensor:
        raise NotImplementedError


class Advantage(Part):
    """How rewards and a baseline become a per-token signal.

    ``__call__(batch, baseline) -> Estimate`` with ``advantages`` [B, T]; the objective zeroes masked
    positions afterwards. ``batch.rewards`` is [B, T] when `token_level` is True, else [B].
    """

    kind = "advantage"
    call_arguments = ("batch", "baseline")
    token_level: ClassVar[bool] = False
    """True when the estimator consumes per-token rewards (returns, GAE); outcome rewards are then
    placed on each sequence's last valid token. False: token rewards are summed per sequence.
    """
    needs_state_values: ClassVar[bool] = False
    """True when the estimator bootstraps from V(s_t) and so needs a baseline that provides state values."""
    accepts_state_values: ClassVar[bool] = True
    """False when the estimator works on one baseline per sequence and cannot take V(s_t) ([B, T])."""
    default_baseline: ClassVar[str] = "none"
    """The baseline used when the user names none."""

    def __call__(self, batch: Rollout, baseline: Tensor) -> Estimate:
        raise NotImplementedError


class RegionOutput(NamedTuple):
    """A trust region's result: `loss` [B, T] per token (not reduced) and per-token `metrics` [B, T].

    The objective averages each metric over the mask and publishes it as ``region/<key>``. A
    NamedTuple rather than an attrs class so that ``torch.compile(fullgraph=True)`` traces it; build it
    with keywords.
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = {}


class TrustRegion(Part):
    """The shape of the per-token loss: how far one update may move the policy.

    ``__call__(logprobs, anchor, advantages, mask, *, metrics=True) -> RegionOutput``, all inputs [B, T].
    ``logprobs`` carries the gradient; ``anchor`` (the old or rollout log-probs) and ``advantages`` are
    constants. Masked positions hold 0 in every input; the region must not reduce over tokens except
    within a sequence (``mask`` is given for that, e.g. GSPO's sequence ratio).

    A subclass whose ``__call__`` does not take ``metrics`` still works: when the class is created, that
    ``__call__`` is wrapped once into one that accepts the keyword and ignores it (its metrics are then
    computed and dropped when the objective asks for none).
    """

    kind = "region"
    call_arguments = ("logprobs", "anchor", "advantages", "mask")

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None and not _declares_metrics(call):
            cls.__call__ = _ignoring_metrics(call)  # type: ignore[method-assign]

    def __call__(self, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor, *, metrics: bool = True) -> RegionOutput:
        """The per-token loss and metrics.

        metrics: False when the caller will not log this step: the region may then skip its per-token
                 diagnostics (return no or fewer metrics). The loss and its gradient must not change.
        """
        raise NotImplementedError


def _declares_metrics(call: Callable[..., object]) -> bool:
    """Whether `call` takes ``metrics=`` by name: in its own signature (an adapter's, or a decorated
    ``__call__``'s) or in the one it wraps (``functools.wraps``)."""
    for follow_wrapped in (True, False):
        try:
            flag = inspect.signature(call, follow_wrapped=follow_wrapped).parameters.get("metrics")
        except (TypeError, ValueError):
            continue
        if flag is not None and flag.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            return True
    return False


def _ignoring_metrics(call: Callable[..., RegionOutput]) -> Callable[..., RegionOutput]:
    """`call` (a region's ``__call__`` written without ``metrics``) accepting ``metrics=`` and ignoring it.
    `functools.wraps` keeps its name, docstring and signature (``inspect.signature`` follows ``__wrapped__``),
    so the signature check at registration sees the region's own arguments."""

    @functools.wraps(call)
    def accepting_metrics(self: TrustRegion, /, *args: object, metrics: bool = True, **kwargs: object) -> RegionOutput:
        return call(self, *args, **kwargs)

    return accepting_metrics


class Preference(Part):
    """An offline preference loss on pairs (DPO and relatives; a fourth registry beside the three axes).

    ``__call__(chosen, rejected) -> [B]`` per-pair loss, where ``chosen = log pi(y_w|x) - log pi_ref(y_w|x)``
    and ``rejected`` likewise for y_l: the implicit rewards' log-ratios, [B] each (sequence log-probs are
    sums over response tokens). The objective averages the pairs.
    """

    kind = "preference"
    call_arguments = ("chosen", "rejected")

    def __call__(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        raise NotImplementedError


AXES: dict[str, type[Part]] = {"baseline": Baseline, "advantage": Advantage, "region": TrustRegion}
PART_KINDS: dict[str, type[Part]] = {**AXES, "preference": Preference}
"""Every kind of part a plugin can register, with its base class."""


def _training_regime(instance: object, attribute: attrs.Attribute, value: Mapping[str, object]) -> None:  # type: ignore[type-arg]
    for key, v in value.items():
        if not (isinstance(key, str) and key.isidentifier() and key == key.lower()):
            raise ValueError(f"Preset.training: {key!r} is not a trainer setting name (lower_snake_case, as in proxim train --help).")
        if not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"Preset.training[{key!r}] = {v!r}: a training setting is a number, a string or a boolean.")


@attrs.frozen(kw_only=True)
class Preset:
    """A named combination of parts with the paper's defaults.

    ``settings`` maps hyperparameter names to values; a key may be qualified with its axis
    (``"region.eps_high"``) and then applies only while that axis keeps the preset's part.

    ``training`` is the paper's training regime in the trainer's setting names (``proxim train --help``),
    for example ``{"epochs": 4}`` for PPO: ``proxim train --preset NAME`` uses these values for the
    settings the user leaves at their defaults (flags and ``--config`` win). Values are plain numbers,
    strings or booleans; the trainer refuses a name it does not have, naming the preset and its plugin.
    """

    name: str
    baseline: str
    advantage: str
    region: str
    settings: Mapping[str, object] = attrs.field(factory=dict)
    summary: str = ""
    source: str = ""
    training: Mapping[str, object] = attrs.field(factory=dict, validator=_training_regime)

    kind: ClassVar[str] = "preset"


def check_part_class(obj: object, kind: str, plugin: str, *, who: str | None = None) -> type[Part]:
    """Raise `PluginError` unless `obj` is a usable part class of `kind`; return it.

    who: how the messages name the registering plugin (default ``plugin 'NAME'``).
    """
    base = PART_KINDS[kind]
    who = who or f"plugin {plugin!r}"
    if not isinstance(obj, type):
        hint = f" (pass the class {type(obj).__name__}, not an instance)" if isinstance(obj, Part) else ""
        raise PluginError(f"{who} registered {obj!r} as a {kind}, but register() takes a class{hint}.")
    if not issubclass(obj, base):
        raise PluginError(f"{who} registered {obj.__qualname__} as a {kind}, but it does not subclass proxim.{base.__name__}.")
    _check_identity(obj, kind, who)
    _check_signature(obj, kind, who)
    try:
        obj()
    except Exception as exc:
        raise PluginError(f"{who} registered {kind} {obj.name!r}, but {obj.__qualname__}() with default hyperparameters raised {exc!r}.") from exc
    return obj


def check_task_class(obj: object, plugin: str, *, who: str | None = None) -> type[Task]:
    """Raise `PluginError` unless `obj` is a `Task` subclass with a valid name; return it."""
    who = who or f"plugin {plugin!r}"
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise PluginError(f"{who} registered {obj!r} as a task, but tasks are proxim.tasks.Task subclasses.")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"{who}: task class {obj.__qualname__} needs a lower_snake_case class attribute `name`, got {name!r}.")
    return obj


def check_part_instance(obj: Part, kind: str) -> None:
    """Raise `PluginError` unless an instance given directly to `objective()` is a usable part of `kind`."""
    base = PART_KINDS[kind]
    if not isinstance(obj, base):
        raise PluginError(f"{kind}= takes a name or a proxim.{base.__name__} instance, got {obj!r}.")
    _check_identity(type(obj), kind, "plugin '<instance>'")
    _check_signature(type(obj), kind, "plugin '<instance>'")


def _check_identity(cls: type[Part], kind: str, who: str) -> None:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(
            f"{who}: {kind} class {cls.__qualname__} needs a class attribute `name`, a lower_snake_case string such as 'my_{kind}'; got {name!r}."
        )
    requires = cls.requires
    if not isinstance(requires, frozenset) or not requires <= set(OPTIONAL_FIELDS):
        unknown = sorted(set(requires) - set(OPTIONAL_FIELDS)) if isinstance(requires, (set, frozenset)) else []
        got = f"unknown Rollout fields {unknown}" if unknown else f"{requires!r}, which is not a frozenset"
        raise PluginError(f"{who}: {kind} {name!r} requires {got}; `requires` must be a frozenset drawn from {list(OPTIONAL_FIELDS)}.")


def _check_signature(cls: type[Part], kind: str, who: str) -> None:
    expected = ", ".join(("self", *cls.call_arguments))
    try:
        inspect.signature(cls.__call__).bind(None, *cls.call_arguments)
    except TypeError:
        got = inspect.signature(cls.__call__)
        raise PluginError(f"{who}: {kind} {cls.name!r} must define __call__({expected}); {cls.__qualname__}.__call__ has signature {got}.") from None
    if cls.__call__ is PART_KINDS[kind].__call__:
        raise PluginError(f"{who}: {kind} {cls.name!r} does not implement __call__({expected}).")
