"""proxim's parts as verl 0.9 policy losses and advantage estimators (docs/integrations.md).

verl imports this module through proxim's ``verl.plugins`` entry point (``proxim``) on ``import verl``.
It imports nothing from verl: it waits for verl's own import of ``verl.trainer.ppo.core_algos`` (a
one-shot import hook), then registers every installed trust region ``R`` as the policy loss ``proxim:R``
(``actor.policy_loss.loss_mode``) and every advantage ``A``, with its default baseline, as the advantage
estimator ``proxim:A`` (``algorithm.adv_estimator``), with verl's signatures.

verl's settings map onto proxim's where they mean the same thing (`region_settings`,
`advantage_settings`, `AGGREGATION`); proxim-only hyperparameters come from a ``proxim`` dict:
``actor.policy_loss.proxim`` (with ``policy_loss._target_`` set to `ProximPolicyLossConfig`, verl's
``PolicyLossConfig`` plus that one field) and ``algorithm.proxim``. A part that fails to adapt is
skipped with a `proxim.PluginWarning`; registering never raises into verl. `register` does the same
on demand (for ``VERL_USE_EXTERNAL_PLUGINS=none``, or a process that imported core_algos first).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

import proxim
from proxim import aggregation
from proxim.integrations.common import reads_old_logprobs

__all__ = ["AGGREGATION", "CORE_ALGOS", "PREFIX", "advantage_estimator", "advantage_settings", "policy_loss", "region_settings", "register"]

PREFIX = "proxim:"
CORE_ALGOS = "verl.trainer.ppo.core_algos"

#: verl ``loss_agg_mode`` -> proxim aggregation. ``token-sum`` is ``token_mean`` with normalizer 1.
AGGREGATION = {
    "token-mean": "token_mean",
    "token-sum": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}


# -- settings ------------------------------------------------------------------------------------------


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config.get(key)`` for verl's dataclass configs, OmegaConf DictConfigs and dicts alike."""
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _extra(section: Any) -> dict[str, Any]:
    """The ``proxim`` dict of a verl config section, as a plain dict (empty when absent)."""
    raw = _get(section, "proxim", {})
    return {str(k): raw[k] for k in raw}


def region_settings(config: Any) -> dict[str, Any]:
    """verl actor settings as proxim region hyperparameters of the same meaning, by field name.

    ``clip_ratio_low``/``clip_ratio_high`` (each defaulting to ``clip_ratio``) are ``eps_low``/``eps_high``
    (clip, cispo, sequence_clip) and ``delta_low``/``delta_high`` (divergence_mask, as verl's ``dppo_*``);
    ``clip_ratio_c`` is ``dual_clip`` (verl's ``vanilla`` always dual-clips, 3.0 when unset) and ``is_cap``
    (verl's ``dppo_*`` truncation, 20.0 when unset); ``tau_pos``/``tau_neg`` are SAPO's temperatures. A
    region takes the ones it has fields for; the others are ignored.
    """
    ratio = _get(config, "clip_ratio", 0.2)
    low, high = _get(config, "clip_ratio_low", ratio), _get(config, "clip_ratio_high", ratio)
    c = _get(config, "clip_ratio_c")
    out = {"eps_low": low, "eps_high": high, "delta_low": low, "delta_high": high, "dual_clip": 3.0 if c is None else c, "is_cap": 20.0 if c is None else c}
    out.update({k: v for k in ("tau_pos", "tau_neg") if (v := _get(config, k)) is not None})
    return out


def advantage_settings(config: Any, **given: Any) -> dict[str, Any]:
    """verl algorithm settings as proxim advantage hyperparameters, by field name.

    ``gamma`` and ``lam`` (keyword, else ``config.gamma``/``config.lam``) are GAE's and the returns'
    discounts; ``epsilon`` (keyword only, as verl's GRPO takes it) is ``eps``; ``norm_adv_by_std_in_grpo``
    False (keyword, else the config's) is ``scale="none"`` (True keeps the advantage's own ``scale``).
    """
    out: dict[str, Any] = {}
    for key in ("gamma", "lam"):
        value = given.get(key)
        value = _get(config, key) if value is None else value
        if value is not None:
            out[key] = float(value)
    if given.get("epsilon") is not None:
        out["eps"] = float(given["epsilon"])
    norm = given.get("norm_adv_by_std_in_grpo")
    if (_get(config, "norm_adv_by_std_in_grpo", True) if norm is None else norm) is False:
        out["scale"] = "none"
    return out


def _freeze(settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(settings.items()))


