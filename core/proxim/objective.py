"""An objective: a baseline, an advantage estimator and a trust region, resolved once and called directly.

Stage 1 (`Objective.advantages`, once per rollout, no grad) turns rewards into per-token advantages.
Stage 2 (`Objective.loss`, per minibatch, with grad) turns log-probs and advantages into a scalar loss,
adding the KL, entropy and value terms the options ask for. Neither stage touches pluggy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import attrs
import torch
from torch import Tensor

from proxim import aggregation
from proxim.errors import BatchError, ConfigurationError, UnknownNameError, suggest
from proxim.ops import (
    Padding,
    LOG_RATIO_CLAMP,
    group_index,
    kl_estimate,
    masked_mean,
    masked_sum,
    sequence_rewards,
    sequence_to_token_rewards,
    zero_padding,
)
from proxim.parts import AXES, Advantage, Baseline, Part, RegionOutput, TrustRegion, check_part_instance
from proxim.penalties import value_loss
from proxim.preference import PreferenceObjective
from proxim.registry import PartInfo, Registry, default_registry
from proxim.rollout import Estimate, LossOutput, Rollout

_P = TypeVar("_P", bound=Part)


def _choice(*allowed: str) -> Any:
    return attrs.validators.in_(allowed)


def _at_least(low: float) -> Any:
    return attrs.validators.ge(low)


def _optional_positive(instance: object, attribute: Any, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be None or > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Options:
    """Objective-level options (not part hyperparameters).

    aggregation:   how the per-token loss becomes a scalar; see `proxim.aggregation`. Default token_mean.
    max_length:    L_max for seq_mean_token_sum_norm; None uses the batch's T (pass a constant, e.g. the
                   generation limit, for exact micro-batch invariance).
    kl_coef:       beta of the KL to the reference policy, >= 0. 0 turns the term off.
    kl_estimator:  "k1", "k2" or "k3" (Schulman); see `proxim.ops.kl_estimate`.
    kl_in:         "loss" (differentiated, aggregated like the policy loss; GRPO) or "reward" (from the
                   sampling-time log-probs, subtracted from the rewards before stage 1; PPO-RLHF, RLOO).
    entropy_coef:  weight of the entropy bonus, >= 0; `loss()` then needs per-token `entropy`.
    value_coef:    weight of the critic loss, >= 0; used when the baseline provides state values.
    value_clip:    the value-clip range, or None for the unclipped squared error.
    anchor:        the trust region's reference log-probs: "old" (Rollout.old_logprobs: recomputed by the
                   trainer before the update, classic PPO/GRPO) or "rollout" (Rollout.rollout_logprobs:
                   the inference engine's, mu in DPPO/DRPO, which covers train/inference mismatch too).
    """

    aggregation: str = attrs.field(default="token_mean", validator=_choice(*aggregation.MODES))
    max_length: int | None = attrs.field(default=None, validator=_optional_positive)
    kl_coef: float = attrs.field(default=0.0, validator=_at_least(0.0))
    kl_estimator: str = attrs.field(default="k3", validator=_choice("k1", "k2", "k3"))
    kl_in: str = attrs.field(default="loss", validator=_choice("loss", "reward"))
    entropy_coef: float = attrs.field(default=0.0, validator=_at_least(0.0))
    value_coef: float = attrs.field(default=0.5, validator=_at_least(0.0))
    value_clip: float | None = attrs.field(default=None, validator=_optional_positive)
    anchor: str = attrs.field(default="old", validator=_choice("old", "rollout"))


OPTION_NAMES = tuple(a.name for a in attrs.fields(Options))


@attrs.frozen(kw_only=True, eq=False)
class Objective:
    """A composed objective. Build it with `proxim.objective(...)`; it is immutable."""

    baseline: Baseline
    advantage: Advantage
    region: TrustRegion
    options: Options = attrs.field(factory=Options)
    preset: str | None = None
    sources: Mapping[str, PartInfo | None] = attrs.field(factory=dict)
    _region_takes_metrics: bool = attrs.field(init=False, repr=False)
    """Whether `region` accepts ``metrics=``; read once here, not on every `loss` call (nor while compiling)."""

    @_region_takes_metrics.default
    def _region_flag(self) -> bool:
        return _takes_metrics_flag(self.region)

    # -- description ----------------------------------------------------------------------------
    @property
    def parts(self) -> dict[str, Part]:
        return {"baseline": self.baseline, "advantage": self.advantage, "region": self.region}

    @property
    def has_critic(self) -> bool:
        return self.baseline.provides_state_values

    @property
    def requires(self) -> frozenset[str]:
        """The optional Rollout fields this objective needs."""
        needed = set().union(*(p.requires for p in self.parts.values()))
        if self.options.kl_coef > 0:
            needed.add("ref_logprobs")
        if self.options.anchor == "rollout":
            needed.add("rollout_logprobs")
        return frozenset(needed)

    @property
    def fingerprint(self) -> str:
        """A stable string naming parts, hyperparameters, options and the plugin versions that supplied them."""
        fields = []
        for kind, part in self.parts.items():
            info = self.sources.get(kind)
            origin = f"{info.distribution}=={info.version}" if info else f"{type(part).__module__}.{type(part).__qualname__}"
            fields.append(f"{kind}={part.describe()}@{origin}")
        options = ",".join(f"{k}={v!r}" for k, v in attrs.asdict(self.options).items())
        return "|".join([*fields, f"options({options})"])

    def __repr__(self) -> str:
        head = f"preset={self.preset!r}, " if self.preset else ""
        parts = ", ".join(f"{k}={p.describe()}" for k, p in self.parts.items())
        return f"Objective({head}{parts}, {self.options!r})"

    def override(self, **overrides: Any) -> Objective:
        """A copy with hyperparameters or options changed, routed by field name like `proxim.objective`."""
        parts, options = _route(self.parts, attrs.asdict(self.options), overrides, origin="override")
        return _assemble(parts, options, self.preset, self.sources)

    def normalizer(self, mask: Tensor) -> Tensor:
        """The aggregation's denominator for `mask`: pass the whole step's count to each micro-batch's `loss()`."""
        return aggregation.default_normalizer(mask, self.options.aggregation)

    # -- stage 1 --------------------------------------------------------------------------------
    def advantages(self, batch: Rollout) -> Estimate:
        """Per-token advantages [B, T] (and critic returns) for a rollout batch. Runs without grad."""
        self._check_requires(batch)
        with torch.no_grad():
            shaped, totals, kl_penalty = self._shape_rewards(batch)
            self._check_group_sizes(shaped)
            baseline = self.baseline(shaped._with(rewards=totals))
            raw = self.advantage(shaped, baseline)
            mask = batch.mask
            adv = zero_padding(raw.advantages.to(batch.old_logprobs.dtype), mask)
            returns = None if raw.returns is None else zero_padding(raw.returns.to(adv.dtype), mask)
            metrics = dict(raw.metrics)
            metrics.update(self._stage_one_metrics(batch, adv))
            if kl_penalty is not None:
                metrics["reward/kl_penalty"] = kl_penalty
        return Estimate(advantages=adv, returns=returns, rewards=shaped.rewards, metrics=metrics)

    def _stage_two_requires(self) -> frozenset[str]:
        """The Rollout fields `loss` reads (stage 1 may need more, e.g. ``group``)."""
        needed = set()
        if self.options.kl_in == "loss" and self.options.kl_coef > 0:
            needed.add("ref_logprobs")
        if self.options.anchor == "rollout":
            needed.add("rollout_logprobs")
        if self.has_critic and self.options.value_coef > 0:
            needed.add("values")
        return frozenset(needed)

    def _check_requires(self, batch: Rollout, fields: frozenset[str] | None = None) -> None:
        missing = sorted(f for f in (self.requires if fields is None else fields) if getattr(batch, f) is None)
        if missing:
            why = []
            for field in missing:
                users = [f"{k} {p.name!r}" for k, p in self.parts.items() if field in p.requires]
                if field == "ref_logprobs" and self.options.kl_coef > 0:
                    users.append(f"kl_coef={self.options.kl_coef}")
                if field == "rollout_logprobs":
                    users.append("anchor='rollout'")
                why.append(f"Rollout.{field} (needed by {', '.join(users)})")
            raise BatchError(f"this objective needs {'; '.join(why)}, but the batch has None there.")

    def _shape_rewards(self, batch: Rollout) -> tuple[Rollout, Tensor, Tensor | None]:
        """Rewards as the advantage wants them ([B, T] or [B]) and each sequence's total [B] for the
        baseline, both with KL-in-reward applied; and the mean KL penalty for the metrics.

        The totals are taken before outcome rewards are placed on tokens, so that a fully masked row's
        reward still counts in its group's baseline whichever kind of advantage follows.
        """
        mask = batch.mask
        rewards = batch.rewards.to(batch.old_logprobs.dtype)
        totals = rewards if rewards.dim() == 1 else masked_sum(rewards, mask, dim=1)
        kl_tokens = None
        if self.options.kl_in == "reward" and self.options.kl_coef > 0:
            assert batch.ref_logprobs is not None  # guaranteed by _check_requires
            kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, self.options.kl_estimator)
            kl_tokens = self.options.kl_coef * zero_padding(kl, mask)
            totals = totals - kl_tokens.sum(dim=1)
        if not self.advantage.token_level:
            return batch._with(rewards=totals), totals, None if kl_tokens is None else kl_tokens.sum(dim=1).mean()
        if rewards.dim() == 1:
            rewards = sequence_to_token_rewards(rewards, mask)
        rewards = zero_padding(rewards, mask)
        if kl_tokens is not None:
            rewards = rewards - kl_tokens
        return batch._with(rewards=rewards), totals, None if kl_tokens is None else kl_tokens.sum(dim=1).mean()

    def _check_group_sizes(self, batch: Rollout) -> None:
        for kind, part in self.parts.items():
            if part.min_group_size <= 1:
                continue
            sizes = batch.group_sizes()
            small = sizes < part.min_group_size
            if bool(small.any()):
                first = int(torch.nonzero(small)[0, 0])
                gid = "(no group ids)" if batch.group is None else f"group id {int(batch.group[first])}"
                raise BatchError(
                    f"{kind} {part.name!r} needs at least {part.min_group_size} responses per group, but "
                    f"{gid} (row {first}) has {int(sizes[first])}. Sample more responses per prompt "
                    f"or drop groups smaller than {part.min_group_size}."
                )

    def _stage_one_metrics(self, batch: Rollout, adv: Tensor) -> dict[str, Tensor]:
        mask = batch.mask
        mean = masked_mean(adv, mask)
        count = mask.sum().clamp(min=2).to(adv.dtype)
        std = (masked_sum((adv - mean) ** 2, mask) / (count - 1)).sqrt()
        seq_rewards = sequence_rewards(batch.rewards.to(adv.dtype), mask)
        metrics = {"advantage/mean": mean, "advantage/std": std, "reward/mean": seq_rewards.mean()}
        if batch.group is not None:
            # A group has zero spread when its largest and smallest rewards are equal: exact, unlike a std
            # taken around a rounded mean (three rewards of 0.1 have std ~1e-17). Groups of one count.
            index, k = group_index(batch.group)
            fill = torch.full((k,), torch.inf, dtype=seq_rewards.dtype, device=seq_rewards.device)
            high = (-fill).scatter_reduce(0, index, seq_rewards, "amax")
            low = fill.scatter_reduce(0, index, seq_rewards, "amin")
            metrics["advantage/zero_std_groups"] = (high == low).sum().to(adv.dtype)
        return metrics

    # -- stage 2 --------------------------------------------------------------------------------
    def loss(
        self,
        logprobs: Tensor,
        batch: Rollout,
        estimate: Estimate,
        values: Tensor | None = None,
        normalizer: Tensor | int | None = None,
        entropy: Tensor | None = None,
        metrics: bool = True,
    ) -> LossOutput:
        """The scalar loss for a (mini)batch.

        logprobs:   [B, T] log-probs of the sampled tokens under the current policy (with grad).
        values:     [B, T] current critic values, needed when the objective trains a critic.
        normalizer: the aggregation denominator counted over the whole step (`Objective.normalizer`), so
                    that micro-batch losses sum to the full-batch loss; default, this batch's own count.
        entropy:    [B, T] per-token policy entropy, needed when entropy_coef > 0.
        metrics:    False skips the per-token diagnostics (the region's clip fractions, ratio statistics,
                    approximate KL), which cost about as much as the loss itself on CPU: for steps that
                    log nothing. The loss terms (``loss/*``) are reported either way; the loss and its
                    gradient do not change.
        """
        mask = batch.mask
        self._check_requires(batch, self._stage_two_requires())
        _check_stage_two("logprobs", logprobs, mask)
        opts = self.options
        # Every tensor entering the math is zeroed at masked positions once, here (padding may hold NaN
        # or inf); the aggregation masks what comes out, so nothing from padding reaches loss or gradient.
        padding = _padding(batch, logprobs.dtype)
        lp = padding.zero(logprobs)
        anchor = _zeroed(batch, "old_logprobs" if opts.anchor == "old" else "rollout_logprobs", padding)
        adv = estimate.advantages.to(logprobs.dtype)
        if adv.shape != mask.shape:
            raise BatchError(f"estimate.advantages has shape {tuple(adv.shape)} but the batch is {tuple(mask.shape)}; slice both with the same index.")

        def agg(per_token: Tensor) -> Tensor:
            return aggregation.reduce(per_token, padding, opts.aggregation, normalizer, opts.max_length)

        call: Callable[..., RegionOutput] = self.region  # `metrics=` is an optional extra of the built-ins
        region = call(lp, anchor, adv, mask, metrics=metrics) if self._region_takes_metrics else call(lp, anchor, adv, mask)
        policy = agg(region.loss)
        total = policy
        out = {"loss/policy": policy.detach()}
        if opts.kl_in == "loss" and opts.kl_coef > 0:
            ref = _zeroed(batch, "ref_logprobs", padding)
            kl = agg(kl_estimate(lp, ref, opts.kl_estimator))
            total = total + opts.kl_coef * kl
            out["loss/kl"] = kl.detach()
        if opts.entropy_coef > 0:
            if entropy is None:
                raise BatchError(f"entropy_coef={opts.entropy_coef} needs loss(..., entropy=[B, T] per-token entropies).")
            _check_stage_two("entropy", entropy, mask)
            ent = agg(padding.zero(entropy))
            total = total - opts.entropy_coef * ent
            out["loss/entropy"] = ent.detach()
        if self.has_critic and opts.value_coef > 0:
            total = total + opts.value_coef * self._value_term(values, batch, estimate, agg, out)
        if metrics:
            out.update(_region_metrics(region.metrics, lp.detach(), anchor, padding))
        out["loss/total"] = total.detach()
        return LossOutput(loss=total, metrics=out)

    def _value_term(self, values: Tensor | None, batch: Rollout, estimate: Estimate, agg: Callable[[Tensor], Tensor], metrics: dict[str, Tensor]) -> Tensor:
        if values is None:
            raise BatchError(
                f"baseline {self.baseline.name!r} trains a critic (value_coef={self.options.value_coef}): "
                f"pass loss(..., values=[B, T] current critic values), or set value_coef=0."
            )
        _check_stage_two("values", values, batch.mask)
        if estimate.returns is None or batch.values is None:
            raise BatchError(f"advantage {self.advantage.name!r} produced no returns to regress the critic on.")
        padding = _padding(batch, values.dtype)
        per_token = value_loss(
            padding.zero(values),
            _zeroed(batch, "values", padding),
            estimate.returns.to(values.dtype),
            self.options.value_clip,
        )
        term = agg(per_token)
        metrics["loss/value"] = term.detach()
        return term


