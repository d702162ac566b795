"""A composed objective: a baseline, an advantage estimator and a trust region, resolved once and called directly.

Stage 1 (`Objective.advantages`, once per rollout, no grad) turns rewards into per-token advantages.
Stage 2 (`Objective.loss`, per minibatch, with grad) turns log-probs and advantages into a scalar loss,
adding the KL, entropy and value terms the options ask for, and weighting the policy term by the rollout
correction when asked (`rollout_correction_weights`). Neither stage touches pluggy.
Build one with `proxim.objective(...)`; `assemble` is the last step of that, shared with `Objective.override`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import attrs
import torch
from torch import Tensor

from proxim import aggregation
from proxim.diagnostics import (
    GradientDiagnostics,
    check_declared_metrics,
    check_metric_keys,
    gradient_diagnostics,
    mean_or_zero,
    region_metrics,
    stage_one_metrics,
)
from proxim.errors import BatchError, ConfigurationError
from proxim.ops import Padding, compute_dtype, kl_estimate, log_ratio, masked_sum, sequence_to_token_rewards, zero_padding
from proxim.options import Options
from proxim.parts import Advantage, Baseline, Part, TrustRegion
from proxim.penalties import value_loss
from proxim.registry import PartInfo
from proxim.rollout import Estimate, LossOutput, Rollout
from proxim.routing import error_message, route


@attrs.frozen(kw_only=True, eq=False)
class Objective:
    """A composed objective. Build it with `proxim.objective(...)`; it is immutable."""

    baseline: Baseline
    advantage: Advantage
    region: TrustRegion
    options: Options = attrs.field(factory=Options)
    preset: str | None = None
    sources: Mapping[str, PartInfo | None] = attrs.field(factory=dict)

    # -- description ----------------------------------------------------------------------------
    @property
    def parts(self) -> dict[str, Part]:
        return {"baseline": self.baseline, "advantage": self.advantage, "region": self.region}

    @property
    def has_critic(self) -> bool:
        return self.baseline.provides_state_values

    @property
    def needs_entropy(self) -> bool:
        """Whether `loss` needs per-token ``entropy=`` (an entropy bonus: ``options.entropy_coef > 0``)."""
        return self.options.entropy_coef > 0

    @property
    def requires(self) -> frozenset[str]:
        """The optional Rollout fields this objective needs."""
        needed = set().union(*(p.requires for p in self.parts.values()))
        if self.options.kl_coef > 0:
            needed.add("ref_logprobs")
        if self.options.anchor == "rollout" or self.options.rollout_correction != "none":
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

    def override(self, **overrides: object) -> Objective:
        """A copy with hyperparameters or options changed, routed by field name like `proxim.objective`."""
        parts, options = route(self.parts, attrs.asdict(self.options), overrides, origin="override")
        return assemble(parts, options, self.preset, self.sources)

    def normalizer(self, mask: Tensor) -> Tensor:
        """The aggregation's denominator for `mask`: pass the whole step's count to each micro-batch's `loss()`."""
        return aggregation.default_normalizer(mask, self.options.aggregation)

    # -- stage 1 --------------------------------------------------------------------------------
    def advantages(self, batch: Rollout) -> Estimate:
        """Per-token advantages [B, T] (and critic returns) for a rollout batch. Runs without grad.

        Computed in float32 at least: half-precision (float16, bfloat16) tensors of the batch are upcast
        first, and the advantages come back in float32, or in the log-probs' dtype when it is wider. An
        empty batch (B = 0 or T = 0) gives empty advantages and metrics of 0.
        """
        self._check_requires(batch)
        with torch.no_grad():
            batch = _at_least_float32(batch)
            shaped, totals, kl_penalty = self._shape_rewards(batch)
            self._check_group_sizes(shaped)
            mask = batch.mask
            if mask.numel() == 0:  # B = 0 or T = 0: [B, T] results have no entries to compute; no part is called
                adv = torch.zeros(mask.shape, dtype=batch.old_logprobs.dtype, device=mask.device)
                returns, metrics = (adv if self.has_critic else None), {}
            else:
                baseline = self.baseline(shaped._with(rewards=totals))
                raw = self.advantage(shaped, baseline)
                check_metric_keys("advantage", self.advantage, raw.metrics)
                adv = zero_padding(raw.advantages.to(batch.old_logprobs.dtype), mask)
                returns = None if raw.returns is None else zero_padding(raw.returns.to(adv.dtype), mask)
                metrics = {f"advantage/{key}": value for key, value in raw.metrics.items()}
            metrics.update(stage_one_metrics(batch, adv))
            if kl_penalty is not None:
                metrics["reward/kl_penalty"] = kl_penalty
        return Estimate(advantages=adv, returns=returns, rewards=shaped.rewards, metrics=metrics)

    def _stage_two_requires(self) -> frozenset[str]:
        """The Rollout fields `loss` reads (stage 1 may need more, e.g. ``group``)."""
        needed = set()
        if self.options.kl_in == "loss" and self.options.kl_coef > 0:
            needed.add("ref_logprobs")
        if self.options.anchor == "rollout" or self.options.rollout_correction != "none":
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
                if field == "rollout_logprobs" and self.options.anchor == "rollout":
                    users.append("anchor='rollout'")
                if field == "rollout_logprobs" and self.options.rollout_correction != "none":
                    users.append(f"rollout_correction={self.options.rollout_correction!r}")
                why.append(f"Rollout.{field} (needed by {', '.join(users)})")
            fix = (
                " Pass the inference engine's log-probs of the sampled tokens (Rollout.rollout_logprobs), or set rollout_correction='none'."
                if "rollout_logprobs" in missing and self.options.rollout_correction != "none"
                else ""
            )
            raise BatchError(f"this objective needs {'; '.join(why)}, but the batch has None there.{fix}")

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
        kl_penalty = None if kl_tokens is None else mean_or_zero(kl_tokens.sum(dim=1))
        if not self.advantage.token_level:
            return batch._with(rewards=totals), totals, kl_penalty
        if rewards.dim() == 1:
            rewards = sequence_to_token_rewards(rewards, mask)
        rewards = zero_padding(rewards, mask)
        if kl_tokens is not None:
            rewards = rewards - kl_tokens
        return batch._with(rewards=rewards), totals, kl_penalty

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

        Computed in float32 at least: half-precision (float16, bfloat16) `logprobs` (and `values`,
        `entropy`) are upcast inside, the gradient flows back to them in their own dtype, and the loss
        and metrics come back in float32. An empty batch (B = 0 or T = 0) gives loss 0, a zero gradient
        and metrics of 0, like a fully masked one.

        logprobs:   [B, T] log-probs of the sampled tokens under the current policy (with grad).
        values:     [B, T] current critic values, needed when the objective trains a critic.
        normalizer: the aggregation denominator counted over the whole step (`Objective.normalizer`), so
                    that micro-batch losses sum to the full-batch loss; default, this batch's own count.
                    A positive, finite number (a `BatchError` otherwise; see `aggregation.check_normalizer`).
        entropy:    [B, T] per-token policy entropy, needed when entropy_coef > 0.
        metrics:    False skips the per-token diagnostics (the region's clip fractions, ratio statistics,
                    approximate KL, the rollout correction's weights), which cost about as much as the loss
                    itself on CPU: for steps that log nothing. The loss terms (``loss/*``) are reported
                    either way; the loss and its gradient do not change.

        With ``rollout_correction="tis"`` the region's per-token loss is multiplied by the constant weights
        of `rollout_correction_weights` before aggregation (the KL, entropy and value terms are not): each
        token's gradient is the uncorrected one times its weight.
        """
        mask = batch.mask
        self._check_requires(batch, self._stage_two_requires())
        _check_stage_two("logprobs", logprobs, mask)
        aggregation.check_normalizer(normalizer)
        opts = self.options
        # Every tensor entering the math is zeroed at masked positions once, here (padding may hold NaN
        # or inf); the aggregation masks what comes out, so nothing from padding reaches loss or gradient.
        # Half precision is upcast first: exp(12) already overflows float16.
        padding = _padding(batch, compute_dtype(logprobs.dtype))
        lp = padding.zero(logprobs.to(padding.dtype))
        anchor = _zeroed(batch, "old_logprobs" if opts.anchor == "old" else "rollout_logprobs", padding)
        adv = estimate.advantages.to(padding.dtype)
        if adv.shape != mask.shape:
            raise BatchError(f"estimate.advantages has shape {tuple(adv.shape)} but the batch is {tuple(mask.shape)}; slice both with the same index.")

        def agg(per_token: Tensor) -> Tensor:
            return aggregation.reduce(per_token, padding, opts.aggregation, normalizer, opts.max_length)

        region = self.region(lp, anchor, adv, mask, metrics=metrics)
        per_token, correction = region.loss, None
        if opts.rollout_correction != "none":
            old, mu = _zeroed(batch, "old_logprobs", padding), _zeroed(batch, "rollout_logprobs", padding)
            correction = rollout_correction_weights(old, mu, opts.rollout_correction_cap)
            per_token = per_token * correction[0]
        policy = agg(per_token)
        total = policy
        out = {"loss/policy": policy.detach()}
        if correction is not None and metrics:
            weights, truncated = correction
            out["rollout_correction/weight_mean"] = padding.sum(weights) / padding.tokens
            out["rollout_correction/truncated"] = (truncated & mask).sum(dtype=torch.int32).to(padding.dtype) / padding.tokens
        if opts.kl_in == "loss" and opts.kl_coef > 0:
            ref = _zeroed(batch, "ref_logprobs", padding)
            kl = agg(kl_estimate(lp, ref, opts.kl_estimator))
            total = total + opts.kl_coef * kl
            out["loss/kl"] = kl.detach()
        if self.needs_entropy:
            if entropy is None:
                raise BatchError(f"entropy_coef={opts.entropy_coef} needs loss(..., entropy=[B, T] per-token entropies).")
            _check_stage_two("entropy", entropy, mask)
            ent = agg(padding.zero(entropy.to(padding.dtype)))
            total = total - opts.entropy_coef * ent
            out["loss/entropy"] = ent.detach()
        if self.has_critic and opts.value_coef > 0:
            total = total + opts.value_coef * self._value_term(values, batch, estimate, agg, out)
        if metrics:
            check_metric_keys("region", self.region, region.metrics)
            out.update(region_metrics(region.metrics, lp.detach(), anchor, padding))
        out["loss/total"] = total.detach()
        return LossOutput(loss=total, metrics=out)

    def gradient_diagnostics(self, logprobs: Tensor, batch: Rollout, estimate: Estimate) -> GradientDiagnostics:
        """What this objective's trust region does to each token's gradient, in the terms every region shares
        (zero-gradient and reversed fractions by the advantage's sign, the mean weight, the ratio's spread):
        `proxim.diagnostics.gradient_diagnostics` on the region, against the objective's anchor. For putting
        objectives side by side (``proxim compare``); it costs one elementwise pass and enters no loss. The
        rollout correction is left out: its weights are positive constants per token, so they change no zero
        or reversed gradient, and the weights reported are the region's own."""
        anchor = batch.old_logprobs if self.options.anchor == "old" else batch.rollout_logprobs
        if anchor is None:
            raise BatchError("anchor='rollout' needs Rollout.rollout_logprobs (the inference engine's log-probs of the sampled tokens).")
        return gradient_diagnostics(self.region, logprobs, anchor, estimate.advantages, batch.mask)

    def _value_term(self, values: Tensor | None, batch: Rollout, estimate: Estimate, agg: Callable[[Tensor], Tensor], metrics: dict[str, Tensor]) -> Tensor:
        if values is None:
            raise BatchError(
                f"baseline {self.baseline.name!r} trains a critic (value_coef={self.options.value_coef}): "
                f"pass loss(..., values=[B, T] current critic values), or set value_coef=0."
            )
        _check_stage_two("values", values, batch.mask)
        if estimate.returns is None or batch.values is None:
            raise BatchError(f"advantage {self.advantage.name!r} produced no returns to regress the critic on.")
        padding = _padding(batch, compute_dtype(values.dtype))
        per_token = value_loss(
            padding.zero(values.to(padding.dtype)),
            _zeroed(batch, "values", padding),
            estimate.returns.to(padding.dtype),
            self.options.value_clip,
        )
        term = agg(per_token)
        metrics["loss/value"] = term.detach()
        return term


def rollout_correction_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Truncated importance weights ``min(exp(old - rollout), cap)`` [B, T] and where they were truncated [B, T] bool.

    TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; verl's
    token-level ``rollout_is`` with ``rollout_is_threshold``): the engine (mu: ``rollout_logprobs``) sampled
    the tokens, the trainer's numbers (pi_old: ``old_logprobs``) differ from it, and pi_old/mu reweights a
    token's policy loss back to pi_old; truncating at `cap` bounds the variance a rare token mu
    under-sampled would add. Computed without grad (the weights are constants of the loss); the log-ratio
    is clamped to +-`proxim.ops.LOG_RATIO_CLAMP` before ``exp``, as every ratio in proxim.
    """
    with torch.no_grad():
        raw = log_ratio(old_logprobs, rollout_logprobs).exp()
        return raw.clamp(max=cap), raw > cap


def _at_least_float32(batch: Rollout) -> Rollout:
    """`batch` with its half-precision tensors (log-probs, values, rewards) upcast to float32, for stage 1."""
    fields = ("old_logprobs", "rewards", "ref_logprobs", "values", "rollout_logprobs")
    half = {f: t.to(wide) for f in fields if (t := getattr(batch, f)) is not None and (wide := compute_dtype(t.dtype)) != t.dtype}
    return batch._with(**half) if half else batch


def _padding(batch: Rollout, dtype: torch.dtype) -> Padding:
    """The batch's mask with what masking in `dtype` needs (`proxim.ops.Padding`), derived once per Rollout (eager)."""
    return batch._derived(("padding", dtype), (batch.mask,), lambda: Padding.of(batch.mask, dtype))


def _zeroed(batch: Rollout, field: str, padding: Padding) -> Tensor:
    """A [B, T] field of the batch (log-probs, values) in `padding`'s dtype, detached, 0 where masked; derived once per Rollout (eager)."""
    source = getattr(batch, field)
    assert source is not None  # guaranteed by Objective._check_requires
    return batch._derived(("zeroed", field, padding.dtype), (source, padding.mask), lambda: padding.zero(source.to(padding.dtype)).detach())


def _check_stage_two(name: str, t: Tensor, mask: Tensor) -> None:
    if not isinstance(t, Tensor) or t.shape != mask.shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise BatchError(f"{name} must be a [B, T] tensor of shape {tuple(mask.shape)} like the batch's mask, got {got}.")
    if not t.is_floating_point():
        raise BatchError(f"{name} must be floating point, got dtype {t.dtype}.")
    if t.device != mask.device:
        raise BatchError(f"{name} is on {t.device} but the batch is on {mask.device}.")


def assemble(parts: Mapping[str, Part], options: Mapping[str, object], preset: str | None, sources: Mapping[str, PartInfo | None]) -> Objective:
    """The `Objective` of routed `parts` and `options`, after checking that its baseline and advantage fit."""
    try:
        opts = Options(**cast("dict[str, Any]", options))  # values as the user gave them: attrs validates them
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"objective option: {error_message(exc)}") from exc
    baseline, advantage, region = parts["baseline"], parts["advantage"], parts["region"]
    assert isinstance(baseline, Baseline) and isinstance(advantage, Advantage) and isinstance(region, TrustRegion)
    check_declared_metrics("advantage", advantage)
    check_declared_metrics("region", region)
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