@functools.lru_cache(maxsize=256)
def _policy_objective(
    region: str, mapped: tuple[tuple[str, Any], ...], extra: tuple[tuple[str, Any], ...], aggregation: str, max_length: int | None
) -> proxim.Objective:
    cls = proxim.default_registry().get("region", region)
    fields = set(cls.hyperparameters())
    unknown = sorted(k for k, _ in extra if k.removeprefix("region.") not in fields)
    if unknown:
        raise proxim.ConfigurationError(
            f"actor.policy_loss.proxim sets {unknown}, but region {region!r} has the hyperparameters {sorted(fields) or '(none)'}; "
            f"verl adds the KL and entropy terms itself (use_kl_loss, entropy_coeff)."
        )
    settings = {f"region.{k}": v for k, v in mapped if k in fields}
    settings.update({f"region.{k.removeprefix('region.')}": v for k, v in extra})
    return proxim.objective(advantage="diff", region=region, aggregation=aggregation, max_length=max_length, kl_coef=0.0, **settings)


@functools.lru_cache(maxsize=256)
def _advantage_objective(advantage: str, mapped: tuple[tuple[str, Any], ...], extra: tuple[tuple[str, Any], ...]) -> proxim.Objective:
    chosen = dict(extra)
    baseline = chosen.pop("baseline", None)
    cls = proxim.default_registry().get("advantage", advantage)
    fields = set(cls.hyperparameters())
    settings = {f"advantage.{k}": v for k, v in mapped if k in fields}
    settings.update(chosen)
    return proxim.objective(advantage=advantage, baseline=baseline, kl_coef=0.0, **settings)


# -- the adapters --------------------------------------------------------------------------------------


def policy_loss(region: str) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """The verl policy loss for the proxim trust region `region` (registered as ``proxim:<region>``).

    ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    -> (loss, metrics)``, as verl's actor (``verl.workers.utils.losses.ppo_loss``) calls it: proxim's
    stage 2 without KL (verl adds its own), normalised with verl's global batch info as its ``agg_loss``
    (``batch_num_tokens``/``global_batch_size``, ``loss_scale_factor``, times ``dp_size``);
    ``rollout_is_weights`` multiply the per-token loss. Metrics (floats): ``actor/pg_clipfrac`` (low plus
    high clip fractions), ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` (dual clip), ``actor/proxim/<key>``.
    """

    def compute(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, dict[str, Any]]:
        if loss_agg_mode not in AGGREGATION:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode} (proxim:{region} takes {', '.join(AGGREGATION)})")
        info = dict(_get(config, "global_batch_info", {}))
        dp_size = int(info.get("dp_size") or 1)
        mode = AGGREGATION[loss_agg_mode]
        normalizer = 1 if loss_agg_mode == "token-sum" else info.get("batch_num_tokens" if mode == "token_mean" else "global_batch_size")
        if normalizer is None and dp_size > 1:
            raise ValueError(f"proxim:{region} with dp_size {dp_size} needs the global batch_num_tokens / global_batch_size")
        max_length = info.get("loss_scale_factor") or _get(config, "loss_scale_factor")
        objective = _policy_objective(
            region, _freeze(region_settings(config)), _freeze(_extra(_get(config, "policy_loss"))), mode, None if max_length is None else int(max_length)
        )
        mask = response_mask.bool()
        batch = proxim.Rollout(old_logprobs=old_log_prob.detach(), mask=mask, rewards=torch.zeros(mask.shape[0], dtype=old_log_prob.dtype, device=mask.device))
        estimate = proxim.Estimate(advantages=advantages.detach())
        if rollout_is_weights is None:
            loss, metrics = objective.loss(log_prob, batch, estimate, normalizer=normalizer)
        else:
            loss, metrics = _weighted_loss(objective, log_prob, batch, estimate.advantages, rollout_is_weights, normalizer)
        return loss * dp_size, _verl_metrics(metrics, log_prob, old_log_prob, mask)

    compute.__name__ = compute.__qualname__ = f"proxim_policy_loss_{region}"
    compute.__doc__ = f"proxim's trust region {region!r} as a verl policy loss (proxim.integrations.verl.policy_loss)."
    return compute


