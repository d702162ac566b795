"""proxim's ``verl.plugins`` entry point (proxim.integrations.verl) against verl 0.9.x (docs/integrations.md).

Everything is called through verl's own registries, ``get_policy_loss_fn("proxim:clip")`` and
``get_adv_estimator_fn("proxim:gae")``, with the arguments verl's actor and trainer pass, and compared in
float64 with verl's native losses and estimators on identical tensors (values and gradients within 1e-6).
The DRPO, SAPO and LamPO checks go through verl's actor loss, ``verl.workers.utils.losses.ppo_loss``, on a
TensorDict laid out as verl's engine hands it over.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import types
from typing import Any

import pytest
import torch

import proxim
from proxim import ops
from proxim.integrations import verl as plugin

from ._helpers import VERL_AGG, assert_close, grad, make_batch
from .test_verl_advantages import index_of, outcome_batch

SEEDS = (0, 1)
MODES = (*VERL_AGG.values(), "token-sum")
GLOBAL = {"dp_size": 2, "batch_num_tokens": 157, "global_batch_size": 29, "loss_scale_factor": 32}


def call_loss(core_algos: Any, name: str, batch: Any, leaf: torch.Tensor, mode: str, config: Any, weights: torch.Tensor | None = None) -> Any:
    """A policy loss looked up and called as ``verl.workers.utils.losses.ppo_loss`` does."""
    return core_algos.get_policy_loss_fn(name)(
        old_log_prob=batch.old,
        log_prob=leaf,
        advantages=batch.adv,
        response_mask=batch.mask,
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=weights,
    )


def compare(core_algos: Any, batch: Any, ours: str, theirs: str, mode: str, config: Any, values: bool = True, **kw: Any) -> tuple[Any, Any]:
    ours_leaf, theirs_leaf = batch.leaf(), batch.leaf()
    mine, my_metrics = call_loss(core_algos, ours, batch, ours_leaf, mode, config, **kw)
    peer, peer_metrics = call_loss(core_algos, theirs, batch, theirs_leaf, mode, config, **kw)
    if values:
        assert_close(mine, peer, f"{ours} vs {theirs} loss ({mode})")
    assert_close(grad(mine, ours_leaf), grad(peer, theirs_leaf), f"{ours} vs {theirs} gradient ({mode})")
    return my_metrics, peer_metrics


def test_entry_point_registers_every_part(core_algos: Any) -> None:
    available = proxim.available()
    assert {plugin.PREFIX + r for r in available["region"]} <= set(core_algos.POLICY_LOSS_REGISTRY)
    assert {plugin.PREFIX + a for a in available["advantage"]} <= set(core_algos.ADV_ESTIMATOR_REGISTRY)
    assert plugin.register(core_algos)["policy_loss"] == sorted(plugin.PREFIX + r for r in available["region"])  # idempotent


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_clip_equals_vanilla(core_algos: Any, actor_config: Any, mode: str, global_info: bool, seed: int) -> None:
    """Any actor config: clip_ratio_low/high and the always-on dual clip clip_ratio_c, verl's global batch info."""
    batch = make_batch(seed, spread=1.2)
    assert bool((batch.mask & (batch.adv < 0) & ((batch.logp - batch.old).exp() > 3.0)).any()), "fixture must reach the dual clip"
    config = actor_config("vanilla", clip_ratio=0.2, clip_ratio_low=0.18, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)
    if global_info:
        config.global_batch_info.update(GLOBAL)
    mine, theirs = compare(core_algos, batch, "proxim:clip", "vanilla", mode, config)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert {"actor/proxim/region/clip_fraction_high", "actor/proxim/loss/policy"} <= set(mine)


