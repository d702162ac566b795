"""``proxim train``, ``proxim compare``, ``proxim sft`` and ``proxim reward-model``: each a subcommand whose flags
come from its configuration's settings (`proxim.train.config`).

Importing this module is light (argparse, attrs, the configuration): transformers, accelerate and the
recipes are imported only when a subcommand runs, so ``proxim --help`` and ``proxim plugins`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from proxim.errors import ConfigurationError, ProximError, TrainingError
from proxim.train.config import CompareConfig, RewardModelConfig, SFTConfig, TrainConfig
from proxim.train.flags import add_flags, flag_values
from proxim.train.run_folder import RunFolder
from proxim.train.settings import Settings, code_settings, flag_name, read_toml, resumable

_S = TypeVar("_S", bound=Settings)

#: The errors of a user's making: printed as one line, exit status 2.
USER_ERRORS = (ProximError, LookupError, ValueError, OSError)

TRAIN_EPILOG = """examples:
  proxim train                                   GRPO on arithmetic with the built-in tiny model
  proxim train --preset rloo --task reverse --steps 100
  proxim train --advantage pairwise --region quadratic --set delta=0.5
  proxim train --config run.toml --set kl_coef=0.01
  proxim train --resume runs/grpo-arithmetic-20260101-120000 --steps 300
  proxim train --preset dpo                      DPO offline on pairs built from the task (or --data pairs.jsonl)
  proxim train --preset ppo --init runs/sft/model --reward-model runs/rm/model --rewards
  accelerate launch --num_processes 2 -m proxim train --prompts-per-step 32
"""

SFT_EPILOG = """examples:
  proxim sft                                     the task's answers (the warm start of proxim train), saved as RUN/model
  proxim sft --data sft.jsonl --task none        {"prompt", "response"} records
  proxim sft --model path/to/model --data sft.jsonl --warmstart-steps 1000
  proxim sft --resume runs/sft-sft-20260101-120000
"""

REWARD_MODEL_EPILOG = """examples:
  proxim reward-model                            pairs built from the task; backbone: the warm-started policy
  proxim reward-model --init runs/sft/model      backbone (and pair sampler): the model of proxim sft
  proxim reward-model --data pairs.jsonl --init runs/sft/model --task none
