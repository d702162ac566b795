"""The conformance checks: the contract every part keeps, and the properties a part may claim.

Each `Check` is a named, callable test of one part: ``CHECKS["masked_positions_ignored"](MyRegion())``
raises `CheckFailure` (an ``AssertionError``) with a sentence saying what broke, and hypothesis's
shrunk falsifying example attached as a note. Universal checks apply to every part of a kind;
property checks apply when the part declares the property (``Part.properties``, or
``Part.declared_properties()`` when it depends on hyperparameters).

Parts are called the way `proxim.Objective` calls them: stage-1 parts under ``torch.no_grad()`` with a
validated `Rollout`, whose rewards are each sequence's total [B] for a baseline, and for an advantage
[B, T] with zeros on padding when it is token-level, else [B]; trust regions with ``logprobs`` carrying the gradient and masked positions
holding 0 in every input. An advantage's properties are checked composed with its ``default_baseline``
(resolved by name in the registry), as ``proxim.objective(advantage=...)`` composes them; its universal
checks use a random baseline, so that a fault is the advantage's own.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import attrs
import hypothesis
import torch
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from torch import Tensor

from proxim import ops
from proxim.parts import AXES, PART_KINDS, Advantage, Baseline, Part, Preference, RegionOutput, TrustRegion
from proxim.registry import Registry, default_registry
from proxim.rollout import Estimate, Rollout
from proxim.testing import strategies as strat

DEFAULT_MAX_EXAMPLES = 25
"""Examples per check unless told otherwise (``max_examples=``, ``--proxim-max-examples``, or the
``PROXIM_TESTING_MAX_EXAMPLES`` environment variable).
"""
_MAX_EXAMPLES_ENV = "PROXIM_TESTING_MAX_EXAMPLES"
_DEVICE_ENV = "PROXIM_TESTING_DEVICE"
"""The device parts are called on unless told otherwise (``device=``, ``--proxim-device``, or
``PROXIM_TESTING_DEVICE``). Inputs are drawn on the CPU and moved there; outputs are compared on the CPU.
"""


class CheckFailure(AssertionError):
    """A part broke the contract a check states."""


@attrs.frozen
class Property:
    """A property a part may claim: the kinds it applies to and what it means."""

    name: str
    kinds: frozenset[str]
    meaning: str


_PROPERTIES = (
    Property("group_independent", frozenset({"baseline", "advantage"}), "changing the responses of one prompt group leaves every other group's output unchanged"),
    Property("permutation_equivariant", frozenset({"baseline", "advantage"}), "permuting the rows of the batch (with their group ids) permutes the output the same way"),
    Property("shift_equivariant", frozenset({"baseline"}), "adding c_g to every reward of group g adds c_g to that group's baselines"),
    Property("shift_invariant", frozenset({"advantage"}), "adding c_g to every reward of group g leaves all advantages unchanged"),
    Property("zero_sum_per_group", frozenset({"advantage"}), "within each group, the rows' advantages (each row's mean over its valid tokens) sum to 0"),
    Property("degenerate_groups_zero", frozenset({"advantage"}), "a group whose rewards are all equal (a group of one included) gets advantage 0"),
    Property("outcome_broadcast", frozenset({"advantage"}), "with sequence rewards, the advantage is constant over each row's valid tokens"),
    Property("pg_at_anchor", frozenset({"region"}), "at logprobs == anchor (ratio 1) the gradient -dloss/dlogprob equals A at every valid token"),
    Property("value_at_anchor", frozenset({"region"}), "at ratio 1 the loss is -A at every valid token"),
    Property("zero_grad_clipped_side", frozenset({"region"}), "far past the trust region in the direction A pushes (p -> 1 for A > 0, p -> 0 for A < 0, from anchor probabilities in [0.2, 0.5]) the gradient is exactly 0"),
    Property("bounded_weight", frozenset({"region"}), "the gradient's weight g / A stops growing with the ratio: in magnitude it is no larger at log-ratios of +-15 and +-19.5 than its largest value for log-ratios within +-10"),
    Property("positively_homogeneous", frozenset({"region"}), "loss(a A) == a loss(A), and the same for the gradient, for every a > 0"),
    Property("tokens_independent", frozenset({"region"}), "each token's loss and gradient depend only on that token's inputs"),
)
PROPERTIES: dict[str, Property] = {p.name: p for p in _PROPERTIES}
"""Every property a part may declare, by name."""


@attrs.frozen
class Check:
    """One named check. Call it with a part (an instance, or a class built with its defaults).

    property: True for a check that runs only on parts declaring the property of the same name.
    max_examples / registry: settings; `configured` returns a copy with them changed.
    """

    name: str
    kinds: frozenset[str]
    summary: str
    property: bool
    _run: Callable[[Part, _Context], None] = attrs.field(repr=False, alias="run")
    max_examples: int | None = None
    registry: Registry | None = attrs.field(default=None, repr=False)
    device: str | None = None

    def configured(self, *, max_examples: int | None = None, registry: Registry | None = None, device: str | None = None) -> Check:
        return attrs.evolve(
            self, max_examples=max_examples or self.max_examples, registry=registry or self.registry, device=device or self.device
        )

    def applies_to(self, part: Part | type[Part]) -> bool:
        part = as_instance(part)
        if part.kind not in self.kinds:
            return False
        return not self.property or self.name in _declared(part)

    def __call__(self, part: Part | type[Part]) -> None:
        part = as_instance(part)
        if part.kind not in self.kinds:
            raise ValueError(f"check {self.name!r} applies to {', '.join(sorted(self.kinds))} parts, not to the {part.kind} {part.name!r}.")
        ctx = _Context(max_examples=resolve_max_examples(self.max_examples), registry_=self.registry)
        try:
            with _on_device(resolve_device(self.device)):
                self._run(part, ctx)
        except CheckFailure as exc:
            failure = CheckFailure(f"{label(part)} fails {self.name}: {exc}")
            notes = list(getattr(exc, "__notes__", ()))  # hypothesis's falsifying example
            if notes:
                failure.__notes__ = notes  # what add_note() does (Python 3.11+), spelled for 3.10 too
            raise failure from exc.__cause__

    def __repr__(self) -> str:
        return f"<check {self.name}>"


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


_DEVICE: ContextVar[torch.device] = ContextVar("proxim_testing_device", default=torch.device("cpu"))


@contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def _to(obj: Any, device: torch.device) -> Any:
    """`obj` (a tensor, Rollout, Estimate or RegionOutput; anything else unchanged) with its tensors on `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Rollout):
        fields = {name: getattr(obj, name) for name in Rollout._FIELDS}
        if all(t is None or t.device == device for t in fields.values()):
            return obj
        return Rollout(**{name: _to(t, device) for name, t in fields.items()})
    if isinstance(obj, Estimate):
        metrics = {k: _to(v, device) for k, v in obj.metrics.items()} if isinstance(obj.metrics, Mapping) else obj.metrics
        return Estimate(advantages=_to(obj.advantages, device), returns=_to(obj.returns, device), rewards=_to(obj.rewards, device), metrics=metrics)
    if isinstance(obj, RegionOutput):
        metrics = {k: _to(v, device) for k, v in obj.metrics.items()} if isinstance(obj.metrics, Mapping) else obj.metrics
        return RegionOutput(loss=_to(obj.loss, device), metrics=metrics)
    return obj


_CPU = torch.device("cpu")


def resolve_max_examples(explicit: int | None = None) -> int:
    """`explicit`, else the configured default, else ``$PROXIM_TESTING_MAX_EXAMPLES``, else `DEFAULT_MAX_EXAMPLES`."""
    if explicit is not None:
        return explicit
    if _configured_max_examples is not None:
        return _configured_max_examples
    env = os.environ.get(_MAX_EXAMPLES_ENV, "").strip()
    return int(env) if env else DEFAULT_MAX_EXAMPLES


def as_instance(part: Part | type[Part]) -> Part:
    """`part` itself, or its class built with default hyperparameters."""
    if isinstance(part, type):
        if not issubclass(part, Part):
            raise TypeError(f"the conformance kit checks proxim parts, got the class {part.__qualname__}.")
        return part()
    if not isinstance(part, Part):
        raise TypeError(f"the conformance kit checks proxim parts (Baseline, Advantage, TrustRegion), got {part!r}.")
    return part


def label(part: Part) -> str:
    """``region 'clip'``, or ``region 'clip(dual_clip=3.0)'`` when hyperparameters differ from the defaults."""
    return f"{part.kind} {short_name(part)!r}"


def short_name(part: Part) -> str:
    """The part's name, with the hyperparameters that differ from its defaults."""
    try:
        defaults = type(part)().settings()
    except Exception:  # noqa: BLE001 - a part without usable defaults is described in full
        defaults = {}
    changed = {k: v for k, v in part.settings().items() if k not in defaults or defaults[k] != v}
    if not changed:
        return part.name
    return f"{part.name}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def _declared(part: Part) -> frozenset[str]:
    declared = part.declared_properties()
    return frozenset(declared) if isinstance(declared, (set, frozenset)) else frozenset()


@attrs.define
class _Context:
    max_examples: int
    registry_: Registry | None

    @property
    def registry(self) -> Registry:
        if self.registry_ is None:
            self.registry_ = default_registry()
        return self.registry_

    def given(self, strategy: st.SearchStrategy[Any], test: Callable[[Any], None]) -> None:
        """Run `test` on `max_examples` examples drawn from `strategy` (deterministic; shrinks a failure)."""

        @hypothesis.settings(
            max_examples=self.max_examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink),
            print_blob=False,
            report_multiple_bugs=False,
        )
        @hypothesis.given(example=strategy)
        def check_example(example: Any) -> None:
            test(example)

        try:
            check_example()
        except HypothesisException as exc:
            # e.g. Flaky: the same example passed once and failed once, so the part is not a pure function.
            raise _fail(f"hypothesis could not check it: {type(exc).__name__}: {exc}") from exc


# -- calling parts and comparing what they return -------------------------------------------------


def _fail(message: str) -> CheckFailure:
    return CheckFailure(message)


def _invoke(part: Part, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except CheckFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the part raises is its failure to keep the contract
        raise _fail(f"it raised {type(exc).__name__}: {exc}") from exc


@attrs.frozen
class _Result:
    """Named output tensors of one call, each with the positions that count ([B, T] bool, or None: all)."""

    items: dict[str, tuple[Tensor, Tensor | None]]

    def permuted(self, perm: Tensor) -> _Result:
        return _Result({k: (v[perm], None if w is None else w[perm]) for k, (v, w) in self.items.items() if v.dim() > 0})


@attrs.frozen
class _StageOne:
    """A stage-1 subject: a baseline, an advantage fed the case's random baseline, or an advantage composed
    with its default baseline (`composed`)."""

    part: Part
    base: Baseline | None = None

    @classmethod
    def of(cls, part: Part, ctx: _Context, composed: bool) -> _StageOne:
        if composed and isinstance(part, Advantage):
            try:
                base_cls = ctx.registry.get("baseline", part.default_baseline)
            except LookupError as exc:
                raise _fail(f"its default_baseline {part.default_baseline!r} is not a registered baseline ({exc}).") from None
            return cls(part, base_cls())
        return cls(part)

    @property
    def requires(self) -> frozenset[str]:
        return self.part.requires | (self.base.requires if self.base is not None else frozenset())

    def cases(self, **options: Any) -> st.SearchStrategy[strat.StageOneCase]:
        part = self.part
        min_group = max(part.min_group_size, self.base.min_group_size if self.base is not None else 1)
        baseline = None
        if isinstance(part, Advantage) and self.base is None:
            baseline = "state" if part.needs_state_values else ("either" if part.accepts_state_values else "sequence")
        options.setdefault("token_rewards", part.token_level if isinstance(part, Advantage) else False)
        return strat.stage_one_cases(self.requires, min_group_size=min_group, baseline=baseline, **options)

    def call(self, batch: Rollout, baseline: Tensor | None) -> Any:
        """The raw output (on the check's device), computed under no_grad as the objective does."""
        part = self.part
        batch, baseline = _to(batch, _DEVICE.get()), _to(baseline, _DEVICE.get())
        with torch.no_grad():
            if isinstance(part, Baseline):
                return _invoke(part, lambda: part(batch))
            if self.base is not None:
                base = self.base
                # The baseline sees each sequence's total reward [B], whatever the advantage consumes.
                totals = batch if batch.rewards.dim() == 1 else batch.replace(rewards=ops.masked_sum(batch.rewards, batch.mask, dim=1))
                baseline = _invoke(base, lambda: base(totals))
            assert isinstance(part, Advantage) and baseline is not None
            given = baseline
            return _invoke(part, lambda: part(batch, given))

    def result(self, batch: Rollout, baseline: Tensor | None, raw: Any = None) -> _Result:
        raw = _to(self.call(batch, baseline) if raw is None else raw, _CPU)
        batch = _to(batch, _CPU)
        mask = batch.mask
        rows, tokens = mask.shape
        if isinstance(self.part, Baseline):
            if not isinstance(raw, Tensor) or raw.shape not in ((rows,), (rows, tokens)):
                raise _fail(f"it returned {_what(raw)}, not a [B] = ({rows},) or [B, T] = ({rows}, {tokens}) tensor.")
            return _Result({"baseline": (raw, mask if raw.dim() == 2 else None)})
        if not isinstance(raw, Estimate):
            raise _fail(f"it returned {_what(raw)}, not a proxim.Estimate.")
        items: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name in ("advantages", "returns"):
            value = getattr(raw, name)
            if value is None and name == "returns":
                continue
            if not isinstance(value, Tensor) or value.shape != (rows, tokens):
                raise _fail(f"its Estimate.{name} is {_what(value)}, not a [B, T] = ({rows}, {tokens}) tensor.")
            items[name] = (value, mask)
        for key, value in (raw.metrics or {}).items():
            if isinstance(value, Tensor) and value.dim() == 0:
                items[f"metrics[{key!r}]"] = (value, None)
        return _Result(items)


def _what(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return f"{type(obj).__name__} {obj!r}"[:200]


def _region_result(part: TrustRegion, logprobs: Tensor, anchor: Tensor, advantages: Tensor, mask: Tensor) -> _Result:
    """Call the region (on the check's device) with ``logprobs`` as a fresh leaf; return loss, the gradient
    of the masked loss sum, and metrics, on the CPU."""
    device = _DEVICE.get()
    leaf = logprobs.detach().clone().to(device).requires_grad_(True)
    anchor, advantages, mask_d = anchor.to(device), advantages.to(device), mask.to(device)
    out = _invoke(part, lambda: part(leaf * 1, anchor, advantages, mask_d))
    loss = _check_region_output(out, mask)
    if loss.requires_grad:
        total = _invoke(part, lambda: torch.where(mask_d, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum())
        (grad,) = _invoke(part, lambda: torch.autograd.grad(total, leaf, allow_unused=True))
    else:
        grad = None
    if grad is None:
        grad = torch.zeros_like(leaf)
    items: dict[str, tuple[Tensor, Tensor | None]] = {"loss": (loss.detach().cpu(), mask), "gradient": (grad.cpu(), mask)}
    for key, value in out.metrics.items():
        items[f"metrics[{key!r}]"] = (value.detach().cpu(), mask)
    return _Result(items)


def _preference_result(part: Preference, chosen: Tensor, rejected: Tensor) -> _Result:
    """Call the preference loss on fresh leaves; return the per-pair loss and the gradients of its sum."""
    leaves = [t.detach().clone().to(_DEVICE.get()).requires_grad_(True) for t in (chosen, rejected)]
    out = _invoke(part, lambda: part(leaves[0] * 1, leaves[1] * 1))
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(chosen.shape):
        raise _fail(f"it returned {_what(out)}, not a per-pair [B] = {tuple(chosen.shape)} tensor (a preference loss must not reduce).")
    items: dict[str, tuple[Tensor, Tensor | None]] = {"loss": (out.detach().cpu(), None)}
    if out.requires_grad:
        grads = _invoke(part, lambda: torch.autograd.grad(out.sum(), leaves, allow_unused=True))
    else:
        grads = (None, None)
    for name, leaf, grad in zip(("chosen", "rejected"), leaves, grads):
        items[f"gradient[{name}]"] = ((torch.zeros_like(leaf) if grad is None else grad).cpu(), None)
    return _Result(items)


def _check_region_output(out: Any, mask: Tensor) -> Tensor:
    shape = tuple(mask.shape)
    if not isinstance(out, RegionOutput):
        raise _fail(f"it returned {_what(out)}, not a proxim.RegionOutput(loss=..., metrics=...).")
    if not isinstance(out.loss, Tensor) or tuple(out.loss.shape) != shape:
        raise _fail(f"its loss is {_what(out.loss)}, not a per-token [B, T] = {shape} tensor (a region must not reduce).")
    if not isinstance(out.metrics, Mapping):
        raise _fail(f"its metrics are {_what(out.metrics)}, not a mapping of name -> [B, T] tensor.")
    for key, value in out.metrics.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise _fail(f"its metric {key!r} is {_what(value)}, not a per-token [B, T] = {shape} tensor.")
    return out.loss


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest magnitude compared)."""
    return (1e-5, 1e-6) if dtype in (torch.float32, torch.float16, torch.bfloat16) else (1e-9, 1e-12)


def _compare(
    expected: _Result,
    actual: _Result,
    what: str,
    *,
    rows: Tensor | None = None,
    exact: bool = False,
    skip_scalars: bool = False,
) -> None:
    """Raise `CheckFailure` unless `actual` matches `expected` at the positions that count (and in `rows`)."""
    for name, (want, where) in expected.items.items():
        if skip_scalars and want.dim() == 0:
            continue
        if name not in actual.items:
            raise _fail(f"{what}: {name} disappeared from the output.")
        got = actual.items[name][0]
        if got.shape != want.shape:
            raise _fail(f"{what}: {name} changed shape from {tuple(want.shape)} to {tuple(got.shape)}.")
        select = torch.ones(want.shape, dtype=torch.bool) if where is None else where.clone()
        if rows is not None and want.dim() > 0:
            select &= rows.reshape((-1,) + (1,) * (want.dim() - 1)).expand(want.shape)
        if rows is not None and want.dim() == 0:
            continue
        a, b = want.detach().cpu()[select].double(), got.detach().cpu()[select].double()
        if a.numel() == 0:
            continue
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not exact:
            rtol, atol = _tolerance(want.dtype if want.is_floating_point() else torch.float64)
            finite = a[torch.isfinite(a)]
            scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
            same |= (a - b).abs() <= atol * scale + rtol * a.abs()
        if not bool(same.all()):
            bad = int(torch.nonzero(~same)[0, 0])
            where_txt = tuple(int(i) for i in torch.nonzero(select)[bad]) if want.dim() > 0 else ()
            at = f" at {list(where_txt)}" if where_txt else ""
            raise _fail(f"{what}: {name}{at} is {b[bad].item()!r}, expected {a[bad].item()!r}.")


# -- universal checks -------------------------------------------------------------------------------


def _properties_known(part: Part, ctx: _Context) -> None:
    declared = part.declared_properties()
    if not isinstance(declared, (set, frozenset)) or not all(isinstance(p, str) for p in declared):
        raise _fail(f"declared_properties() returned {declared!r}; properties are a frozenset of names.")
    for name in sorted(declared):
        prop = PROPERTIES.get(name)
        if prop is None:
            close = difflib.get_close_matches(name, list(PROPERTIES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(p.name for p in _PROPERTIES if part.kind in p.kinds)
            raise _fail(f"it declares the unknown property {name!r}.{hint} Properties of a {part.kind}: {known}.")
        if part.kind not in prop.kinds:
            kinds = " and ".join(sorted(prop.kinds))
            raise _fail(f"it declares {name!r}, a property of {kinds} parts, but it is {'an' if part.kind[0] in 'aeiou' else 'a'} {part.kind}.")


def _shape_dtype_device(part: Part, ctx: _Context) -> None:
    device = _DEVICE.get()
    if isinstance(part, Preference):

        def preference_test(case: strat.PreferenceCase) -> None:
            _preference_result(part, case.chosen, case.rejected)  # the shape
            chosen, rejected = case.chosen.to(device), case.rejected.to(device)
            loss = _invoke(part, lambda: part(chosen, rejected))
            _same_dtype_device("the loss", loss, chosen)

        ctx.given(strat.preference_cases(), preference_test)
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            lp, anchor, adv, mask = (t.to(device) for t in (case.logprobs, case.anchor, case.advantages, case.mask))
            out = _invoke(part, lambda: part(lp.clone().requires_grad_(True), anchor, adv, mask))
            loss = _check_region_output(out, case.mask)
            _same_dtype_device("loss", loss, lp)
            for key, value in out.metrics.items():
                if value.dtype != torch.bool and not value.is_floating_point():
                    raise _fail(f"its metric {key!r} has dtype {value.dtype}; per-token metrics are bool or floating point.")
                if value.device != lp.device:
                    raise _fail(f"its metric {key!r} is on {value.device}, the inputs on {lp.device}.")

        ctx.given(strat.region_cases(), region_test)
        return

    subject = _StageOne.of(part, ctx, composed=False)

    def stage_one_test(case: strat.StageOneCase) -> None:
        raw = subject.call(case.batch, case.baseline)  # on `device`
        subject.result(case.batch, case.baseline, raw)  # the shapes
        like = _to(case.batch.old_logprobs, device)
        if isinstance(part, Baseline):
            if part.provides_state_values and raw.dim() != 2:
                raise _fail(f"it provides state values (provides_state_values=True) but returned shape {tuple(raw.shape)}, not [B, T].")
            _same_dtype_device("the baseline", raw, like)
            return
        assert isinstance(raw, Estimate)
        _same_dtype_device("Estimate.advantages", raw.advantages, like)
        if raw.returns is not None:
            _same_dtype_device("Estimate.returns", raw.returns, like)
        if not isinstance(raw.metrics, Mapping):
            raise _fail(f"its Estimate.metrics is {_what(raw.metrics)}, not a dict of name -> 0-d tensor.")
        for key, value in raw.metrics.items():
            if not isinstance(value, Tensor) or value.dim() != 0:
                raise _fail(f"its metric {key!r} is {_what(value)}; stage-1 metrics are 0-d tensors.")
            if value.device != like.device:
                raise _fail(f"its metric {key!r} is on {value.device}, the inputs on {like.device}.")

    ctx.given(subject.cases(), stage_one_test)


def _same_dtype_device(name: str, t: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise _fail(f"{name} is {_what(t)}, not a tensor.")
    if t.dtype != like.dtype:
        raise _fail(f"{name} has dtype {t.dtype} for {like.dtype} inputs; keep the input dtype.")
    if t.device != like.device:
        raise _fail(f"{name} is on {t.device} for inputs on {like.device}; keep the input device.")


def _all_finite(result: _Result, context: str) -> None:
    for name, (value, _) in result.items.items():
        if not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            pos = [int(i) for i in torch.nonzero(bad)[0]] if value.dim() else []
            at = f" at {pos}" if pos else ""
            raise _fail(f"{name}{at} is {value[tuple(pos)].item()!r} {context}.")


def _finite(empty_row: bool) -> Callable[[Part, _Context], None]:
    context = "for a batch with a fully masked row (all inputs finite)" if empty_row else "for finite inputs"

    def run(part: Part, ctx: _Context) -> None:
        options: dict[str, Any] = {"min_tokens": 0, "empty_row": True} if empty_row else {}
        if isinstance(part, Preference):
            ctx.given(strat.preference_cases(), lambda c: _all_finite(_preference_result(part, c.chosen, c.rejected), context))
            return
        if isinstance(part, TrustRegion):
            ctx.given(
                strat.region_cases(**options),
                lambda c: _all_finite(_region_result(part, c.logprobs, c.anchor, c.advantages, c.mask), context),
            )
            return
        subject = _StageOne.of(part, ctx, composed=False)
        ctx.given(subject.cases(**options), lambda c: _all_finite(subject.result(c.batch, c.baseline), context))

    return run


_GARBAGE = ("nan", "inf", "-inf", "large", "random")


def _garbage(like: Tensor, mask: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    values = {
        "nan": torch.full(like.shape, float("nan"), dtype=torch.float64),
        "inf": torch.full(like.shape, float("inf"), dtype=torch.float64),
        "-inf": torch.full(like.shape, float("-inf"), dtype=torch.float64),
        "large": torch.where(torch.rand(like.shape, generator=gen, dtype=torch.float64) < 0.5, 30.0, -30.0),
        "random": torch.randn(like.shape, generator=gen, dtype=torch.float64) * 10,
    }[kind]
    return torch.where(mask, like, values.to(like.dtype))


def _masked_positions_ignored(part: Part, ctx: _Context) -> None:
    if isinstance(part, TrustRegion):

        def region_test(example: tuple[strat.RegionCase, str]) -> None:
            case, kind = example
            gen = torch.Generator().manual_seed(case.seed + 1)
            clean = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
            lp, anchor, adv = (_garbage(t, case.mask, kind, gen) for t in (case.logprobs, case.anchor, case.advantages))
            dirty = _region_result(part, lp, anchor, adv, case.mask)
            _compare(clean, dirty, f"with padded (masked) inputs set to {kind} values instead of 0, the output at valid tokens changed")

        ctx.given(st.tuples(strat.region_cases(), st.sampled_from(("large", "random"))), region_test)
        return

    subject = _StageOne.of(part, ctx, composed=False)

    def stage_one_test(example: tuple[strat.StageOneCase, str]) -> None:
        case, kind = example
        batch, mask = case.batch, case.batch.mask
        gen = torch.Generator().manual_seed(case.seed + 1)
        changes = {
            name: _garbage(getattr(batch, name), mask, kind, gen)
            for name in ("old_logprobs", "ref_logprobs", "values", "rollout_logprobs")
            if getattr(batch, name) is not None
        }
        dirty_batch = batch.replace(**changes)
        base = case.baseline
        dirty_base = _garbage(base, mask, kind, gen) if base is not None and base.dim() == 2 else base
        clean = subject.result(batch, base)
        dirty = subject.result(dirty_batch, dirty_base)
        fields = ", ".join(sorted(changes) + (["the baseline"] if dirty_base is not base else []))
        _compare(clean, dirty, f"with padded (masked) positions of {fields} set to {kind}, the output at valid positions changed")

    ctx.given(st.tuples(subject.cases(), st.sampled_from(_GARBAGE)), stage_one_test)


def _no_gradient_leak(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=False)

    def outputs(raw: Any) -> dict[str, Tensor]:
        if isinstance(raw, Tensor):
            return {"the baseline": raw}
        if isinstance(raw, Estimate):
            found = {"Estimate.advantages": raw.advantages, "Estimate.returns": raw.returns}
            found.update({f"metric {k!r}": v for k, v in (raw.metrics or {}).items()})
            return {k: v for k, v in found.items() if isinstance(v, Tensor)}
        raise _fail(f"it returned {_what(raw)}.")

    def test(case: strat.StageOneCase) -> None:
        device = _DEVICE.get()
        batch = _to(case.batch, device)
        tracked = {
            name: getattr(batch, name).detach().clone().requires_grad_(True)
            for name in ("old_logprobs", "rewards", "ref_logprobs", "values", "rollout_logprobs")
            if getattr(batch, name) is not None
        }
        base = None if case.baseline is None else case.baseline.detach().clone().to(device).requires_grad_(True)
        raw = subject.call(batch.replace(**tracked), base)  # under torch.no_grad(), as the objective calls it
        inputs = [*tracked.values(), base]
        for name, value in outputs(raw).items():
            passed_through = any(value is t for t in inputs)  # e.g. the critic baseline returning Rollout.values
            if value.requires_grad and not passed_through:
                raise _fail(
                    f"{name} requires grad although it was computed under torch.no_grad(): the part re-enables "
                    f"gradient tracking (or uses tensors that require grad), so a gradient would flow out of stage 1."
                )
        part_ = subject.part
        with torch.enable_grad():
            if isinstance(part_, Baseline):
                raw = _invoke(part_, lambda: part_(batch))
            else:
                assert isinstance(part_, Advantage) and case.baseline is not None
                given = case.baseline.to(device)
                raw = _invoke(part_, lambda: part_(batch, given))
        for name, value in outputs(raw).items():
            if value.requires_grad:
                raise _fail(
                    f"{name} requires grad although no input does: the part holds or creates tensors that require "
                    f"grad, so a gradient would flow out of stage 1."
                )

    ctx.given(subject.cases(), test)


def _snapshot(tensors: Mapping[str, Tensor | None]) -> dict[str, tuple[Tensor, Tensor, int]]:
    return {name: (t, t.detach().clone(), t._version) for name, t in tensors.items() if isinstance(t, Tensor)}


def _assert_unchanged(snapshot: Mapping[str, tuple[Tensor, Tensor, int]]) -> None:
    for name, (tensor, copy, version) in snapshot.items():
        now = tensor.detach()
        if now.is_floating_point():
            same = bool(((now == copy) | (torch.isnan(now) & torch.isnan(copy))).all())
        else:
            same = torch.equal(now, copy)
        if tensor._version != version or not same:
            raise _fail(f"it modified its input {name} in place; parts must never mutate their inputs (copy first, or use out-of-place ops).")


def _inputs_not_mutated(part: Part, ctx: _Context) -> None:
    if isinstance(part, Preference):

        def preference_test(case: strat.PreferenceCase) -> None:
            leaves = [t.clone().to(_DEVICE.get()).requires_grad_(True) for t in (case.chosen, case.rejected)]
            inputs = {"chosen": leaves[0] * 1, "rejected": leaves[1] * 1}
            snapshot = _snapshot(inputs)
            out = _invoke(part, lambda: part(inputs["chosen"], inputs["rejected"]))
            _assert_unchanged(snapshot)
            if isinstance(out, Tensor) and out.requires_grad:
                _invoke(part, lambda: torch.autograd.grad(out.sum(), leaves, allow_unused=True))
            _assert_unchanged(snapshot)

        ctx.given(strat.preference_cases(), preference_test)
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            device = _DEVICE.get()
            leaf = case.logprobs.clone().to(device).requires_grad_(True)
            inputs = {"logprobs": leaf * 1, "anchor": case.anchor.to(device), "advantages": case.advantages.to(device), "mask": case.mask.to(device)}
            snapshot = _snapshot(inputs)
            out = _invoke(part, lambda: part(inputs["logprobs"], inputs["anchor"], inputs["advantages"], inputs["mask"]))
            _assert_unchanged(snapshot)
            loss = _check_region_output(out, case.mask)
            if loss.requires_grad:
                total = _invoke(part, lambda: torch.where(inputs["mask"], loss, torch.zeros((), dtype=loss.dtype, device=loss.device)).sum())
                _invoke(part, lambda: torch.autograd.grad(total, leaf, allow_unused=True))
            _assert_unchanged(snapshot)

        ctx.given(strat.region_cases(), region_test)
        return

    subject = _StageOne.of(part, ctx, composed=False)

    def stage_one_test(case: strat.StageOneCase) -> None:
        batch, baseline = _to(case.batch, _DEVICE.get()), _to(case.baseline, _DEVICE.get())
        tensors: dict[str, Tensor | None] = {f"batch.{name}": getattr(batch, name) for name in Rollout._FIELDS}
        tensors["baseline"] = baseline
        snapshot = _snapshot(tensors)
        subject.call(batch, baseline)
        _assert_unchanged(snapshot)

    ctx.given(subject.cases(), stage_one_test)


def _deterministic(part: Part, ctx: _Context) -> None:
    what = "called twice on the same inputs, it returned different values (a part holds no state and draws no random numbers)"
    if isinstance(part, Preference):
        ctx.given(
            strat.preference_cases(),
            lambda c: _compare(_preference_result(part, c.chosen, c.rejected), _preference_result(part, c.chosen, c.rejected), what, exact=True),
        )
        return
    if isinstance(part, TrustRegion):

        def region_test(case: strat.RegionCase) -> None:
            inputs = (case.logprobs, case.anchor, case.advantages, case.mask)
            _compare(_region_result(part, *inputs), _region_result(part, *inputs), what, exact=True)

        ctx.given(strat.region_cases(), region_test)
        return
    subject = _StageOne.of(part, ctx, composed=False)
    ctx.given(
        subject.cases(),
        lambda c: _compare(subject.result(c.batch, c.baseline), subject.result(c.batch, c.baseline), what, exact=True),
    )


def _fresh_row(gen: torch.Generator, tokens: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, anchor, advantages, mask) for one new row: at least one valid token, zeros on padding."""
    mask = torch.rand(tokens, generator=gen) < 0.7
    mask[int(torch.randint(0, tokens, (1,), generator=gen))] = True
    anchor = -torch.empty(tokens, dtype=torch.float64).exponential_(1.0, generator=gen)
    logprobs = (anchor + torch.randn(tokens, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    advantages = torch.randn(tokens, generator=gen, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    return tuple(torch.where(mask, t, zero).to(dtype) for t in (logprobs, anchor, advantages)) + (mask,)  # type: ignore[return-value]


def _rows_independent(part: Part, ctx: _Context) -> None:
    if isinstance(part, Preference):

        def preference_test(example: tuple[strat.PreferenceCase, int]) -> None:
            case, pick = example
            k = pick % case.chosen.shape[0]
            gen = torch.Generator().manual_seed(case.seed + 7)
            chosen, rejected = case.chosen.clone(), case.rejected.clone()
            chosen[k], rejected[k] = (torch.randn(2, generator=gen, dtype=torch.float64) * 3).to(chosen.dtype)
            before = _preference_result(part, case.chosen, case.rejected)
            after = _preference_result(part, chosen, rejected)
            others = torch.arange(chosen.shape[0]) != k
            _compare(before, after, f"changing only pair {k} changed another pair's loss (a preference loss must not reduce over the batch)", rows=others)

        ctx.given(st.tuples(strat.preference_cases(min_pairs=2), st.integers(0, 63)), preference_test)
        return
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, int]) -> None:
        case, pick = example
        rows, tokens = case.mask.shape
        k = pick % rows
        gen = torch.Generator().manual_seed(case.seed + 7)
        new = _fresh_row(gen, tokens, case.logprobs.dtype)
        tensors = [t.clone() for t in (case.logprobs, case.anchor, case.advantages, case.mask)]
        for t, row in zip(tensors, new):
            t[k] = row
        before = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        after = _region_result(part, *tensors)
        others = torch.arange(rows) != k
        _compare(before, after, f"changing only row {k} changed another row's output (a region must not reduce over the batch)", rows=others)

    ctx.given(st.tuples(strat.region_cases(min_rows=2), st.integers(0, 63)), test)


# -- property checks: stage 1 -----------------------------------------------------------------------


def _perturb_rows(batch: Rollout, rows: Tensor, gen: torch.Generator) -> Rollout:
    """A copy of `batch` with new rewards, log-probs, values and masks (>= 1 valid token) in `rows`."""
    mask = batch.mask.clone()
    count, tokens = int(rows.sum()), mask.shape[1]
    new_mask = torch.rand(count, tokens, generator=gen) < 0.7
    new_mask[torch.arange(count), torch.randint(0, tokens, (count,), generator=gen)] = True
    mask[rows] = new_mask
    zero = torch.zeros((), dtype=torch.float64)
    changes: dict[str, Tensor | None] = {"mask": mask}
    for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs", "values", "rewards"):
        t = getattr(batch, name)
        if t is None:
            continue
        shape = (count,) + tuple(t.shape[1:])
        if name.endswith("logprobs"):
            fresh = -torch.empty(shape, dtype=torch.float64).exponential_(1.0, generator=gen)
        else:
            fresh = torch.randint(-16, 17, shape, generator=gen).to(torch.float64) / 8
        if t.dim() == 2:
            fresh = torch.where(new_mask, fresh, zero)
        updated = t.clone()
        updated[rows] = fresh.to(t.dtype)
        if t.dim() == 2:
            updated = torch.where(mask, updated, torch.zeros((), dtype=t.dtype))
        changes[name] = updated
    return batch.replace(**changes)


def _group_independent(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(example: tuple[strat.StageOneCase, int]) -> None:
        case, pick = example
        g = pick % case.groups
        rows = case.slots == g
        changed = _perturb_rows(case.batch, rows, torch.Generator().manual_seed(case.seed + 3))
        before = subject.result(case.batch, None)
        after = subject.result(changed, None)
        _compare(before, after, f"changing only group {g} (rows {torch.nonzero(rows).flatten().tolist()}) changed another group's output", rows=~rows)

    ctx.given(st.tuples(subject.cases(dtype=torch.float64, min_groups=2), st.integers(0, 63)), test)


def _permute(batch: Rollout, perm: Tensor) -> Rollout:
    return batch.replace(**{name: getattr(batch, name)[perm] for name in Rollout._FIELDS if getattr(batch, name) is not None})


def _permutation_equivariant(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        perm = torch.randperm(case.batch.batch_size, generator=torch.Generator().manual_seed(case.seed + 5))
        expected = subject.result(case.batch, None).permuted(perm)
        actual = subject.result(_permute(case.batch, perm), None)
        _compare(expected, actual, f"permuting the rows by {perm.tolist()} did not permute the output the same way", skip_scalars=True)

    ctx.given(subject.cases(dtype=torch.float64), test)


def _shifted(case: strat.StageOneCase) -> tuple[Rollout, Tensor]:
    """The batch with c_g (a multiple of 1/8 in [-10, 10]) added to every sequence reward of group g; c per row."""
    gen = torch.Generator().manual_seed(case.seed + 11)
    shifts = torch.randint(-80, 81, (case.groups,), generator=gen).to(torch.float64) / 8
    per_row = shifts[case.slots]
    batch = case.batch
    rewards = batch.rewards
    if rewards.dim() == 1:
        shifted = rewards + per_row.to(rewards.dtype)
    else:
        mask = batch.mask
        positions = torch.arange(mask.shape[1])
        last = mask & (positions == torch.where(mask, positions, -1).amax(dim=1, keepdim=True))
        shifted = rewards + torch.where(last, per_row.unsqueeze(1), 0.0).to(rewards.dtype)
    return batch.replace(rewards=shifted), per_row


def _shift_equivariant(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        shifted, per_row = _shifted(case)
        before = subject.result(case.batch, None)
        value, where = before.items["baseline"]
        offset = per_row.to(value.dtype) if value.dim() == 1 else per_row.to(value.dtype).unsqueeze(1).expand_as(value)
        expected = _Result({"baseline": (value + offset, where)})
        _compare(expected, subject.result(shifted, None), f"adding {per_row.tolist()} to the rows' rewards did not shift the baseline by as much")

    ctx.given(subject.cases(dtype=torch.float64, exact_rewards=True), test)


def _shift_invariant(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        shifted, per_row = _shifted(case)
        _compare(subject.result(case.batch, None), subject.result(shifted, None), f"adding {per_row.tolist()} to the rows' rewards changed the advantages", skip_scalars=True)

    ctx.given(subject.cases(dtype=torch.float64, exact_rewards=True), test)


def _row_advantages(result: _Result, mask: Tensor) -> Tensor:
    adv = result.items["advantages"][0]
    count = mask.sum(dim=1).clamp(min=1).to(adv.dtype)
    return torch.where(mask, adv, torch.zeros((), dtype=adv.dtype)).sum(dim=1) / count


def _zero_sum_per_group(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        per_row = _row_advantages(subject.result(case.batch, None), case.batch.mask)
        for g in range(case.groups):
            members = case.slots == g
            total = float(per_row[members].sum())
            scale = 1.0 + float(per_row.abs().max())
            if abs(total) > 1e-9 * scale * int(members.sum()):
                raise _fail(f"group {g} (rows {torch.nonzero(members).flatten().tolist()}) has advantages {per_row[members].tolist()}, summing to {total!r}, not 0.")

    ctx.given(subject.cases(dtype=torch.float64), test)


def _degenerate_groups_zero(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        batch = case.batch
        mask = batch.mask
        rewards = batch.rewards if batch.rewards.dim() == 1 else torch.where(mask, batch.rewards, 0.0).sum(dim=1)
        adv = subject.result(batch, None).items["advantages"][0]
        for g in range(case.groups):
            members = case.slots == g
            if bool((rewards[members] == rewards[members][0]).all()):
                values = adv[members.unsqueeze(1) & mask]
                if values.numel() and float(values.abs().max()) > 1e-9 * (1.0 + float(rewards.abs().max())):
                    raise _fail(f"group {g} (rows {torch.nonzero(members).flatten().tolist()}) has identical rewards {rewards[members].tolist()} but advantages {values.tolist()}.")

    ctx.given(subject.cases(dtype=torch.float64, degenerate=True, exact_rewards=True), test)


def _outcome_broadcast(part: Part, ctx: _Context) -> None:
    subject = _StageOne.of(part, ctx, composed=True)

    def test(case: strat.StageOneCase) -> None:
        mask = case.batch.mask
        adv = subject.result(case.batch, None).items["advantages"][0]
        for i in range(mask.shape[0]):
            row = adv[i][mask[i]]
            if row.numel() and not bool((row == row[0]).all()):
                raise _fail(f"row {i} has advantages {row.tolist()} on its valid tokens, not one value per sequence.")

    ctx.given(subject.cases(exact_rewards=True), test)


# -- property checks: trust regions ---------------------------------------------------------------


def _pg_at_anchor(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        result = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        expected = _Result({"gradient": (-case.advantages, case.mask)})
        actual = _Result({"gradient": result.items["gradient"]})
        _compare(expected, actual, "at logprobs == anchor, -dloss/dlogprob is not A (the plain policy gradient)")

    ctx.given(strat.region_cases(dtype=torch.float64, at_anchor=True), test)


def _value_at_anchor(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        result = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        _compare(_Result({"loss": (-case.advantages, case.mask)}), _Result({"loss": result.items["loss"]}), "at logprobs == anchor the loss is not -A")

    ctx.given(strat.region_cases(dtype=torch.float64, at_anchor=True), test)


def _zero_grad_clipped_side(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(case: strat.RegionCase) -> None:
        gen = torch.Generator().manual_seed(case.seed + 13)
        mask = case.mask
        rows, tokens = mask.shape
        sign = torch.where(torch.rand(rows, 1, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
        advantages = sign * (0.1 + torch.rand(rows, 1, generator=gen, dtype=torch.float64)) * 2
        anchor = torch.log(0.2 + 0.3 * torch.rand(rows, tokens, generator=gen, dtype=torch.float64))
        logprobs = torch.where(sign > 0, 0.0, torch.log(torch.tensor(1e-6, dtype=torch.float64))).expand(rows, tokens)
        zero = torch.zeros((), dtype=torch.float64)
        inputs = [torch.where(mask, t.expand(rows, tokens), zero) for t in (logprobs, anchor, advantages)]
        result = _region_result(part, inputs[0], inputs[1], inputs[2], mask)
        grad = result.items["gradient"][0]
        bad = mask & (grad.abs() > 1e-12 * inputs[2].abs())
        if bool(bad.any()):
            i, t = (int(v) for v in torch.nonzero(bad)[0])
            raise _fail(
                f"at token [{i}, {t}] with A = {inputs[2][i, t].item():.4g}, anchor prob {inputs[1][i, t].exp().item():.4g} and "
                f"current prob {inputs[0][i, t].exp().item():.4g} (far past the trust region in A's direction) the gradient is {-grad[i, t].item()!r}, not 0."
            )

    ctx.given(strat.region_cases(dtype=torch.float64, outcome=True), test)


_MODERATE = torch.linspace(-10.0, 10.0, 81, dtype=torch.float64)
_EXTREME = torch.tensor([-19.5, -15.0, 15.0, 19.5], dtype=torch.float64)


def _bounded_weight(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[float, float]) -> None:
        offset, magnitude = example
        ratios = torch.cat([_MODERATE, _EXTREME, _MODERATE, _EXTREME]).unsqueeze(1)
        n = _MODERATE.numel() + _EXTREME.numel()
        advantages = torch.cat([torch.full((n, 1), magnitude), torch.full((n, 1), -magnitude)]).to(torch.float64)
        anchor = torch.full_like(ratios, -(20.0 + offset))
        mask = torch.ones_like(ratios, dtype=torch.bool)
        result = _region_result(part, anchor + ratios, anchor, advantages, mask)
        weight = (-result.items["gradient"][0] / advantages).abs().flatten()
        extreme = (ratios.abs() > 10.0).flatten()
        bound = float(weight[~extreme].max())
        worst = int(torch.argmax(torch.where(extreme, weight, -1.0)))
        if not float(weight[worst]) <= bound * (1 + 1e-6) + 1e-9:
            raise _fail(
                f"the weight |g / A| is {float(weight[worst]):.6g} at log-ratio {float(ratios[worst]):g} (A = {float(advantages[worst]):g}) "
                f"but at most {bound:.6g} for |log r| <= 10: it keeps growing with the ratio, so it is not bounded."
            )

    ctx.given(st.tuples(st.floats(0.0, 5.0), st.sampled_from((1e-3, 1.0, 1e3))), test)


def _positively_homogeneous(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, float]) -> None:
        case, a = example
        base = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        scaled = _region_result(part, case.logprobs, case.anchor, a * case.advantages, case.mask)
        expected = _Result({k: (a * base.items[k][0], case.mask) for k in ("loss", "gradient")})
        _compare(expected, scaled, f"scaling the advantages by {a!r} did not scale the loss and gradient by {a!r}")

    ctx.given(st.tuples(strat.region_cases(dtype=torch.float64), st.floats(0.01, 100.0)), test)


def _tokens_independent(part: Part, ctx: _Context) -> None:
    assert isinstance(part, TrustRegion)

    def test(example: tuple[strat.RegionCase, int]) -> None:
        case, pick = example
        valid = torch.nonzero(case.mask)
        i, t = (int(v) for v in valid[pick % valid.shape[0]])
        gen = torch.Generator().manual_seed(case.seed + 17)
        anchor_new = -torch.empty((), dtype=torch.float64).exponential_(1.0, generator=gen)
        lp_new = (anchor_new + torch.randn((), generator=gen, dtype=torch.float64)).clamp(max=0.0)
        adv_new = torch.randn((), generator=gen, dtype=torch.float64)
        tensors = [x.clone() for x in (case.logprobs, case.anchor, case.advantages)]
        for x, v in zip(tensors, (lp_new, anchor_new, adv_new)):
            x[i, t] = v
        before = _region_result(part, case.logprobs, case.anchor, case.advantages, case.mask)
        after = _region_result(part, tensors[0], tensors[1], tensors[2], case.mask)
        keep = _Result({k: (v, w & ~_one_hot(case.mask.shape, i, t)) for k, (v, w) in before.items.items() if w is not None})
        _compare(keep, after, f"changing only token [{i}, {t}] changed another token's output")

    ctx.given(st.tuples(strat.region_cases(dtype=torch.float64), st.integers(0, 63)), test)


def _one_hot(shape: torch.Size, i: int, t: int) -> Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[i, t] = True
    return out


# -- the catalogue ------------------------------------------------------------------------------------

_STAGE_ONE = frozenset({"baseline", "advantage"})
_AXES = frozenset(AXES)
_ALL = frozenset(PART_KINDS)
_PER_ROW = frozenset({"region", "preference"})

_UNIVERSAL = (
    Check("properties_known", _ALL, "every declared property is one the kit knows for this kind", False, _properties_known),
    Check("shape_dtype_device", _ALL, "outputs have the documented type and shape, and keep the inputs' dtype and device", False, _shape_dtype_device),
    Check("finite_outputs", _ALL, "finite inputs (extreme log-ratios, singleton and degenerate groups included) give finite outputs and gradients", False, _finite(False)),
    Check("fully_masked_rows", _AXES, "a row with no valid token gives finite outputs everywhere", False, _finite(True)),
    Check("masked_positions_ignored", _AXES, "setting padded inputs to garbage (NaN and inf too, for stage 1) changes nothing at valid positions", False, _masked_positions_ignored),
    Check("no_gradient_leak", _STAGE_ONE, "stage-1 outputs never require grad: not under torch.no_grad(), nor when no input requires grad", False, _no_gradient_leak),
    Check("rows_independent", _PER_ROW, "each row's (or pair's) loss depends only on that row: no reduction over the batch", False, _rows_independent),
    Check("inputs_not_mutated", _ALL, "inputs are never modified in place", False, _inputs_not_mutated),
    Check("deterministic", _ALL, "the same inputs give bitwise the same outputs", False, _deterministic),
)
_PROPERTY_RUNNERS: dict[str, Callable[[Part, _Context], None]] = {
    "group_independent": _group_independent,
    "permutation_equivariant": _permutation_equivariant,
    "shift_equivariant": _shift_equivariant,
    "shift_invariant": _shift_invariant,
    "zero_sum_per_group": _zero_sum_per_group,
    "degenerate_groups_zero": _degenerate_groups_zero,
    "outcome_broadcast": _outcome_broadcast,
    "pg_at_anchor": _pg_at_anchor,
    "value_at_anchor": _value_at_anchor,
    "zero_grad_clipped_side": _zero_grad_clipped_side,
    "bounded_weight": _bounded_weight,
    "positively_homogeneous": _positively_homogeneous,
    "tokens_independent": _tokens_independent,
}
_PROPERTY_CHECKS = tuple(Check(p.name, p.kinds, p.meaning, True, _PROPERTY_RUNNERS[p.name]) for p in _PROPERTIES)

CHECKS: dict[str, Check] = {c.name: c for c in (*_UNIVERSAL, *_PROPERTY_CHECKS)}
"""Every check, by name: the universal ones first, then one per property."""


def checks_for(part: Part | type[Part]) -> list[Check]:
    """The checks that apply to `part`: the universal ones of its kind, then those of its declared properties."""
    instance = as_instance(part)
    return [c for c in CHECKS.values() if c.applies_to(instance)]


@attrs.frozen
class CheckResult:
    """The outcome of one check on one part: `error` is None when it passed."""

    part: Part
    check: Check
    error: CheckFailure | None

    @property
    def passed(self) -> bool:
        return self.error is None


def run_checks(
    part: Part | type[Part],
    *,
    checks: Iterable[str] | None = None,
    max_examples: int | None = None,
    registry: Registry | None = None,
    device: str | None = None,
) -> list[CheckResult]:
    """Run every applicable check (or the named `checks`) on `part`; never raises for a failing check."""
    instance = as_instance(part)
    selected = checks_for(instance) if checks is None else [CHECKS[name] for name in checks]
    results = []
    for check in selected:
        configured = check.configured(max_examples=max_examples, registry=registry, device=device)
        try:
            configured(instance)
        except CheckFailure as exc:
            results.append(CheckResult(instance, check, exc))
        else:
            results.append(CheckResult(instance, check, None))
    return results