def _padding(batch: Rollout, dtype: torch.dtype) -> Padding:
    """The batch's mask with what masking in `dtype` needs (`proxim.ops.Padding`), derived once per Rollout (eager)."""
    return batch._derived(("padding", dtype), (batch.mask,), lambda: Padding.of(batch.mask, dtype))


def _zeroed(batch: Rollout, field: str, padding: Padding) -> Tensor:
    """A [B, T] field of the batch (log-probs, values) in `padding`'s dtype, detached, 0 where masked; derived once per Rollout (eager)."""
    source = getattr(batch, field)
    assert source is not None  # guaranteed by Objective._check_requires
    return batch._derived(("zeroed", field, padding.dtype), (source, padding.mask), lambda: padding.zero(source.to(padding.dtype)).detach())


def _takes_metrics_flag(region: TrustRegion) -> bool:
    """Whether the region's ``__call__`` accepts ``metrics=`` (the built-ins do: with False they skip their
    per-token diagnostics). Regions written without it still work; their metrics are computed and dropped."""
    try:
        parameters = inspect.signature(type(region).__call__).parameters
    except (TypeError, ValueError):
        return False
    flag = parameters.get("metrics")
    return flag is not None and flag.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_stage_two(name: str, t: Tensor, mask: Tensor) -> None:
    if not isinstance(t, Tensor) or t.shape != mask.shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise BatchError(f"{name} must be a [B, T] tensor of shape {tuple(mask.shape)} like the batch's mask, got {got}.")
    if not t.is_floating_point():
        raise BatchError(f"{name} must be floating point, got dtype {t.dtype}.")
    if t.device != mask.device:
        raise BatchError(f"{name} is on {t.device} but the batch is on {mask.device}.")


