"""The objective's surface for callers: the trust region's ``metrics=`` keyword (declared by
`proxim.TrustRegion`, adapted once for regions written without it), `Objective.needs_entropy`, and
`proxim.preference_objective` for any preference loss, a plugin's included."""

from __future__ import annotations

import inspect
from typing import ClassVar

import attrs
import pytest
import torch

import proxim
from proxim.parts import check_part_class
from proxim.registry import build_registry


@attrs.frozen
class Bare(proxim.TrustRegion):
    """A third-party region written without the ``metrics`` keyword: loss_t = -r_t A_t, one bool metric."""

    name: ClassVar[str] = "bare"

    def __call__(self, logprobs, anchor, advantages, mask):  # type: ignore[no-untyped-def, override]
        ratio = (logprobs - anchor).exp()
        return proxim.RegionOutput(loss=-ratio * advantages, metrics={"positive": advantages > 0})


class BareSubclass(Bare):
    """Inherits the adapted ``__call__``; defines none of its own, so nothing is wrapped again."""

    name: ClassVar[str] = "bare_subclass"


def batch() -> tuple[proxim.Rollout, torch.Tensor]:
    """Two groups of two, a padded token in rows 0 and 2; current log-probs off the anchor."""
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.3, -0.7, -0.9], [-1.5, 0.0, 0.0], [-0.9, -1.1, -1.3]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    rollout = proxim.Rollout(old_logprobs=old, mask=mask, rewards=torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64), group=torch.tensor([5, 5, 9, 9]))
    return rollout, torch.where(mask, old + 0.1, 0.0)


def loss_and_gradient(obj: proxim.Objective, metrics: bool) -> tuple[proxim.LossOutput, torch.Tensor]:
    rollout, current = batch()
    leaf = current.clone().requires_grad_(True)
    out = obj.loss(leaf, rollout, obj.advantages(rollout), metrics=metrics)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


# -- the metrics keyword ----------------------------------------------------------------------------


def test_a_region_without_the_keyword_is_adapted_once_when_its_class_is_created() -> None:
    adapter = Bare.__dict__["__call__"]
    original = adapter.__wrapped__
    # One wrapper around the function written in the class body, although attrs built the class twice
    # (the slotted copy runs __init_subclass__ again): the copy saw a __call__ that takes the keyword.
    assert not hasattr(original, "__wrapped__")
    assert "metrics" not in inspect.signature(original).parameters
    assert inspect.signature(adapter, follow_wrapped=False).parameters["metrics"].kind is inspect.Parameter.KEYWORD_ONLY
    # functools.wraps metadata: the region's own name, docstring and signature.
    assert (adapter.__name__, adapter.__qualname__, adapter.__module__) == ("__call__", "Bare.__call__", __name__)
    assert list(inspect.signature(Bare.__call__).parameters) == ["self", "logprobs", "anchor", "advantages", "mask"]
    # A subclass without a __call__ of its own keeps the parent's (already adapted) one.
    assert BareSubclass.__call__ is adapter
    # Registration still checks the region's own signature, and accepts it.
    assert check_part_class(Bare, "region", "test") is Bare
    # Using the class changes nothing on it.
    proxim.objective(advantage="group_normalized", region=Bare())
    assert Bare.__dict__["__call__"] is adapter


def test_a_region_with_the_keyword_is_left_as_written() -> None:
    for name in ("clip", "quadratic", "none"):
        cls = proxim.default_registry().get("region", name)
        assert "metrics" in inspect.signature(cls.__call__).parameters
        assert not hasattr(cls.__dict__["__call__"], "__wrapped__"), name


def test_a_region_without_the_keyword_gives_the_same_loss_and_gradient_with_metrics_on_and_off() -> None:
    obj = proxim.objective(advantage="group_normalized", region=Bare())
    on, on_grad = loss_and_gradient(obj, metrics=True)
    off, off_grad = loss_and_gradient(obj, metrics=False)
    assert torch.equal(on.loss, off.loss) and torch.equal(on_grad, off_grad)
    # Its metric is computed both times and published only when asked for.
    assert "region/positive" in on.metrics and "region/positive" not in off.metrics
    # Called directly, the adapted region accepts and ignores the keyword.
    rollout, current = batch()
    anchor = rollout.old_logprobs
    adv = torch.ones_like(anchor)
    region: proxim.TrustRegion = Bare()  # typed as the base class, which declares the keyword
    plain = region(current, anchor, adv, rollout.mask)
    told = region(current, anchor, adv, rollout.mask, metrics=False)
    assert torch.equal(plain.loss, told.loss) and plain.metrics.keys() == told.metrics.keys()


