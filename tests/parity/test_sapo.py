"""SAPO (arXiv 2511.20347) against verl's ``sapo`` loss and TRL's ``loss_type="sapo"``.

SAPO ships outside the core, as a contrib plugin (``contrib/proxim-sapo``); the region is looked up by name
through the registry, and the test skips when no installed plugin provides it. Both peers use the gate
f(r) = sigmoid(tau (r - 1)) * 4 / tau with tau = tau_pos for A > 0 and tau_neg otherwise, and loss -f(r) A.
verl always aggregates SAPO with seq-mean-token-mean; TRL's sapo does the same.
"""

from __future__ import annotations

from typing import Any

import pytest

import proxim

from ._helpers import VERL_AGG, assert_close, grad, make_batch, proxim_loss

#: Hyperparameter names a SAPO region may use for (tau_pos, tau_neg); the first pair found is set.
TEMPERATURE_NAMES = (("tau_pos", "tau_neg"), ("temperature_pos", "temperature_neg"), ("tau_positive", "tau_negative"))
VERL_DEFAULTS = (1.0, 1.05)


@pytest.fixture(scope="module")
def sapo_region() -> tuple[str, dict[str, float], tuple[float, float]]:
    """(region name, overrides, (tau_pos, tau_neg) in effect)."""
    if "sapo" not in proxim.available()["region"]:
        pytest.skip("no installed plugin provides the region 'sapo' (pip install -e contrib/proxim-sapo)")
    cls = proxim.default_registry().get("region", "sapo")
    names = set(cls.hyperparameters())
    for pos, neg in TEMPERATURE_NAMES:
        if {pos, neg} <= names:
            return "sapo", {pos: 1.3, neg: 0.8}, (1.3, 0.8)
    # Unknown names: compare at the defaults, which must be the paper's (verl's) 1.0 / 1.05.
    return "sapo", {}, VERL_DEFAULTS


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_sapo_equals_verl(core_algos: Any, actor_config: Any, sapo_region: Any, seed: int) -> None:
    name, overrides, (tau_pos, tau_neg) = sapo_region
    batch = make_batch(seed, spread=0.5)
    agg = "seq_mean_token_mean"
    cfg = actor_config("sapo", tau_pos=tau_pos, tau_neg=tau_neg, loss_agg_mode=VERL_AGG[agg])
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, name, aggregation=agg, **overrides)
    theirs, _ = core_algos.get_policy_loss_fn("sapo")(
        old_log_prob=batch.old,
        log_prob=theirs_leaf,
        advantages=batch.adv,
        response_mask=batch.mask.double(),
        loss_agg_mode=VERL_AGG[agg],
        config=cfg,
    )
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")


@pytest.mark.parametrize("seed", (0, 1))
def test_sapo_equals_trl(trl_loss: Any, sapo_region: Any, seed: int) -> None:
    name, overrides, (tau_pos, tau_neg) = sapo_region
    batch = make_batch(seed, spread=0.5)
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    ours = proxim_loss(batch, ours_leaf, name, aggregation="seq_mean_token_mean", **overrides)
    theirs = trl_loss("sapo", theirs_leaf, batch.old, batch.adv, batch.mask, sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg)
    assert_close(ours.loss, theirs, "loss")
    assert_close(grad(ours.loss, ours_leaf), grad(theirs, theirs_leaf), "gradient")