def _region_metrics(per_token: Mapping[str, Tensor], lp: Tensor, anchor: Tensor, padding: Padding) -> dict[str, Tensor]:
    """Masked means of the region's per-token metrics, and ratio statistics. `lp` and `anchor` are 0 where
    the mask is False (as `Objective.loss` passes them), so the log-ratio there is exactly 0.

    Written for the eager hot path, where it would otherwise cost as much as the loss on CPU: the
    `Padding`'s token count, boolean metrics counted in int32 (no float copy) through one scratch buffer,
    one ``expm1`` for both the ratio and the approximate KL (the ratio is taken as ``expm1(lr) + 1``,
    within one rounding of ``exp(lr)``), and in-place arithmetic on its own temporaries (on CPU a fresh
    [B, T] buffer costs more in page faults than the arithmetic written into it).
    """
    mask = padding.mask
    count = padding.tokens
    out: dict[str, Tensor] = {}
    scratch: Tensor | None = None  # one buffer for every boolean metric's `& mask`
    for key, value in per_token.items():
        value = value.detach()
        if value.dtype == torch.bool and value.shape == mask.shape:
            scratch = torch.logical_and(value, mask, out=torch.empty_like(mask) if scratch is None else scratch)
            out[f"region/{key}"] = scratch.sum(dtype=torch.int32).to(lp.dtype) / count
        elif value.dtype == torch.bool:
            out[f"region/{key}"] = (value & mask).sum(dtype=torch.int32).to(lp.dtype) / count
        else:
            out[f"region/{key}"] = padding.sum(value.to(lp.dtype)) / count
    lr = (lp - anchor).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ops.log_ratio, in place
    excess = torch.expm1(lr)
    out["region/approx_kl"] = lr.neg_().add_(excess).sum() / count  # expm1(lr) - lr; 0 where masked (lr = 0)
    ratio = excess.add_(1.0)  # exactly 1 where masked (lr = 0 there), so masking by multiplication is exact
    ratio = padding.zero(ratio) if padding.weights is None else ratio.mul_(padding.weights)
    out["region/ratio_mean"] = ratio.sum() / count
    out["region/ratio_max"] = ratio.amax()
    return out


