"""``proxim.integrations.trl.ProximGRPOTrainer`` against TRL 1.16.x's own ``GRPOTrainer``, end to end (docs/integrations.md).

Both train proxim's built-in tiny Llama (saved once, loaded by both) on the same prompts with the same
reward, config and seed, on CPU, in float32 (TRL computes its per-token log-probs in float32 whatever the
model's dtype). With ``proxim.objective("grpo", ...)`` set to TRL's settings the
two runs agree step for step: the same completions (generation is TRL's), the same loss at every step and
the same final weights. The run reuses each generation batch (``steps_per_generation=2``, ``num_iterations=2``),
so TRL computes the old log-probs and the ratio moves off 1: the clip and the step normaliser are exercised.
"""

from __future__ import annotations

import importlib
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import proxim

from .conftest import TRL_MISSING

#: Step-for-step agreement, losses and final weights (measured: 6e-8 and 1.2e-7, float32 rounding in the two
#: loss formulas; the weights move by 1.3e-2 over the run).
TOL = 1e-6
STEPS = 8
BETA = 0.04
CONFIG = {
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 6,
    "max_steps": STEPS,
    "learning_rate": 3e-3,
    "temperature": 1.0,
    "steps_per_generation": 2,
    "num_iterations": 2,
    "gradient_accumulation_steps": 1,
    "seed": 0,
    "loss_type": "grpo",
    "epsilon": 0.2,
    "scale_rewards": "group",
    "use_bias_correction_kl": False,
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "shuffle_dataset": False,
}


def reward_digits(completions: list[str], **_: Any) -> list[float]:
    """The fraction of characters that are digits: cheap, deterministic, and it varies within a group."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


@pytest.fixture(scope="module")
def trl() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip("trl", reason=TRL_MISSING)
    if not module.__version__.startswith("1.16."):
        pytest.skip(f"ProximGRPOTrainer is tested with trl 1.16.x, found {module.__version__}")
    return module


@pytest.fixture(scope="module")
def model_dir(trl: Any) -> Iterator[str]:
    from proxim.train import models

    with tempfile.TemporaryDirectory(prefix="proxim-trl-model-") as directory:
        models.build_tiny_model(models.tiny_config(hidden_size=64, layers=2), seed=0).save_pretrained(directory)
        models.byte_tokenizer().save_pretrained(directory)
        yield directory


def run(trl: Any, model_dir: str, objective: proxim.Objective | None, **overrides: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    """Train; return each step's loss (what ``training_step`` returns), the final weights and the trainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = trl.GRPOTrainer
    if objective is not None:
        base = importlib.import_module("proxim.integrations.trl").ProximGRPOTrainer

    class Recording(base):  # type: ignore[misc, valid-type]
        losses: list[float]

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss: torch.Tensor = super().training_step(*args, **kwargs)
            self.losses.append(float(loss))
            return loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = Dataset.from_list([{"prompt": f"{a}+{b}="} for a, b in zip(range(10, 90, 7), range(3, 60, 5))])
    extra = {} if objective is None else {"objective": objective}
    with tempfile.TemporaryDirectory(prefix="proxim-trl-run-") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = trl.GRPOConfig(output_dir=out, **{**CONFIG, "beta": BETA, **overrides})
        trainer = Recording(model=model, reward_funcs=reward_digits, args=config, train_dataset=prompts, processing_class=tokenizer, **extra)
        trainer.losses = []
        trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return trainer.losses, weights, trainer


@pytest.fixture(scope="module")
def trl_run(trl: Any, model_dir: str) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    return run(trl, model_dir, None)


def max_weight_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_grpo_objective_matches_trl_grpo_trainer_step_for_step(trl: Any, model_dir: str, trl_run: Any) -> None:
    theirs, their_weights, _ = trl_run
    objective = proxim.objective("grpo", eps=1e-4, eps_low=0.2, kl_coef=BETA, kl_estimator="k3", aggregation="seq_mean_token_mean")
    ours, our_weights, trainer = run(trl, model_dir, objective)
    assert len(ours) == len(theirs) == STEPS
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    assert max(gaps) < TOL, f"per-step loss gaps {gaps}"
    assert max_weight_gap(our_weights, their_weights) < TOL
    assert max_weight_gap(our_weights, initial_weights(model_dir)) > 1e-3, "the run must move the weights"
    logged = trainer.state.log_history[0]
    assert {"proxim/loss/policy", "proxim/loss/kl", "proxim/region/clip_fraction_high", "proxim/advantage/mean"} <= set(logged)
    assert any(entry.get("proxim/region/ratio_max", 1.0) != 1.0 for entry in trainer.state.log_history), "the ratio must move off 1"


def initial_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict())


@pytest.mark.parametrize("preset", ["drpo", "lampo", "sapo"])
def test_other_objectives_train(trl: Any, model_dir: str, preset: str) -> None:
    """DRPO, LamPO (whose advantage reads the old log-probs: computed for it on the on-policy steps) and the
    contrib SAPO region: finite losses and moved weights, in a shorter run."""
    if preset not in proxim.available()["preset"]:
        pytest.skip(f"no installed plugin provides the preset {preset!r} (pip install -e contrib/proxim-sapo)")
    losses, weights, trainer = run(trl, model_dir, proxim.objective(preset), max_steps=2, steps_per_generation=1, num_iterations=1, beta=0.0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert max_weight_gap(weights, initial_weights(model_dir)) > 1e-5
    assert trainer.args.beta == 0.0 and trainer.ref_model is None


def test_refuses_a_critic(trl: Any, model_dir: str) -> None:
    with pytest.raises(proxim.ConfigurationError, match="value model"):
        run(trl, model_dir, proxim.objective("ppo"))


def test_trl_loss_settings_without_a_counterpart_warn(trl: Any, model_dir: str) -> None:
    from datasets import Dataset

    from proxim.integrations.trl import ProximGRPOTrainer

    prompts = Dataset.from_list([{"prompt": "1+1="}] * 8)
    with tempfile.TemporaryDirectory() as out, pytest.warns(UserWarning, match=r"\['delta', 'top_entropy_quantile'\]"):
        config = trl.GRPOConfig(output_dir=out, **{**CONFIG, "delta": 2.0, "top_entropy_quantile": 0.5})
        ProximGRPOTrainer(model=model_dir, reward_funcs=reward_digits, args=config, train_dataset=prompts, objective="grpo")


def test_beta_follows_the_objective(trl: Any, model_dir: str, trl_run: Any) -> None:
    """TRL computes the reference log-probs iff beta != 0: the trainer sets it from the objective's kl_coef."""
    _, _, trainer = run(trl, model_dir, proxim.objective("dapo"), max_steps=1, steps_per_generation=1, num_iterations=1)
    assert trainer.args.beta == 0.0 and trainer.ref_model is None
