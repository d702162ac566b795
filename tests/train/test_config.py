"""TrainConfig: defaults, TOML and flags, `--help`, and errors before any model is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from proxim.cli import build_parser, main
from proxim.errors import ConfigurationError
from proxim.train import TrainConfig
from proxim.train.cli import config_from_args
from proxim.train.settings import declaration, read_toml


def test_every_field_has_help_and_a_group() -> None:
    for a in attrs.fields(TrainConfig):
        assert len(declaration(a).help) > 10, a.name
        assert declaration(a).group, a.name


def test_default_objective_is_grpo_and_axes_mean_free_composition() -> None:
    assert TrainConfig().objective_spec() == ("grpo", {})
    preset, kwargs = TrainConfig(advantage="pairwise", region="quadratic").objective_spec()
    assert preset is None and kwargs == {"advantage": "pairwise", "region": "quadratic"}
    preset, kwargs = TrainConfig(preset="rloo", region="clip", set={"eps_low": 0.1}).objective_spec()
    assert preset == "rloo" and kwargs == {"region": "clip", "eps_low": 0.1}


def test_toml_round_trip(tmp_path: Path) -> None:
    config = TrainConfig(
        preset="dapo",
        set={"region.eps_high": 0.3, "kl_coef": 0.0},
        rewards=["task", "mod:fn"],
        reward_weights=[1.0, 0.5],
        task=None,
        prompts_file="p.jsonl",
        lr=3e-5,
        quiet=True,
    )
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert TrainConfig.from_toml(path) == config


def test_flags_override_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('preset = "rloo"\nsteps = 7\nlr = 0.01\n[set]\neps_low = 0.3\nkl_coef = 0.1\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "0.5", "--set", "eps_low=0.1", "--no-quiet", "--rewards", "task", "m:f"])
    config = config_from_args(args, TrainConfig)
    assert (config.preset, config.steps, config.lr, config.quiet) == ("rloo", 7, 0.5, False)
    assert config.set == {"eps_low": 0.1, "kl_coef": 0.1}
    assert config.rewards == ["task", "m:f"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "-1"], "lr must be >= 0.0, got -1.0"),
        (["--top-p", "1.5"], "top_p must be <= 1.0"),
        (["--preset", "grop"], "Did you mean 'grpo'"),
        (["--set", "eps_lo=0.1"], "Did you mean 'eps_low'"),
        (["--set", "kl_coef=-1"], "kl_coef"),
        (["--task", "arithmetics"], "Did you mean 'arithmetic'"),
        (["--prompts-per-step", "3", "--group-size", "2", "--model", "/nonexistent"], "is not a local directory"),
        (["--rewards", "task", "nosuchmodule_xyz:fn"], "cannot import 'nosuchmodule_xyz'"),
        (["--reward-weights", "1", "2"], "one weight per reward"),
        (["--advantage", "gae", "--baseline", "group_mean"], "critic"),
    ],
)
def test_bad_settings_fail_before_any_model_is_built(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "runs"
    code = main(["train", "--output-dir", str(out_dir), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not out_dir.exists()  # nothing was created, no model built


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("stepz = 3\n")
    with pytest.raises(ConfigurationError, match=r"unknown setting 'stepz'\. Did you mean 'steps'"):
        TrainConfig.from_toml(path)


def test_help_lists_every_field_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for a in attrs.fields(TrainConfig):
        assert "--" + a.name.replace("_", "-") in text, a.name
    assert "(default: 400)" in text and "(default: arithmetic)" in text and "(default: hf)" in text


def test_print_config_is_readable_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "--preset", "rloo", "--set", "region.eps_high=0.3"]) == 0
    path = tmp_path / "printed.toml"
    path.write_text(capsys.readouterr().out)
    assert read_toml(path)["set"] == {"region.eps_high": 0.3}
    assert TrainConfig.from_toml(path) == TrainConfig(preset="rloo", set={"region.eps_high": 0.3})


def test_importing_the_cli_stays_light() -> None:
    code = "import sys, proxim.cli, proxim.train.cli; print(sorted(m for m in ('transformers', 'accelerate', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_docs_list_every_setting() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "train.md").read_text()
    missing = [a.name for a in attrs.fields(TrainConfig) if f"`{a.name}` (`--{a.name.replace('_', '-')}`)" not in text]
    assert not missing, f"docs/train.md does not describe {missing}"