# -- building ----------------------------------------------------------------------------------------

PartSpec = str | Part | None


def objective(
    preset: str | None = None,
    /,
    *,
    baseline: PartSpec = None,
    advantage: PartSpec = None,
    region: PartSpec = None,
    registry: Registry | None = None,
    **overrides: Any,
) -> Any:
    """Compose an objective from a preset and/or named parts, with hyperparameter overrides.

    ``objective("grpo", eps_high=0.28)``; ``objective(advantage="pairwise", region="quadratic")``;
    ``objective(region=MyRegion(tau=2.0), advantage="group_normalized")``. Overrides are routed to the
    one part (or the objective options) that has a field of that name; qualify as ``"region.eps_low"``
    (``**{"region.eps_low": 0.1}``) when two parts share a name. A preset's parts stay unless replaced
    (its settings for a replaced axis are dropped). Without a preset: no baseline means the
    advantage's `default_baseline`, no region means ``clip``.
    """
    reg = registry or default_registry()
    if preset is not None and preset not in reg.entries["preset"]:
        if preset in reg.entries["preference"]:
            if baseline is not None or advantage is not None or region is not None:
                raise ConfigurationError(f"{preset!r} is an offline preference loss: it takes no baseline, advantage or region.")
            return _preference_objective(reg, preset, overrides)
        known = sorted(reg.entries["preset"])
        preferences = sorted(reg.entries["preference"])
        raise UnknownNameError(
            f"no preset named {preset!r}.{suggest(preset, known + preferences)} Registered presets: {', '.join(known)}. "
            f"Preference losses: {', '.join(preferences) or '(none)'}."
        )
    chosen: dict[str, PartSpec] = {"baseline": baseline, "advantage": advantage, "region": region}
    preset_record = reg.get("preset", preset) if preset is not None else None
    if preset_record is None and advantage is None:
        raise ConfigurationError(
            "name a preset or an advantage: objective('grpo') or objective(advantage='group_normalized', ...). "
            f"Presets: {', '.join(sorted(reg.entries['preset']))}."
        )
    from_preset = {kind: preset_record is not None and chosen[kind] is None for kind in AXES}
    if preset_record is not None:
        chosen = {kind: spec if spec is not None else getattr(preset_record, kind) for kind, spec in chosen.items()}
    if chosen["region"] is None:
        chosen["region"] = "clip"
    advantage_cls = _resolve_class(reg, "advantage", chosen["advantage"])
    if chosen["baseline"] is None:
        chosen["baseline"] = advantage_cls.default_baseline

    parts: dict[str, Part] = {}
    sources: dict[str, PartInfo | None] = {}
    for kind in AXES:
        spec = chosen[kind]
        if isinstance(spec, str):
            cls = _resolve_class(reg, kind, spec)
            parts[kind] = _construct(cls, kind, {})
            sources[kind] = reg.info(kind, spec)
        else:
            assert isinstance(spec, Part)
            check_part_instance(spec, kind)
            parts[kind] = spec
            sources[kind] = reg.info_of(spec)

    options: dict[str, Any] = {}
    if preset_record is not None:
        kept = {k: v for k, v in preset_record.settings.items() if _applies(k, from_preset)}
        parts, options = _route(parts, options, kept, origin=f"preset {preset!r}")
    parts, options = _route(parts, options, overrides, origin="override")
    return _assemble(parts, options, preset, sources)