@pytest.mark.parametrize(
    "ours,theirs,settings,values,mode",
    [
        ("proxim:sapo", "sapo", {}, True, "seq-mean-token-mean"),  # tau_pos / tau_neg from the actor config; verl's sapo always uses this mode
        ("proxim:sequence_clip", "gspo", {"token_level": True}, True, "token-mean"),  # verl's gspo is GSPO-token
        ("proxim:sequence_clip", "gspo", {"token_level": True}, True, "seq-mean-token-mean"),
        ("proxim:cispo", "cispo", {}, False, "token-mean"),  # ratio-valued by design: gradients only (docs/parity.md)
        ("proxim:cispo", "cispo", {}, False, "seq-mean-token-sum"),
    ],
)
def test_other_regions_equal_verl(core_algos: Any, actor_config: Any, ours: str, theirs: str, settings: dict[str, Any], values: bool, mode: str) -> None:
    if ours.removeprefix(plugin.PREFIX) not in proxim.available()["region"]:
        pytest.skip(f"no installed plugin provides {ours}")
    batch = make_batch(2, spread=0.3 if theirs == "gspo" else 0.6)
    config = actor_config(clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.08, tau_pos=1.3, tau_neg=0.8, loss_agg_mode=mode)
    config = dataclasses.replace(config, policy_loss=plugin.ProximPolicyLossConfig(loss_mode=ours, proxim=settings))
    compare(core_algos, batch, ours, theirs, mode, config, values=values)


