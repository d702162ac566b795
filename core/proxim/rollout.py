"""The data contract between a trainer and an objective: `Rollout` in, `Estimate` and `LossOutput` out.

Shapes: `B` sequences (responses), `T` response tokens, right-padded; `mask` marks the tokens that count.
A `Rollout` validates itself once on construction (shapes, dtypes, devices, finiteness), so that the
objective's hot path can trust it. Slicing (`batch[idx]`) keeps that trust and does not re-validate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import attrs
import torch
from torch import Tensor

from proxim.errors import BatchError

_T = TypeVar("_T")

OPTIONAL_FIELDS = ("group", "ref_logprobs", "values", "rollout_logprobs")
"""Rollout fields a part may declare in its `requires`."""

# A sampled token's log-prob can exceed 0 only through rounding; anything above this is a bug upstream.
_LOGPROB_TOLERANCE = 1e-4


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_token_tensor(name: str, t: Tensor | None, like: Tensor, mask: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise BatchError(f"Rollout.{name} must be a torch.Tensor of shape {tuple(like.shape)}, got {type(t).__name__}.")
    if t.shape != like.shape:
        raise BatchError(
            f"Rollout.{name} has {_describe(t)} but old_logprobs has shape {tuple(like.shape)}; "
            f"every per-token tensor must be [B, T] with the same B and T (pad to the same length)."
        )
    if not t.is_floating_point():
        raise BatchError(f"Rollout.{name} must be a floating-point tensor, got dtype {t.dtype}; convert with .float().")
    if t.device != like.device:
        raise BatchError(f"Rollout.{name} is on {t.device} but old_logprobs is on {like.device}; move it with .to({str(like.device)!r}).")
    if not bool(torch.isfinite(t[mask]).all()):
        raise BatchError(f"Rollout.{name} holds NaN or inf at positions where mask is True; only padded positions may be non-finite.")


def _check_logprobs(name: str, t: Tensor | None, mask: Tensor) -> None:
    if t is None:
        return
    if bool((t[mask] > _LOGPROB_TOLERANCE).any()):
        worst = float(t[mask].max())
        raise BatchError(
            f"Rollout.{name} holds a log-probability above 0 (max {worst:.4g}) where mask is True; "
            f"pass log-probs of the sampled tokens (log_softmax, then gather), not logits or probabilities."
        )


@attrs.frozen(kw_only=True, eq=False)
class Rollout:
    """A batch of sampled responses with everything stage 1 and stage 2 may need.

    Fields (``B`` responses, ``T`` padded response length):
      old_logprobs:     [B, T] float, log-prob of each sampled token under the sampling policy (the anchor).
      mask:             [B, T] bool, True on response tokens that count. A row may be all False.
      rewards:          [B] sequence rewards, or [B, T] token rewards; finite.
      group:            [B] int64 prompt-group ids (any integers; groups may differ in size), or None.
      ref_logprobs:     [B, T] reference-policy log-probs, for a KL penalty, or None.
      values:           [B, T] critic values at sampling time, for the critic baseline and GAE, or None.
      rollout_logprobs: [B, T] the rollout engine's own log-probs (the behaviour policy mu), for objectives
                        built with ``anchor="rollout"`` (DPPO, DRPO's recipe), or None.
    """

    old_logprobs: Tensor
    mask: Tensor
    rewards: Tensor
    group: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    rollout_logprobs: Tensor | None = None

    _FIELDS: ClassVar[tuple[str, ...]] = ("old_logprobs", "mask", "rewards", *OPTIONAL_FIELDS)
    _memo: dict[Any, tuple[tuple[int, ...], Any]] = attrs.field(init=False, factory=dict, repr=False)
    """Derived constants (see `_derived`), filled on first use; not a field for users."""

    def __attrs_post_init__(self) -> None:
        old, mask = self.old_logprobs, self.mask
        if not isinstance(old, Tensor) or old.dim() != 2:
            got = _describe(old) if isinstance(old, Tensor) else type(old).__name__
            raise BatchError(f"Rollout.old_logprobs must be a [B, T] tensor, got {got}.")
        if not old.is_floating_point():
            raise BatchError(f"Rollout.old_logprobs must be floating point, got dtype {old.dtype}.")
        if not isinstance(mask, Tensor) or mask.shape != old.shape:
            got = _describe(mask) if isinstance(mask, Tensor) else type(mask).__name__
            raise BatchError(f"Rollout.mask must be a bool tensor of shape {tuple(old.shape)} like old_logprobs, got {got}.")
        if mask.dtype != torch.bool:
            raise BatchError(f"Rollout.mask must have dtype torch.bool, got {mask.dtype}; convert with mask.bool().")
        if mask.device != old.device:
            raise BatchError(f"Rollout.mask is on {mask.device} but old_logprobs is on {old.device}.")
        _check_token_tensor("old_logprobs", old, old, mask)
        self._check_rewards()
        self._check_group()
        for name in ("ref_logprobs", "values", "rollout_logprobs"):
            _check_token_tensor(name, getattr(self, name), old, mask)
        for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
            _check_logprobs(name, getattr(self, name), mask)

    def _check_rewards(self) -> None:
        r, old = self.rewards, self.old_logprobs
        if not isinstance(r, Tensor):
            raise BatchError(f"Rollout.rewards must be a torch.Tensor, got {type(r).__name__}; wrap it with torch.tensor(...).")
        if r.shape not in (old.shape[:1], old.shape):
            raise BatchError(
                f"Rollout.rewards has {_describe(r)}; expected [B] = {tuple(old.shape[:1])} sequence rewards or [B, T] = {tuple(old.shape)} token rewards."
            )
        if not r.is_floating_point():
            raise BatchError(f"Rollout.rewards must be floating point, got dtype {r.dtype}; convert with .float().")
        if r.device != old.device:
            raise BatchError(f"Rollout.rewards is on {r.device} but old_logprobs is on {old.device}.")
        finite = torch.isfinite(r if r.dim() == 1 else r[self.mask])
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()[:5].tolist()
            raise BatchError(
                f"Rollout.rewards holds NaN or inf (first bad positions {bad}); score those responses, "
                f"or drop them from the batch (or set their mask to False)."
            )

    def _check_group(self) -> None:
        g = self.group
        if g is None:
            return
        if not isinstance(g, Tensor) or g.shape != self.old_logprobs.shape[:1]:
            got = _describe(g) if isinstance(g, Tensor) else type(g).__name__
            raise BatchError(f"Rollout.group must be a [B] = {tuple(self.old_logprobs.shape[:1])} tensor of prompt ids, got {got}.")
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise BatchError(f"Rollout.group must hold integer prompt ids, got dtype {g.dtype}; convert with .long().")
        if g.device != self.old_logprobs.device:
            raise BatchError(f"Rollout.group is on {g.device} but old_logprobs is on {self.old_logprobs.device}.")

    @property
    def batch_size(self) -> int:
        return int(self.old_logprobs.shape[0])

    @property
    def token_rewards(self) -> bool:
        """True when `rewards` is [B, T]."""
        return self.rewards.dim() == 2

    def group_sizes(self) -> Tensor:
        """[B] int64: the size of each response's group (1 everywhere when `group` is None)."""
        if self.group is None:
            return torch.ones_like(self.mask[:, 0], dtype=torch.long)
        _, inverse, counts = torch.unique(self.group, return_inverse=True, return_counts=True)
        result: Tensor = counts[inverse]
        return result

    def _derived(self, key: tuple[Any, ...], sources: tuple[Tensor, ...], make: Callable[[], _T]) -> _T:
        """``make()``, computed once per Rollout in eager mode: constants the loss derives from the batch on
        every call (`proxim.ops.Padding`: the float mask and counts; zero-padded log-probs), so that several
        epochs over the same batch pay for them once; they live as long as the Rollout. Recomputed if a tensor in `sources` was changed in place since (its version
        counter moved); never cached while ``torch.compile`` traces (the graph recomputes them, fused).
        """
        if torch.compiler.is_compiling():
            return make()
        versions = tuple(t._version for t in sources)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == versions:
            value: _T = hit[1]
            return value
        value = make()
        self._memo[key] = (versions, value)
        return value

    def replace(self, **changes: Tensor | None) -> Rollout:
        """A copy with some fields replaced, validated again."""
        fields: dict[str, Any] = changes
        return attrs.evolve(self, **fields)

    def _with(self, **changes: Tensor | None) -> Rollout:
        """A copy with fields replaced, not re-validated: for the objective's own reshaping of valid data."""
        fields = {name: getattr(self, name) for name in self._FIELDS}
        fields.update(changes)
        return _trusted(type(self), fields)

    def __getitem__(self, index: Tensor | slice) -> Rollout:
        """Rows `index` of every tensor (a minibatch). Not re-validated: rows of a valid batch are valid."""
        return _trusted(type(self), {name: _take(getattr(self, name), index) for name in self._FIELDS})


@attrs.frozen(kw_only=True, eq=False)
class Estimate:
    """Stage 1's result.

    advantages: [B, T], zero where the mask is False. returns: [B, T] value targets for a critic, or None.
    rewards: the rewards the advantage was computed from (after KL-in-reward shaping), [B] or [B, T].
    metrics: detached 0-d tensors, namespaced (``advantage/mean``, ...).
    """

    advantages: Tensor
    returns: Tensor | None = None
    rewards: Tensor | None = None
    metrics: dict[str, Tensor] = attrs.field(factory=dict)

    def __getitem__(self, index: Tensor | slice) -> Estimate:
        return Estimate(
            advantages=self.advantages[index],
            returns=_take(self.returns, index),
            rewards=_take(self.rewards, index),
            metrics=self.metrics,
        )


class LossOutput(NamedTuple):
    """Stage 2's result: `loss`, a 0-d tensor to call `.backward()` on, and detached 0-d `metrics`.

    A NamedTuple so that ``torch.compile(fullgraph=True)`` traces the loss; read it by name.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


def _take(t: Tensor | None, index: Tensor | slice) -> Tensor | None:
    return None if t is None else t[index]


def _trusted(cls: type[Rollout], fields: dict[str, Tensor | None]) -> Rollout:
    """Build a Rollout from fields known to be valid, skipping the validation syncs."""
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    object.__setattr__(obj, "_memo", {})
    return obj