def _preference_objective(reg: Registry, name: str, overrides: Mapping[str, Any]) -> PreferenceObjective:
    cls = reg.get("preference", name)
    fields = cls.hyperparameters()
    kwargs = {}
    for key, value in overrides.items():
        field = key.removeprefix("preference.")
        if field not in fields:
            raise UnknownNameError(
                f"override {key!r}: preference loss {name!r} has no hyperparameter {field!r}.{suggest(field, fields)} "
                f"Its hyperparameters: {', '.join(fields) or '(none)'}."
            )
        kwargs[field] = value
    return PreferenceObjective(preference=_construct(cls, "preference", kwargs), source=reg.info("preference", name))


def _applies(key: str, from_preset: Mapping[str, bool]) -> bool:
    """A preset setting qualified with an axis applies only while that axis keeps the preset's part."""
    axis, dot, _ = key.partition(".")
    return not dot or from_preset.get(axis, True)


def _resolve_class(reg: Registry, kind: str, spec: PartSpec) -> type[Any]:
    if isinstance(spec, Part):
        return type(spec)
    if not isinstance(spec, str):
        raise ConfigurationError(f"{kind}= takes a registered name or a part instance, got {spec!r}.")
    cls: type[Any] = reg.get(kind, spec)
    return cls


def _message(exc: Exception) -> str:
    """An exception's own sentence (attrs validators put extra context after it in ``args``)."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)


def _construct(cls: type[_P], kind: str, kwargs: Mapping[str, Any]) -> _P:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{kind} {cls.name!r}: {_message(exc)}") from exc


def _route(
    parts: Mapping[str, Part], options: Mapping[str, Any], overrides: Mapping[str, Any], origin: str
) -> tuple[dict[str, Part], dict[str, Any]]:
    """Send each override to the part (or the options) with that field; return updated parts and options."""
    per_axis: dict[str, dict[str, Any]] = {kind: {} for kind in parts}
    new_options = dict(options)
    for key, value in overrides.items():
        axis, dot, field = key.rpartition(".")
        if dot:
            target = _qualified_target(axis, field, parts, origin, key)
        else:
            target = _unqualified_target(field, parts, origin)
        if target == "objective":
            new_options[field] = value
        else:
            per_axis[target][field] = value
    updated = {}
    for kind, part in parts.items():
        kwargs = per_axis[kind]
        if not kwargs:
            updated[kind] = part
            continue
        try:
            updated[kind] = attrs.evolve(cast(Any, part), **kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{kind} {part.name!r} ({origin}): {_message(exc)}") from exc
    return updated, new_options


def _qualified_target(axis: str, field: str, parts: Mapping[str, Part], origin: str, key: str) -> str:
    if axis == "objective":
        if field not in OPTION_NAMES:
            raise UnknownNameError(f"{origin} {key!r}: objective options are {', '.join(OPTION_NAMES)}.{suggest(field, OPTION_NAMES)}")
        return "objective"
    if axis not in parts:
        raise UnknownNameError(f"{origin} {key!r}: {axis!r} is not an axis; qualify with baseline., advantage., region. or objective.")
    names = parts[axis].hyperparameters()
    if field not in names:
        raise UnknownNameError(
            f"{origin} {key!r}: {axis} {parts[axis].name!r} has no hyperparameter {field!r}."
            f"{suggest(field, names)} Its hyperparameters: {', '.join(names) or '(none)'}."
        )
    return axis


def _unqualified_target(field: str, parts: Mapping[str, Part], origin: str) -> str:
    owners = [kind for kind, part in parts.items() if field in part.hyperparameters()]
    if field in OPTION_NAMES:
        owners.append("objective")
    if len(owners) == 1:
        return owners[0]
    if owners:
        spelled = ", ".join(f"'{o}.{field}'" for o in owners)
        raise ConfigurationError(f"{origin} {field!r} is ambiguous: {' and '.join(owners)} all have it; write one of {spelled}.")
    everything = {f"{kind} {part.name!r}": part.hyperparameters() for kind, part in parts.items()}
    listing = "; ".join(f"{who}: {', '.join(names) or '(none)'}" for who, names in everything.items())
    all_names = [n for names in everything.values() for n in names] + list(OPTION_NAMES)
    raise UnknownNameError(
        f"{origin} {field!r} matches no hyperparameter of this objective.{suggest(field, all_names)} "
        f"Hyperparameters — {listing}; objective options: {', '.join(OPTION_NAMES)}."
    )


def _assemble(parts: Mapping[str, Part], options: Mapping[str, Any], preset: str | None, sources: Mapping[str, PartInfo | None]) -> Objective:
    try:
        opts = Options(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"objective option: {_message(exc)}") from exc
    baseline, advantage, region = parts["baseline"], parts["advantage"], parts["region"]
    assert isinstance(baseline, Baseline) and isinstance(advantage, Advantage) and isinstance(region, TrustRegion)
    if advantage.needs_state_values and not baseline.provides_state_values:
        raise ConfigurationError(
            f"advantage {advantage.name!r} bootstraps from state values V(s_t), which baseline {baseline.name!r} "
            f"does not provide; use baseline='critic' (a learned value function) or another advantage."
        )
    if baseline.provides_state_values and not advantage.accepts_state_values:
        raise ConfigurationError(
            f"advantage {advantage.name!r} compares sequence rewards with one baseline per sequence, but baseline "
            f"{baseline.name!r} gives per-token state values V(s_t); use 'gae' or 'diff' with a critic, or a "
            f"sequence baseline (group_mean, leave_one_out, batch_mean, none)."
        )
    return Objective(baseline=baseline, advantage=advantage, region=region, options=opts, preset=preset, sources=dict(sources))