def _weighted_loss(
    objective: proxim.Objective, log_prob: Tensor, batch: proxim.Rollout, advantages: Tensor, weights: Tensor, normalizer: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 2 with verl's rollout-correction weights on each token's loss (not expressible through
    ``Objective.loss``): the region on zero-padded inputs, times `weights`, then proxim's aggregation."""
    mask, zero = batch.mask, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    padded = [torch.where(mask, t.to(log_prob.dtype), zero) for t in (log_prob, batch.old_logprobs, advantages)]
    lp, anchor, adv = padded
    region = objective.region(lp, anchor, adv, mask)
    opts = objective.options
    loss = aggregation.aggregate(region.loss * weights, mask, opts.aggregation, normalizer, opts.max_length)
    valid = mask.sum().clamp(min=1)
    metrics = {f"region/{k}": (torch.where(mask, v.detach().to(log_prob.dtype), zero).sum() / valid) for k, v in region.metrics.items()}
    return loss, {"loss/policy": loss.detach(), **metrics}


def _verl_metrics(metrics: Mapping[str, Tensor], log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> dict[str, Any]:
    """proxim's metrics as verl's float metrics (one device synchronisation)."""
    zero = torch.zeros((), dtype=torch.float64, device=mask.device)
    kl = torch.where(mask, -proxim.ops.log_ratio(log_prob.detach(), old_log_prob.detach()), zero.to(log_prob.dtype)).sum() / mask.sum().clamp(min=1)
    keys = [f"actor/proxim/{k}" for k in metrics]
    values = [v.detach().reshape(()).to(torch.float64) for v in metrics.values()]
    clipped = metrics.get("region/clip_fraction_low", zero) + metrics.get("region/clip_fraction_high", zero)
    keys += ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]
    values += [clipped.to(torch.float64), kl.to(torch.float64), metrics.get("region/dual_clip_fraction", zero).to(torch.float64)]
    return dict(zip(keys, torch.stack(values).tolist()))


def advantage_estimator(advantage: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The verl advantage estimator for the proxim advantage `advantage` with its default baseline
    (registered as ``proxim:<advantage>``).

    ``fn(token_level_rewards, response_mask, index=None, config=None, **kwargs) -> (advantages, returns)``,
    as ``verl.trainer.ppo.ray_trainer.compute_advantage`` calls a registered estimator (``config`` is the
    ``algorithm`` section, ``index`` the prompt uids). Also accepted by keyword, as verl's own estimators
    take them: ``values`` (GAE), ``gamma``, ``lam``, ``epsilon``, ``norm_adv_by_std_in_grpo``, and
    ``old_log_probs``. ``algorithm.proxim`` sets the advantage's and baseline's hyperparameters and may name
    another ``baseline``. Returns are the advantage's value targets, or the advantages when it has none
    (as verl's outcome estimators return them twice).
    """

    def compute(
        token_level_rewards: Tensor,
        response_mask: Tensor,
        index: Sequence[Any] | None = None,
        config: Any = None,
        values: Tensor | None = None,
        old_log_probs: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        objective = _advantage_objective(advantage, _freeze(advantage_settings(config, **kwargs)), _freeze(_extra(config)))
        mask = response_mask.bool()
        if "values" in objective.requires and values is None:
            raise proxim.BatchError(
                f"proxim:{advantage} (baseline {objective.baseline.name!r}) needs the critic's values=[B, T]; verl 0.9's "
                f"compute_advantage passes values only to its own 'gae', so call this estimator with values=..."
            )
        if old_log_probs is None and reads_old_logprobs(objective):
            raise proxim.BatchError(
                f"proxim:{advantage} reads the old log-probs (e.g. pairwise confidence weights), which verl 0.9's compute_advantage "
                f"does not pass to registered estimators: call it with old_log_probs=data.batch['old_log_probs']."
            )
        old = torch.zeros(mask.shape, dtype=token_level_rewards.dtype, device=mask.device) if old_log_probs is None else old_log_probs
        batch = proxim.Rollout(
            old_logprobs=old, mask=mask, rewards=token_level_rewards, group=None if index is None else _group_ids(index, mask.device), values=values
        )
        est = objective.advantages(batch)
        return est.advantages, est.advantages if est.returns is None else est.returns

    compute.__name__ = compute.__qualname__ = f"proxim_advantage_{advantage}"
    compute.__doc__ = f"proxim's advantage {advantage!r} as a verl advantage estimator (proxim.integrations.verl.advantage_estimator)."
    return compute


def _group_ids(index: Sequence[Any], device: torch.device) -> Tensor:
    """verl's per-response prompt uids (any hashable values) as int64 group ids, in order of appearance."""
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(uid, len(ids)) for uid in index], dtype=torch.long, device=device)


# -- registration --------------------------------------------------------------------------------------


def register(core_algos: ModuleType | None = None) -> dict[str, list[str]]:
    """Register every installed proxim trust region and advantage in verl's registries; idempotent.

    Returns the names registered, ``{"policy_loss": [...], "adv_estimator": [...]}``. A part whose adapter
    cannot be built with its defaults, or whose ``proxim:`` name is already taken by something else, is
    skipped with a `proxim.PluginWarning`. Imports ``verl.trainer.ppo.core_algos`` when not given it.
    """
    if core_algos is None:
        core_algos = importlib.import_module(CORE_ALGOS)
    done: dict[str, list[str]] = {"policy_loss": [], "adv_estimator": []}
    try:
        available = proxim.available()
    except Exception as exc:  # never break verl: a broken proxim install only loses the proxim: names
        warnings.warn(f"proxim: no parts registered in verl ({exc!r})", proxim.PluginWarning, stacklevel=2)
        return done
    _register_kind(done["policy_loss"], "region", available["region"], core_algos.POLICY_LOSS_REGISTRY, core_algos.register_policy_loss, policy_loss)
    _register_kind(
        done["adv_estimator"], "advantage", available["advantage"], core_algos.ADV_ESTIMATOR_REGISTRY, core_algos.register_adv_est, advantage_estimator
    )
    return done


def _register_kind(
    done: list[str],
    kind: str,
    names: Iterable[str],
    table: Mapping[str, Any],
    decorate: Callable[[str], Callable[[Any], Any]],
    adapt: Callable[[str], Callable[..., Any]],
) -> None:
    """Register the adapter of each proxim part `kind` named in `names` as ``proxim:<name>``; append the
    registered names to `done`; warn about and skip the ones that fail."""
    for name in sorted(names):
        target = PREFIX + name
        if getattr(table.get(target), "proxim_part", None) == (kind, name):
            done.append(target)
            continue
        try:
            if target in table:
                raise proxim.ConfigurationError(f"verl already has a {kind} adapter named {target!r} ({table[target]!r})")
            if kind == "advantage":  # the part builds, with its defaults
                proxim.objective(advantage=name)
            else:
                proxim.objective(advantage="diff", region=name)
            fn = adapt(name)
            setattr(fn, "proxim_part", (kind, name))  # noqa: B010 - marks our own entries, for idempotence
            decorate(target)(fn)
        except Exception as exc:
            warnings.warn(f"proxim: {kind} {name!r} not registered in verl as {target!r}: {exc}", proxim.PluginWarning, stacklevel=3)
            continue
        done.append(target)


class _RegisterAfterImport(importlib.abc.Loader):
    """Wraps core_algos' loader: runs it, then `register` on the loaded module (warning, never raising)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register_quietly(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the wrapped loader
        return getattr(self.loader, name)


class _CoreAlgosFinder(importlib.abc.MetaPathFinder):
    """One-shot: when core_algos is first imported, find it with the other finders and wrap its loader."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != CORE_ALGOS:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _CoreAlgosFinder)]
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterImport(spec.loader)
                return spec
        return None


def _register_quietly(module: ModuleType) -> None:
    try:
        register(module)
    except Exception as exc:  # never break verl's import
        warnings.warn(f"proxim: registering in verl failed ({exc!r})", proxim.PluginWarning, stacklevel=2)


def _install() -> None:
    """Register now if core_algos is loaded, else once verl imports it."""
    loaded = sys.modules.get(CORE_ALGOS)
    if loaded is not None and hasattr(loaded, "register_policy_loss"):
        _register_quietly(loaded)
    elif not any(isinstance(f, _CoreAlgosFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CoreAlgosFinder())


@functools.cache
def _policy_loss_config_class() -> type:
    from dataclasses import dataclass, field

    from verl.workers.config import PolicyLossConfig

    @dataclass
    class ProximPolicyLossConfig(PolicyLossConfig):  # type: ignore[misc, unused-ignore]
        """verl's ``PolicyLossConfig`` plus ``proxim``: the region's proxim-only hyperparameters."""

        proxim: dict[str, Any] = field(default_factory=dict)

    ProximPolicyLossConfig.__module__, ProximPolicyLossConfig.__qualname__ = __name__, "ProximPolicyLossConfig"  # importable, for pickle (Ray)
    return ProximPolicyLossConfig


def __getattr__(name: str) -> Any:
    """`ProximPolicyLossConfig` is made on first use (it subclasses a verl class; this module imports no verl)."""
    if name == "ProximPolicyLossConfig":
        return _policy_loss_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install()