def test_clip_with_rollout_correction_weights_equals_vanilla(core_algos: Any, actor_config: Any) -> None:
    batch = make_batch(3, spread=1.2)
    weights = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    config = actor_config("vanilla", clip_ratio_high=0.28, loss_agg_mode="seq-mean-token-mean")
    mine, theirs = compare(core_algos, batch, "proxim:clip", "vanilla", "seq-mean-token-mean", config, weights=weights)
    assert mine["actor/pg_clipfrac"] == pytest.approx(theirs["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize("divergence,deltas", [("tv", (0.15, 0.15)), ("tv", (0.1, 0.2)), ("kl", (0.02, 0.08))])
@pytest.mark.parametrize("mode", tuple(VERL_AGG.values()))
def test_divergence_mask_equals_dppo(core_algos: Any, actor_config: Any, divergence: str, deltas: tuple[float, float], mode: str) -> None:
    """``proxim:divergence_mask`` with ``policy_loss.proxim.divergence`` = verl's ``dppo_tv``/``dppo_kl``: the
    gradient, and verl's value = agg(proxim per-token loss x logp) (ratio-valued by design, docs/parity.md)."""
    batch = make_batch(1, spread=0.6)
    low, high = deltas
    loss_config = plugin.ProximPolicyLossConfig(loss_mode="proxim:divergence_mask", proxim={"divergence": divergence})
    config = actor_config(clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=3.0, loss_agg_mode=mode)
    config = dataclasses.replace(config, policy_loss=loss_config)
    mine, theirs = compare(core_algos, batch, "proxim:divergence_mask", f"dppo_{divergence}", mode, config, values=False)
    assert mine["actor/pg_clipfrac"] == pytest.approx(theirs["actor/pg_clipfrac"], abs=1e-6) and mine["actor/pg_clipfrac"] > 0
    region = proxim.objective(advantage="diff", region="divergence_mask", divergence=divergence, delta_low=low, delta_high=high, is_cap=3.0).region
    per_token = region(batch.logp, batch.old, batch.adv, batch.mask).loss
    peer, _ = call_loss(core_algos, f"dppo_{divergence}", batch, batch.leaf(), mode, config)
    assert_close(peer.detach(), core_algos.agg_loss(per_token * batch.logp, batch.mask.double(), mode), "verl value = agg(proxim per-token loss * logp)")


def test_policy_loss_refuses_unknown_proxim_settings(core_algos: Any, actor_config: Any) -> None:
    config = actor_config(loss_agg_mode="token-mean")
    config = dataclasses.replace(config, policy_loss=plugin.ProximPolicyLossConfig(proxim={"kl_coef": 0.1}))
    batch = make_batch(0)
    with pytest.raises(proxim.ConfigurationError, match="kl_coef"):
        call_loss(core_algos, "proxim:clip", batch, batch.leaf(), "token-mean", config)


# -- advantage estimators -------------------------------------------------------------------------------


def compute_advantage(core_algos: Any, name: str, rewards: torch.Tensor, mask: torch.Tensor, index: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The call ``verl.trainer.ppo.ray_trainer.compute_advantage`` makes for a registered estimator (its
    else-branch; that module itself does not import in the peer environment: it needs cachetools, which
    verl 0.9.1 does not install)."""
    adv_kwargs = {"token_level_rewards": rewards, "response_mask": mask, "config": config}
    if index is not None:
        adv_kwargs["index"] = index
    return core_algos.get_adv_estimator_fn(name)(**adv_kwargs)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_group_normalized_equals_grpo(core_algos: Any, norm: bool, seed: int) -> None:
    from verl.trainer.config import AlgoConfig

    batch = outcome_batch(seed)
    rewards, mask, index = ops.sequence_to_token_rewards(batch.rewards, batch.mask), batch.mask.long(), index_of(batch.group)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    mine, returns = compute_advantage(core_algos, "proxim:group_normalized", rewards, mask, index, AlgoConfig(norm_adv_by_std_in_grpo=norm))
    assert_close(mine, theirs, "advantages")
    assert_close(returns, theirs, "returns")
    direct, _ = core_algos.get_adv_estimator_fn("proxim:group_normalized")(rewards, mask, index, epsilon=1e-4, norm_adv_by_std_in_grpo=norm)
    assert_close(direct, core_algos.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-4, norm_adv_by_std_in_grpo=norm)[0], "epsilon")


def test_algorithm_proxim_settings(core_algos: Any) -> None:
    """``+algorithm.proxim.<name>=<value>`` (the algorithm section is an OmegaConf DictConfig in verl's trainer):
    an advantage hyperparameter, and another baseline (leave-one-out with diff = verl's RLOO)."""
    from omegaconf import OmegaConf

    batch = outcome_batch(1, constant_group=False)
    rewards, mask, index = ops.sequence_to_token_rewards(batch.rewards, batch.mask), batch.mask.long(), index_of(batch.group)
    eps = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "proxim": {"eps": 1e-4}})
    mine, _ = compute_advantage(core_algos, "proxim:group_normalized", rewards, mask, index, eps)
    assert_close(mine, core_algos.compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-4)[0], "algorithm.proxim.eps")
    rloo = OmegaConf.create({"proxim": {"baseline": "leave_one_out"}})
    mine, _ = compute_advantage(core_algos, "proxim:diff", rewards, mask, index, rloo)
    assert_close(mine, core_algos.compute_rloo_outcome_advantage(rewards, mask, index)[0], "leave_one_out + diff = rloo")


def test_policy_loss_config_through_hydra(core_algos: Any) -> None:
    """``actor.policy_loss._target_=proxim.integrations.verl.ProximPolicyLossConfig`` with
    ``+actor.policy_loss.proxim.delta=0.08``, instantiated as verl's workers do (omega_conf_to_dataclass)."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    target = "proxim.integrations.verl.ProximPolicyLossConfig"
    made = omega_conf_to_dataclass(OmegaConf.create({"_target_": target, "loss_mode": "proxim:quadratic", "proxim": {"delta": 0.08}}))
    assert isinstance(made, plugin.ProximPolicyLossConfig) and made.loss_mode == "proxim:quadratic" and dict(made.proxim) == {"delta": 0.08}
    assert made.get("dro_beta") is None  # still verl's PolicyLossConfig
    assert pickle.loads(pickle.dumps(made)) == made  # importable by name: Ray ships configs to its workers


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_gae_equals_verl_gae(core_algos: Any, gamma: float, lam: float) -> None:
    batch = make_batch(2)
    token_rewards = torch.where(batch.mask, 0.3 * torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 0.0)
    args = {"token_level_rewards": token_rewards, "values": batch.values, "response_mask": batch.mask.double(), "gamma": gamma, "lam": lam}
    theirs, their_returns = core_algos.get_adv_estimator_fn("gae")(**args)
    mine, returns = core_algos.get_adv_estimator_fn("proxim:gae")(**args)
    m = batch.mask
    assert_close(mine[m], theirs[m], "advantages")
    assert_close(returns[m], their_returns[m], "returns")
    with pytest.raises(proxim.BatchError, match="values"):  # what verl's compute_advantage would pass it
        compute_advantage(core_algos, "proxim:gae", token_rewards, batch.mask, None, None)


def test_pairwise_needs_old_log_probs(core_algos: Any) -> None:
    """LamPO's advantage reads the old log-probs, which compute_advantage does not pass: refused, not guessed."""
    batch = outcome_batch(0)
    rewards, index = ops.sequence_to_token_rewards(batch.rewards, batch.mask), index_of(batch.group)
    with pytest.raises(proxim.BatchError, match="old_log_probs"):
        compute_advantage(core_algos, "proxim:pairwise", rewards, batch.mask, index, None)
    mine, _ = core_algos.get_adv_estimator_fn("proxim:pairwise")(rewards, batch.mask, index, old_log_probs=batch.old)
    assert_close(mine, proxim.objective("lampo").advantages(batch.rollout()).advantages, "pairwise")


# -- through verl's actor loss --------------------------------------------------------------------------


def actor_inputs(batch: Any, leaf: torch.Tensor, entropy: torch.Tensor, dp_size: int = 1) -> tuple[dict[str, Any], Any]:
    """(model_output, data) as verl's engine hands them to ``ppo_loss``: log-probs and entropy flattened over
    every valid prompt+response position (left-shifted by one), the batch as a left/right padded TensorDict."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    b, t = batch.mask.shape
    prompt_len = torch.tensor([2 + i % 3 for i in range(b)])
    response_len = torch.tensor([int(torch.nonzero(row).max()) + 1 for row in batch.mask])
    p = int(prompt_len.max())
    prompt_mask = torch.arange(p).flip(0).unsqueeze(0) < prompt_len.unsqueeze(1)
    response_attn = torch.arange(t).unsqueeze(0) < response_len.unsqueeze(1)

    def flat(x: torch.Tensor) -> torch.Tensor:
        pieces = []
        for i in range(b):
            pieces += [x.new_zeros(int(prompt_len[i]) - 1), x[i, : int(response_len[i])], x.new_zeros(1)]
        return torch.cat(pieces)

    data = TensorDict(
        {
            "prompts": torch.zeros(b, p, dtype=torch.long),
            "responses": torch.zeros(b, t, dtype=torch.long),
            "attention_mask": torch.cat([prompt_mask, response_attn], dim=1).long(),
            "response_mask": batch.mask.long(),
            "old_log_probs": batch.old,
            "advantages": batch.adv,
            "ref_log_prob": batch.ref,
        },
        batch_size=[b],
    )
    for key, value in {"dp_size": dp_size, "batch_num_tokens": int(batch.mask.sum()), "global_batch_size": b}.items():
        tu.assign_non_tensor_data(data, key, value)
    return {"log_probs": flat(leaf), "entropy": flat(entropy)}, data


@pytest.mark.parametrize(
    "name,settings,mode",
    [
        ("proxim:quadratic", {"delta": 0.1}, "seq-mean-token-sum-norm"),  # DRPO, with the inverse-delta reading
        ("proxim:quadratic", {}, "seq-mean-token-sum-norm"),  # DRPO preset's delta 12.5
        ("proxim:sapo", {}, "seq-mean-token-mean"),
        ("proxim:clip", {}, "token-mean"),
    ],
)
def test_ppo_loss_runs_proxim_regions(core_algos: Any, actor_config: Any, name: str, settings: dict[str, Any], mode: str) -> None:
    """verl's actor loss with a proxim region, its KL loss and entropy bonus: equal to proxim's own stage 2
    (the same global normalizers, times dp_size) plus verl's KL and entropy terms, in value and gradient."""
    from verl.workers.utils.losses import ppo_loss

    region = name.removeprefix(plugin.PREFIX)
    if region not in proxim.available()["region"]:
        pytest.skip(f"no installed plugin provides the region {region!r}")
    batch = make_batch(4, spread=0.5)
    entropy = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss_config = plugin.ProximPolicyLossConfig(loss_mode=name, proxim=settings)
    base = actor_config(loss_agg_mode=mode, tau_pos=1.3, tau_neg=0.8, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05)
    config = dataclasses.replace(base, policy_loss=loss_config)
    leaf = batch.leaf()
    model_output, data = actor_inputs(batch, leaf, entropy, dp_size=2)
    total, metrics = ppo_loss(config, model_output, data)
    assert {"actor/pg_loss", "kl_loss", "actor/proxim/loss/policy"} <= set(metrics)

    mirror = batch.leaf()
    mapped = {k: v for k, v in plugin.region_settings(base).items() if k in proxim.default_registry().get("region", region).hyperparameters()}
    objective = proxim.objective(advantage="diff", region=region, aggregation=plugin.AGGREGATION[mode], kl_coef=0.0, **{**mapped, **settings})
    normalizer = int(batch.mask.sum()) if mode == "token-mean" else batch.mask.shape[0]
    policy = objective.loss(mirror, batch.rollout(), proxim.Estimate(advantages=batch.adv), normalizer=normalizer).loss * 2
    info = {"dp_size": 2, "batch_num_tokens": int(batch.mask.sum()), "global_batch_size": batch.mask.shape[0], "loss_scale_factor": None}
    kl = core_algos.agg_loss(core_algos.kl_penalty(mirror, batch.ref, "low_var_kl"), batch.mask, mode, **info)
    ent = core_algos.agg_loss(entropy, batch.mask, mode, **info)
    expected = policy - 0.01 * ent + 0.05 * kl
    assert_close(total, expected, f"{name} total loss")
    assert_close(grad(total, leaf), grad(expected, mirror), f"{name} gradient")
    assert torch.isfinite(total)


# -- registering never breaks verl ----------------------------------------------------------------------


def fake_core_algos() -> Any:
    tables: dict[str, dict[str, Any]] = {"policy": {}, "adv": {}}

    def registrar(table: dict[str, Any]) -> Any:
        return lambda name: lambda fn: table.__setitem__(name, fn) or fn

    return types.SimpleNamespace(
        POLICY_LOSS_REGISTRY=tables["policy"],
        ADV_ESTIMATOR_REGISTRY=tables["adv"],
        register_policy_loss=registrar(tables["policy"]),
        register_adv_est=registrar(tables["adv"]),
    )


def test_a_part_that_fails_to_adapt_is_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_core_algos()
    fake.POLICY_LOSS_REGISTRY["proxim:none"] = object()  # the name is taken by something else
    real = plugin.advantage_estimator

    def broken(name: str) -> Any:
        if name == "gae":
            raise RuntimeError("cannot adapt")
        return real(name)

    monkeypatch.setattr(plugin, "advantage_estimator", broken)
    with pytest.warns(proxim.PluginWarning) as caught:
        done = plugin.register(fake)
    messages = " ".join(str(w.message) for w in caught)
    assert "'proxim:none'" in messages and "cannot adapt" in messages
    assert "proxim:clip" in done["policy_loss"] and "proxim:none" not in done["policy_loss"]
    assert "proxim:gae" not in done["adv_estimator"] and "proxim:group_normalized" in done["adv_estimator"]


def test_import_verl_registers_lazily(core_algos: Any) -> None:
    """``import verl`` loads the plugin but no verl module beyond what verl itself imports; the names appear
    once verl imports core_algos; ``VERL_USE_EXTERNAL_PLUGINS=none`` leaves proxim out."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); import verl\n"
        "print('plugin', 'proxim.integrations.verl' in sys.modules, 'core_algos', 'verl.trainer.ppo.core_algos' in sys.modules)\n"
        "from verl.trainer.ppo import core_algos as c\n"
        "print('names', 'proxim:clip' in c.POLICY_LOSS_REGISTRY, 'proxim:gae' in c.ADV_ESTIMATOR_REGISTRY)\n"
    )
    runs = {
        policy: subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
        )
        for policy in ("auto", "none")
    }
    done = {policy: (run.communicate(timeout=120), run.returncode) for policy, run in runs.items()}
    out = {}
    for policy, ((stdout, stderr), code) in done.items():
        assert code == 0, stderr[-3000:]
        out[policy] = [line for line in stdout.splitlines() if line.startswith(("plugin", "names"))]
    assert out["auto"] == ["plugin True core_algos False", "names True True"]
    assert out["none"] == ["plugin False core_algos False", "names False False"]
