"""A preset's training regime (`proxim.Preset.training`): the paper's trainer settings, as defaults that what a user
gives overrides; shown by ``--print-config`` and ``proxim plugins``; a plugin's preset carries one too."""

from __future__ import annotations

from pathlib import Path

import pytest

import proxim
from proxim.cli import main
from proxim.registry import build_registry
from proxim.train.config import CompareConfig, TrainConfig
from proxim.train.sections import CheckContext


class RegimePlugin:
    """A third-party preset with a training regime (and one naming a setting the trainer does not have)."""

    def __init__(self, training: dict[str, object]):
        self.training = training

    @proxim.hookimpl
    def proxim_register_presets(self, register: proxim.Register[proxim.Preset]) -> None:
        register(proxim.Preset(name="my_ppo", baseline="group_mean", advantage="group_normalized", region="clip", training=self.training))


def test_ppo_trains_four_epochs_unless_told_otherwise() -> None:
    config, taken = TrainConfig(preset="ppo").with_preset_training()
    assert config.epochs == 4 and taken == {"epochs": 4}
    # Given, even with the default's value: the user's choice stands (from Python, TOML and flags alike).
    for given in (TrainConfig(preset="ppo", epochs=1), TrainConfig.from_dict({"preset": "ppo", "epochs": 1})):
        again, taken = given.with_preset_training()
        assert again.epochs == 1 and taken == {}
    # Applying twice takes nothing more: the regime's values count as given once applied.
    assert config.with_preset_training()[1] == {}


def test_the_default_demo_and_presets_without_a_regime_are_unchanged() -> None:
    # grpo (the default) states DeepSeekMath's regime, one update per rollout: the trainer's defaults already.
    config, taken = TrainConfig().with_preset_training()
    assert taken == {"epochs": 1} and config == TrainConfig() and config.minibatch_for(256) == 256
    config, taken = TrainConfig(preset="rloo").with_preset_training()
    assert taken == {} and config == TrainConfig(preset="rloo")


def test_minibatches_and_minibatch_size_are_one_choice() -> None:
    config, taken = TrainConfig(preset="dapo").with_preset_training()
    assert taken == {"epochs": 1, "minibatches": 16} and config.minibatch_for(256) == 16  # 256 sequences in 16 updates
    config, taken = TrainConfig(preset="dapo", minibatch_size=32).with_preset_training()
    assert taken == {"epochs": 1} and config.minibatches is None and config.minibatch_for(256) == 32
    with pytest.raises(proxim.ConfigurationError, match=r"minibatch_size=32 and minibatches=4 both say how to split a rollout"):
        TrainConfig(minibatches=4, minibatch_size=32).validate(CheckContext(proxim.default_registry(), 1, False, False))
    with pytest.raises(proxim.ConfigurationError, match=r"minibatches=300 is more than the 256 sequences each process samples"):
        TrainConfig(minibatches=300).check()
    assert TrainConfig(minibatches=3).minibatch_for(256) == 86  # ceil(256 / 3): 86 + 86 + 84


def test_a_third_party_preset_carries_its_regime() -> None:
    registry = build_registry(plugins=[("mine", RegimePlugin({"epochs": 2, "minibatches": 4}))], autoload=False)
    config, taken = TrainConfig(preset="my_ppo").with_preset_training(registry)
    assert (config.epochs, config.minibatches) == (2, 4) and taken == {"epochs": 2, "minibatches": 4}


def test_a_regime_the_trainer_cannot_use_is_named_with_its_preset_and_plugin() -> None:
    registry = build_registry(plugins=[("mine", RegimePlugin({"epoch": 2}))], autoload=False)
    with pytest.raises(proxim.ConfigurationError, match=r"preset 'my_ppo' of plugin 'mine' .* sets the training setting 'epoch'.*Did you mean 'epochs'"):
        TrainConfig(preset="my_ppo").with_preset_training(registry)
    registry = build_registry(plugins=[("mine", RegimePlugin({"epochs": 0}))], autoload=False)
    with pytest.raises(proxim.ConfigurationError, match=r"preset 'my_ppo' of plugin 'mine'.*training regime \{'epochs': 0\}: epochs must be >= 1"):
        TrainConfig(preset="my_ppo").with_preset_training(registry)


@pytest.mark.parametrize(("training", "message"), [({"Epochs": 1}, "not a trainer setting name"), ({"epochs": [1, 2]}, "a number, a string or a boolean")])
def test_a_malformed_regime_is_refused_when_the_preset_is_made(training: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        proxim.Preset(name="p", baseline="none", advantage="diff", region="clip", training=training)


def test_print_config_and_plugins_show_the_regime(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "ppo", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# from preset ppo's training regime: epochs = 4 (a flag or --config value overrides it)\n")
    assert "\nepochs = 4\n" in out
    assert main(["train", "--preset", "ppo", "--epochs", "2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "training regime" not in out and "\nepochs = 2\n" in out
    main(["plugins"])
    out = capsys.readouterr().out
    assert "    preset ppo  (trains with epochs=4)\n" in out and "    preset dapo  (trains with epochs=1, minibatches=16)\n" in out


def test_a_printed_config_runs_again_with_the_same_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "gspo", "--print-config"]) == 0
    toml = tmp_path / "run.toml"
    toml.write_text(capsys.readouterr().out)
    again = TrainConfig.from_toml(toml)
    assert (again.epochs, again.minibatches) == (1, 4) and again.with_preset_training()[1] == {}


def test_compare_trains_every_preset_in_its_own_off_policy_regime() -> None:
    compare = CompareConfig()
    assert (compare.epochs, compare.minibatches) == (2, 4)
    run = TrainConfig(**{**compare.to_dict(), "preset": "ppo"})  # how proxim compare builds each run
    assert run.with_preset_training()[0].epochs == 2  # the comparison's regime, the same for every preset