then: proxim train --preset ppo --init runs/sft/model --reward-model RUN/model --rewards
"""


def config_from_args(args: argparse.Namespace, cls: type[_S]) -> _S:
    """Defaults < the --config TOML file < flags given on the command line (``--set`` tables merged key by key)."""
    values: dict[str, Any] = read_toml(args.config) if getattr(args, "config", None) else {}
    flags = flag_values(args, cls)
    for name, table in flags.items():
        if isinstance(table, dict):
            flags[name] = {**values.get(name, {}), **table}
    values.update(flags)
    return cls.from_dict(values, origin=str(getattr(args, "config", None) or "flags"))


def resume_config(args: argparse.Namespace, cls: type[_S]) -> _S:
    """The run folder's own configuration, with the settings that may change when continuing (`resumable`) from flags.

    A run folder is data, not code: a saved setting that would run code (``trust_remote_code``, reward modules
    and files) is used only when the same value is given again on the command line."""
    if getattr(args, "config", None):
        raise ConfigurationError("--resume continues a run with its own saved configuration; drop --config.")
    saved = RunFolder(Path(args.resume), is_main=False).saved_config()
    given = flag_values(args, cls)
    code = code_settings(saved, cls)
    missing = {n: v for n, v in code.items() if given.get(n) != v}
    if missing:
        listed = "; ".join(f"{n}={v!r}" for n, v in missing.items())
        again = " ".join(flag_name(n) if v is True else f"{flag_name(n)} {' '.join(v)}" for n, v in missing.items())
        raise ConfigurationError(
            f"--resume {args.resume}: its saved settings would run code from outside proxim ({listed}). A run folder is data, not code: "
            f"check them, and give them again to continue: {again}"
        )
    allowed = set(resumable(cls)) | set(code)
    frozen = [n for n in given if n not in allowed and given[n] != saved.get(n)]
    if frozen:
        raise ConfigurationError(
            f"--resume: {', '.join(flag_name(n) for n in frozen)} cannot change when continuing a run "
            f"(only {', '.join(flag_name(n) for n in resumable(cls))} can); start a new run instead."
        )
    return cls.from_dict({**saved, **given}, origin=str(Path(args.resume) / "config.json"))


def _fail(command: str, exc: BaseException) -> int:
    print(f"proxim {command}: error: {exc}", file=sys.stderr)
    return 2


def _guarded(command: str, body: Callable[[], int]) -> int:
    """Run a subcommand: a user's mistake is one line and exit 2, a run that could not continue exit 1."""
    from proxim.train.distributed import leave_process_group

    try:
        return body()
    except TrainingError as exc:
        print(f"proxim {command}: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        return _fail(command, exc)
    finally:
        leave_process_group()


def _run_train(args: argparse.Namespace) -> int:
    def body() -> int:
        config = resume_config(args, TrainConfig) if args.resume else config_from_args(args, TrainConfig)
        config, regime = config.with_preset_training()
        if args.print_config:
            printed = config.offline() if config.is_offline() else config
            printed.check()
            if regime:
                taken = ", ".join(f"{k} = {v!r}" for k, v in regime.items())
                print(f"# from preset {config.objective_spec()[0]}'s training regime: {taken} (a flag or --config value overrides it)")
            print(printed.to_toml())
            return 0
        from proxim.train.api import train

        result = train(config, resume=args.resume)
        return 128 + result.interrupted if result.interrupted else 0

    return _guarded("train", body)


def _run_compare(args: argparse.Namespace) -> int:
    def body() -> int:
        config = config_from_args(args, CompareConfig)
        if len(set(args.presets)) != len(args.presets):
            raise ConfigurationError(f"compare: a preset is listed twice in {args.presets}.")
        for preset in args.presets:  # every objective must compose before anything runs
            run = TrainConfig(**{**config.to_dict(), "preset": preset})
            if run.is_offline():
                run.offline().check()
            else:
                run.check()
        from proxim.train.api import compare

        compare(config, args.presets, name=args.name)
        return 0

    return _guarded("compare", body)


def _run_sft(args: argparse.Namespace) -> int:
    def body() -> int:
        from proxim.train.recipes.sft import sft

        result = sft(resume_config(args, SFTConfig) if args.resume else config_from_args(args, SFTConfig), resume=args.resume)
        return 128 + result.interrupted if result.interrupted else 0

    return _guarded("sft", body)


def _run_reward_model(args: argparse.Namespace) -> int:
    def body() -> int:
        from proxim.train.recipes.reward_model import train_reward_model

        config = resume_config(args, RewardModelConfig) if args.resume else config_from_args(args, RewardModelConfig)
        result = train_reward_model(config, resume=args.resume)
        return 128 + result.interrupted if result.interrupted else 0

    return _guarded("reward-model", body)


def _command(subparsers: Any, name: str, help: str, description: str, epilog: str, settings: type[Settings], resume: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="TOML", help="read settings from a TOML file (keys are the setting names; objective overrides in a [set] table)")
    if resume:
        parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint (with its saved settings)")
    add_flags(parser, settings)
    return parser


def add_subcommands(subparsers: Any) -> None:
    """Add ``train``, ``compare``, ``sft`` and ``reward-model`` to the ``proxim`` command line (`proxim.cli`)."""
    train = _command(
        subparsers,
        "train",
        "train a model with an RL objective (default: GRPO on arithmetic, a few minutes on a CPU)",
        "Train a causal LM online with a composed RL objective (or offline with a preference preset: dpo, ipo, hinge). "
        "Every setting below is a field of proxim.train.TrainConfig; a TOML file (--config) sets any of them, flags override it.",
        TRAIN_EPILOG,
        TrainConfig,
    )
    train.add_argument("--print-config", action="store_true", help="check the settings, print them as TOML and exit without training")
    train.set_defaults(run=_run_train)

    compare = _command(
        subparsers,
        "compare",
        "train several presets on the same task, seeds and budget; write a plot and a table",
        "Train each PRESET with the same settings (the same seeds, prompts and budget), then write "
        "OUTPUT_DIR/NAME/compare.md (held-out accuracy and reward, KL, wall time) and compare.png.",
        "example:\n  proxim compare grpo rloo drpo lampo ppo --steps 100",
        CompareConfig,
        resume=False,
    )
    compare.add_argument("presets", nargs="+", metavar="PRESET", help="presets to compare (see proxim plugins)")
    compare.add_argument("--name", help="the comparison's folder under output_dir (default compare-<task>-<date>-<time>)")
    compare.set_defaults(run=_run_compare)

    sft = _command(
        subparsers,
        "sft",
        "supervised fine-tuning on {prompt, response} records (default: the task's answers); saves a model",
        "Fine-tune a causal LM on prompt -> response pairs (loss on the response), report the held-out "
        "loss and task accuracy before and after, and save RUN/model (from_pretrained-loadable, with its tokenizer). "
        "Without --data it trains on the task's answers: the warm start of proxim train, from the same cache. "
        "--warmstart-steps, --warmstart-lr and --warmstart-batch-size set the recipe (default 600 steps).",
        SFT_EPILOG,
        SFTConfig,
    )
    sft.set_defaults(run=_run_sft)

    rm = _command(
        subparsers,
        "reward-model",
        "train a sequence-classification reward model on preference pairs (Bradley-Terry); saves it",
        "Train a transformers sequence-classification model (num_labels=1) with the Bradley-Terry loss "
        "-log sigmoid(r(chosen) - r(rejected)) on {prompt, chosen, rejected} records (default: pairs built from the "
        "task, as proxim train --preset dpo builds them), report the held-out pairwise accuracy before and after, "
        "and save RUN/model for proxim train --reward-model. --steps, --prompts-per-step (pairs per step) and --lr set the recipe.",
        REWARD_MODEL_EPILOG,
        RewardModelConfig,
    )
    rm.set_defaults(run=_run_reward_model)
