"""The settings of every recipe: shared sections, and one configuration per recipe composed from them.

Precedence: defaults < the TOML file (``--config run.toml``) < flags. Each setting is a flag of the same
name with dashes (``prompts_per_step`` -> ``--prompts-per-step``); booleans also have a ``--no-`` form;
list settings take several values (``--rewards task mymod:brevity``); objective hyperparameters go through
``--set key=value`` (repeatable; a ``[set]`` table in TOML).

==================  =========================================================================
`TrainConfig`       ``proxim train``: online RL (and, for a preference preset, offline training
                    through `PreferenceConfig`); `CompareConfig` is it without the objective's
                    name and the run's, for ``proxim compare``
`PreferenceConfig`  offline preference training (DPO, IPO, hinge)
`SFTConfig`         ``proxim sft``
`RewardModelConfig` ``proxim reward-model``
==================  =========================================================================

Checks happen before any model is built: values on construction (`proxim.train.settings`), and
``check()`` for what needs a look around (the objective composes, the task exists, files exist, reward
functions import, vLLM is importable). Importing this module imports no model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxim.errors import ConfigurationError, suggest
from proxim.train.sections import (
    Adapter,
    AdaptiveKL,
    CheckContext,
    Critic,
    Evaluation,
    Model,
    Overrides,
    Parts,
    PreferencePairs,
    Preset,
    PromptFiles,
    Records,
    Rewards,
    Run,
    RunName,
    SampleLog,
    Scoring,
    Start,
    TaskChoice,
    WarmStart,
)
from proxim.train.settings import config, flag_name
from proxim.train.step_sections import (
    Generation,
    LearningRate,
    OffPolicyUpdates,
    Optimizer,
    Rollout,
    Sampling,
    Steps,
    SupervisedOptimizer,
    Updates,
)

if TYPE_CHECKING:
    import proxim
    from proxim.train.generation import Generator

# -- the recipes' configurations -------------------------------------------------------------------


@config
class OnlineSettings(
    Overrides,
    AdaptiveKL,
    TaskChoice,
    PromptFiles,
    Rewards,
    Records,
    PreferencePairs,
    Start,
    Critic,
    Scoring,
    Adapter,
    Steps,
    Sampling,
    Generation,
    Rollout,
    Optimizer,
    LearningRate,
    Updates,
    Run,
    Evaluation,
    SampleLog,
):
    """Every setting of an online run but the objective's and the run folder's names."""


@config
class CompareConfig(OffPolicyUpdates, OnlineSettings):
    """The settings of ``proxim compare``: an online run's, but off-policy by default (`OffPolicyUpdates`:
    2 passes of 4 minibatches per rollout), since on-policy every trust region gives the same gradient."""

    command = "compare"


@config
class TrainConfig(Preset, Parts, RunName, OnlineSettings):
    """Every setting of ``proxim train``. Build it with keyword arguments, `from_toml`, or from flags.

    The defaults are the embedded demo: GRPO on ``arithmetic`` with the built-in tiny model, warm-started
    by a short cached supervised phase, finishing in a few minutes on two CPU cores. A preference preset
    (dpo, ipo, hinge) trains offline instead, with the settings of `PreferenceConfig` (see `offline`).
    Each setting's help text is in ``--help`` and in its declaration (`proxim.train.settings.declaration`).
    """

    command = "train"

    def objective_spec(self) -> tuple[str | None, dict[str, Any]]:
        """The preset name (or None) and keyword arguments for `proxim.objective`."""
        axes = {"baseline": self.baseline, "advantage": self.advantage, "region": self.region}
        preset = self.preset
        if preset is None and not any(axes.values()):
            preset = "grpo"
        if preset in ("none", ""):
            preset = None
        return preset, {**{k: v for k, v in axes.items() if v is not None}, **self.set}

    def with_preset_training(self, registry: proxim.Registry | None = None, preset: str | None = None) -> tuple[TrainConfig, dict[str, Any]]:
        """This configuration with its preset's training regime (`proxim.Preset.training`) in every setting that
        was not given (`given`), and the values taken from the regime.

        `preset` names the preset when the objective is passed separately (``train(objective=...)``); by
        default it is this configuration's. ``minibatches`` and ``minibatch_size`` are one choice: giving
        either keeps the regime's from both. A regime naming a setting ``proxim train`` does not have, or
        a value it refuses, is a `ConfigurationError` naming the preset and its plugin."""
        import proxim

        reg = registry or proxim.default_registry()
        name = preset if preset is not None else self.objective_spec()[0]
        if name is None or name not in reg.entries["preset"]:
            return self, {}  # no preset, or a preference preset (offline: no rollouts to update on)
        regime, origin = reg.get("preset", name).training, reg.info("preset", name).describe()
        names = self.names()
        for key in regime:
            if key not in names:
                raise ConfigurationError(
                    f"preset {name!r} of {origin} sets the training setting {key!r}, which proxim train does not have.{suggest(key, names)} "
                    "Fix the preset's training= (its names are proxim train's settings), or choose another preset."
                )
        given = self.given()
        chosen = {"minibatches", "minibatch_size"} & given
        taken = {k: v for k, v in regime.items() if k not in given and not (chosen and k in ("minibatches", "minibatch_size"))}
        if not taken:
            return self, {}
        try:
            return type(self)(**{**self.given_values(), **taken}), taken
        except ConfigurationError as exc:
            raise ConfigurationError(f"preset {name!r} of {origin}, training regime {taken}: {exc}") from None

    def run_label(self) -> str:
        """The first part of a default run name: the preset, or the parts named."""
        preset, kwargs = self.objective_spec()
        return preset or "-".join(str(kwargs[k]) for k in ("baseline", "advantage", "region") if k in kwargs) or "custom"

    def run_source(self) -> str:
        """The second part of a default run name: the task, or the prompts file."""
        return self.task or (Path(self.prompts_file).stem if self.prompts_file else "prompts")

    def build_objective(self, registry: proxim.Registry | None = None) -> proxim.Objective | proxim.PreferenceObjective:
        """The composed objective: online (`proxim.Objective`) or offline (`proxim.PreferenceObjective`)."""
        import proxim

        preset, kwargs = self.objective_spec()
        built: proxim.Objective | proxim.PreferenceObjective = proxim.objective(preset, registry=registry, **kwargs)
        return built

    def is_offline(self, registry: proxim.Registry | None = None) -> bool:
        """Whether the objective is a preference loss, trained offline on pairs."""
        import proxim

        preset = self.objective_spec()[0]
        return preset is not None and preset in (registry or proxim.default_registry()).entries["preference"]

    def offline(self) -> PreferenceConfig:
        """The settings of an offline preference run; settings of the online loop that were changed are refused."""
        own = set(PreferenceConfig.names())
        changed = [n for n in self.changed() if n not in own]
        if changed:
            raise ConfigurationError(
                f"{', '.join(flag_name(n) for n in changed)}: online settings, but --preset {self.preset} trains offline from "
                "preference pairs (--data, or pairs built from the task); drop them."
            )
        return PreferenceConfig(**{n: getattr(self, n) for n in own})

    def check(
        self, registry: proxim.Registry | None = None, num_processes: int = 1, custom_rewards: bool = False, custom_prompts: bool = False
    ) -> proxim.Objective:
        """Everything that can be checked without building a model; returns the online objective.

        Raises `ConfigurationError`; for a preference preset, use `offline()` and its `check()` instead.
        """
        import proxim

        reg = registry or proxim.default_registry()
        self.validate(CheckContext(reg, num_processes, custom_rewards, custom_prompts))
        self.minibatch_for(self.prompts_per_step // num_processes * self.group_size)  # the split fits the rollout
        obj = self.build_objective(reg)
        if isinstance(obj, proxim.PreferenceObjective):
            raise ConfigurationError(f"--preset {self.preset} is an offline preference loss: it trains through PreferenceConfig (TrainConfig.offline()).")
        if self.data is not None:
            raise ConfigurationError(
                f"data={self.data!r} holds records for offline training, but {obj.preset or 'this objective'} is an online "
                "objective that samples its own responses; use --preset dpo (or ipo, hinge), or give prompts with --prompts-file."
            )
        if not custom_rewards:
            self._check_rewards()
        if self.task is None and self.prompts_file is None and not custom_prompts:
            raise ConfigurationError("no prompts: name a task or give a prompts_file.")
        if self.adaptive_kl and obj.options.kl_coef <= 0:
            raise ConfigurationError(
                f"adaptive_kl needs kl_coef > 0 (it adapts that coefficient), but this objective has kl_coef={obj.options.kl_coef}; add --set kl_coef=0.05."
            )
        if self.old_logprobs == "sampler" and self.top_p < 1.0:
            raise ConfigurationError(
                f"old_logprobs='sampler' needs top_p=1 (got {self.top_p}): with a nucleus the sampler's log-probs are renormalised "
                "over it and are not the policy's; use old_logprobs='recompute'."
            )
        if self.old_logprobs == "sampler" and obj.options.rollout_correction != "none":
            raise ConfigurationError(
                f"rollout_correction={obj.options.rollout_correction!r} weights tokens by exp(old - rollout), but old_logprobs='sampler' "
                "makes the old log-probs the generator's own, so every weight is 1; use old_logprobs='recompute' or 'auto'."
            )
        from proxim.train.generation import check_available

        check_available(self.generator)
        return obj

    def old_logprobs_source(self, objective: proxim.Objective, mixed_precision: str, generator: Generator) -> tuple[str, str]:
        """Where a run's old log-probs come from, ``sampler`` or ``recompute``, and why.

        ``auto`` takes the generator's record where it is the policy's own log-prob up to float rounding (a
        generator whose ``forward_logprobs`` says so, such as the hf generator's incremental decoding
        against one full forward: within 1e-5 in float32), and recomputes where it is not: another engine's
        kernels, a nucleus, reduced precision, or a rollout correction, which weighs exactly that difference."""
        if self.old_logprobs != "auto":
            return self.old_logprobs, "old_logprobs setting"
        blockers = [
            why
            for blocked, why in (
                (not getattr(generator, "forward_logprobs", False), f"the {generator.name} generator's kernels are not the trainer's"),
                (self.top_p < 1.0, f"top_p={self.top_p} renormalises the sampler's log-probs"),
                (mixed_precision != "no", f"{mixed_precision} sampling is not the scoring forward"),
                (objective.options.rollout_correction != "none", "the rollout correction weighs sampler against trainer"),
            )
            if blocked
        ]
        if blockers:
            return "recompute", "auto: " + "; ".join(blockers)
        return "sampler", f"auto: the {generator.name} generator's own, float32, top_p=1"

    def _check_rewards(self) -> None:
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigurationError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards {self.rewards}; give one weight per reward."
            )
        if not self.rewards and self.reward_model is None:
            raise ConfigurationError("no reward: give rewards (e.g. 'task') or a reward_model.")
        if self.task is None and "task" in self.rewards:
            raise ConfigurationError("the reward 'task' needs a task; name one, or list your own reward functions.")
        from proxim.train.rewards import load_function

        for spec in self.rewards:
            if spec != "task":
                load_function(spec)


@config
class PreferenceConfig(
    Preset,
    RunName,
    Overrides,
    TaskChoice,
    Records,
    PreferencePairs,
    Start,
    Scoring,
    Adapter,
    Steps,
    Sampling,
    Generation,
    Optimizer,
    LearningRate,
    Run,
    Evaluation,
):
    """The settings of an offline preference run (``proxim train --preset dpo``; ipo, hinge or a plugin's loss)."""

    command = "train"

    def check(self, registry: proxim.Registry | None = None, num_processes: int = 1) -> proxim.PreferenceObjective:
        """Everything that can be checked without building a model, every record of `data` included; returns the objective."""
        import proxim

        reg = registry or proxim.default_registry()
        self.validate(CheckContext(reg, num_processes))
        if self.preset is None:
            raise ConfigurationError("name a preference loss: --preset dpo (or ipo, hinge).")
        obj = proxim.preference_objective(self.preset, registry=reg, **self.set)
        if self.data is None and self.task is None:
            raise ConfigurationError(f"--preset {self.preset} needs preference pairs: give --data pairs.jsonl, or a task to build them from.")
        if self.data is not None:
            from proxim.train.records import PAIR_FIELDS, read_records

            read_records(self.data, PAIR_FIELDS)
        return obj


@config
class SFTConfig(RunName, TaskChoice, Records, Model, Adapter, WarmStart, Generation, SupervisedOptimizer, Run):
    """The settings of ``proxim sft``: ``--warmstart-steps``, ``--warmstart-lr`` and ``--warmstart-batch-size`` set the recipe."""

    command = "sft"

    def check(self, registry: proxim.Registry | None = None, num_processes: int = 1) -> None:
        """Everything that can be checked without building a model, every record of `data` included."""
        import proxim

        self.validate(CheckContext(registry or proxim.default_registry(), num_processes))
        if self.data is None and self.task is None:
            raise ConfigurationError('proxim sft needs --data sft.jsonl ({"prompt", "response"} records), or a task whose answers to train on.')
        if self.data is None and self.lora_rank:
            raise ConfigurationError("proxim sft without --data is the warm start, which trains the whole model; --lora-rank needs --data records.")
        if self.data is not None:
            from proxim.train.records import SUPERVISED_FIELDS, read_records

            read_records(self.data, SUPERVISED_FIELDS)


@config
class RewardModelConfig(
    RunName,
    TaskChoice,
    Records,
    PreferencePairs,
    Start,
    Adapter,
    Steps,
    Sampling,
    Generation,
    Optimizer,
    LearningRate,
    Run,
):
    """The settings of ``proxim reward-model``: ``--steps``, ``--prompts-per-step`` (pairs per step) and ``--lr`` set the recipe."""

    command = "reward-model"

    def check(self, registry: proxim.Registry | None = None, num_processes: int = 1) -> None:
        """Everything that can be checked without building a model, every record of `data` included."""
        import proxim

        self.validate(CheckContext(registry or proxim.default_registry(), num_processes))
        if self.data is None and self.task is None:
            raise ConfigurationError('proxim reward-model needs --data pairs.jsonl ({"prompt", "chosen", "rejected"} records), or a task to build pairs from.')
        if self.data is not None:
            from proxim.train.records import PAIR_FIELDS, read_records

            read_records(self.data, PAIR_FIELDS)