def test_the_loss_reads_no_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """The objective calls every region the same way; nothing is inspected per call."""
    objectives = [proxim.objective(advantage="group_normalized", region=Bare()), proxim.objective("grpo", kl_coef=0.0)]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect.signature called while computing a loss")

    monkeypatch.setattr(inspect, "signature", refuse)
    for obj in objectives:
        for metrics in (True, False):
            loss_and_gradient(obj, metrics=metrics)


def test_an_adapted_region_compiles_without_a_graph_break() -> None:
    obj = proxim.objective(advantage="group_normalized", region=Bare())
    rollout, current = batch()
    est = obj.advantages(rollout)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(obj.loss, fullgraph=True)(current, rollout, est)
    finally:
        torch._dynamo.reset()
    eager = obj.loss(current, rollout, est)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-12, atol=1e-12)
    assert compiled.metrics.keys() == eager.metrics.keys()


# -- needs_entropy ----------------------------------------------------------------------------------


def test_needs_entropy_follows_the_entropy_coefficient() -> None:
    obj = proxim.objective("grpo", kl_coef=0.0)
    assert obj.needs_entropy is False
    loss_and_gradient(obj, metrics=True)  # no entropy= needed
    bonus = obj.override(entropy_coef=0.01)
    assert bonus.needs_entropy is True
    with pytest.raises(proxim.BatchError, match=r"entropy_coef=0\.01 needs loss\(\.\.\., entropy=\[B, T\]"):
        loss_and_gradient(bonus, metrics=True)
    with pytest.raises(AttributeError):
        bonus.needs_entropy = False  # type: ignore[misc]


# -- preference_objective ---------------------------------------------------------------------------


@attrs.frozen
class Squared(proxim.Preference):
    """A third-party preference loss: L = (h_w - h_l - margin)^2."""

    name: ClassVar[str] = "squared"
    margin: float = 1.0

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return (chosen - rejected - self.margin) ** 2


class SquaredPlugin:
    """A plugin registered directly (no distribution), as a notebook would."""

    @proxim.hookimpl
    def proxim_register_preferences(self, register: proxim.Register[type[proxim.Preference]]) -> None:
        register(Squared)


def test_preference_objective_builds_built_in_and_third_party_losses() -> None:
    built_in = proxim.preference_objective("dpo", beta=0.3)
    assert isinstance(built_in, proxim.PreferenceObjective)
    assert built_in.fingerprint == proxim.objective("dpo", beta=0.3).fingerprint
    qualified = proxim.preference_objective("ipo", **{"preference.beta": 0.25})  # type: ignore[arg-type]  # mypy: ** could set registry
    assert qualified.preference.settings() == {"beta": 0.25}

    registry = build_registry(plugins=[("squared", SquaredPlugin())], autoload=False)
    obj = proxim.preference_objective("squared", margin=2.0, registry=registry)
    assert isinstance(obj.preference, Squared) and obj.preference.margin == 2.0
    # h_w - h_l = 1 - 0 = 1 for the one pair: (1 - 2)^2 = 1.
    out = obj.loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert out.loss.item() == 1.0


def test_preference_objective_names_what_is_wrong() -> None:
    with pytest.raises(proxim.UnknownNameError, match=r"no preference named 'dpoo'\. Did you mean 'dpo'\?"):
        proxim.preference_objective("dpoo")
    with pytest.raises(proxim.UnknownNameError, match=r"preference loss 'dpo' has no hyperparameter 'betta'"):
        proxim.preference_objective("dpo", betta=0.1)
    with pytest.raises(proxim.ConfigurationError, match=r"'beta' must be > 0"):
        proxim.preference_objective("ipo", beta=0.0)
