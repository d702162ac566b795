"""``proxim train``, ``proxim compare``, ``proxim sft`` and ``proxim reward-model``: argparse subcommands built from `TrainConfig`'s fields.

Importing this module is light (argparse, attrs, the config module): transformers, accelerate and the
loop are imported only when a subcommand runs, so ``proxim --help`` and ``proxim plugins`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from proxim.errors import ConfigurationError, ProximError
from proxim.train.config import (
    GROUPS,
    TrainConfig,
    field_default,
    flag_name,
    parse_assignments,
    read_toml,
)

RESUMABLE = ("steps", "quiet", "save_every", "eval_every", "keep_checkpoints", "tracker", "log_samples")
"""Settings that may change when continuing a run (the rest would make it a different run)."""

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


def _nullable(parse: Any) -> Any:
    def convert(text: str) -> Any:
        return None if text.strip().lower() == "none" else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = (), only: Sequence[str] | None = None) -> None:
    groups = {g: parser.add_argument_group(f"{g} settings") for g in GROUPS}
    for a in attrs.fields(TrainConfig):
        if a.name in skip or (only is not None and a.name not in only):
            continue
        meta = a.metadata
        group = groups[meta["group"]]
        default = field_default(a.name)
        shown = "none" if default is None else json.dumps(default) if isinstance(default, (list, dict)) else default
        help_text = f"{meta['help']} (default: {shown})".replace("%", "%%")
        kind = meta["kind"]
        kwargs: dict[str, Any] = {"dest": a.name, "default": argparse.SUPPRESS, "help": help_text}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if kind == "bool":
            group.add_argument(flag_name(a.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif kind == "dict":
            group.add_argument(flag_name(a.name), action="append", **kwargs)
        elif kind.startswith("list"):
            group.add_argument(flag_name(a.name), nargs="*", type=float if kind == "list[float]" else str, **kwargs)
        else:
            parse = {"str": str, "int": int, "float": float}[kind]
            if meta["nullable"] and a.name != "preset":
                parse = _nullable(parse)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            group.add_argument(flag_name(a.name), type=parse, **kwargs)


def config_from_args(args: argparse.Namespace, skip: Sequence[str] = ()) -> TrainConfig:
    """Defaults < the --config TOML file < flags given on the command line."""
    names = [a.name for a in attrs.fields(TrainConfig) if a.name not in skip]
    values: dict[str, Any] = read_toml(args.config) if getattr(args, "config", None) else {}
    flags = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if "set" in flags:
        merged = dict(values.get("set", {}))
        merged.update(parse_assignments(flags.pop("set")))
        values["set"] = merged
    values.update(flags)
    return TrainConfig.from_dict(values, origin=str(getattr(args, "config", None) or "flags"))


def _resume_config(args: argparse.Namespace) -> TrainConfig:
    run_dir = Path(args.resume)
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigurationError(f"--resume {run_dir}: no config.json there; is it a proxim run folder?")
    values = json.loads(saved.read_text())
    given = [a.name for a in attrs.fields(TrainConfig) if hasattr(args, a.name)]
    if getattr(args, "config", None):
        raise ConfigurationError("--resume continues a run with its own saved configuration; drop --config.")
    frozen = [n for n in given if n not in RESUMABLE]
    if frozen:
        raise ConfigurationError(
            f"--resume: {', '.join(flag_name(n) for n in frozen)} cannot change when continuing a run "
            f"(only {', '.join(flag_name(n) for n in RESUMABLE)} can); start a new run instead."
        )
    values.update({n: getattr(args, n) for n in given})
    return TrainConfig.from_dict(values, origin=str(saved))


def _fail(command: str, exc: BaseException) -> int:
    print(f"proxim {command}: error: {exc}", file=sys.stderr)
    return 2


def _run_train(args: argparse.Namespace) -> int:
    try:
        config = _resume_config(args) if args.resume else config_from_args(args)
        if args.print_config:
            config.check()
            print(config.to_toml())
            return 0
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail("train", exc)
    from proxim.train.loop import TrainingError, train

    try:
        result = train(config, resume=args.resume)
    except TrainingError as exc:
        print(f"proxim train: {exc}", file=sys.stderr)
        return 1
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail("train", exc)
    finally:
        _leave_process_group()
    return 128 + result.interrupted if result.interrupted else 0


def _leave_process_group() -> None:
    """Under `accelerate launch`, release the process group before the process exits: a rank that exits
    while gloo still holds it can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run_compare(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, skip=("preset", "baseline", "advantage", "region", "run_name"))
        if len(set(args.presets)) != len(args.presets):
            raise ConfigurationError(f"compare: a preset is listed twice in {args.presets}.")
        for preset in args.presets:  # every objective must compose before anything runs
            attrs.evolve(config, preset=preset).check()
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail("compare", exc)
    from proxim.train.compare import compare

    try:
        compare(config, args.presets, name=args.name)
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail("compare", exc)
    finally:
        _leave_process_group()
    return 0


_MODEL_SETTINGS = ("model", "tokenizer", "trust_remote_code", "tiny_hidden_size", "tiny_layers", "tiny_heads")
"""The settings of ``proxim sft`` and ``proxim reward-model`` (the others do not apply to them)."""
_RUN_SETTINGS = ("output_dir", "run_name", "seed", "quiet", "cache_dir")
SFT_SETTINGS = (*_MODEL_SETTINGS, *_RUN_SETTINGS, "task", "data", "eval_size", "max_new_tokens", "warmstart_steps", "warmstart_lr", "warmstart_batch_size")
REWARD_MODEL_SETTINGS = (
    *SFT_SETTINGS, "init", "preference_prompts", "temperature", "top_p", "steps", "prompts_per_step", "lr", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm",
)

SFT_EPILOG = """examples:
  proxim sft                                     the task's answers (the warm start of proxim train), saved as RUN/model
  proxim sft --data sft.jsonl --task none        {"prompt", "response"} records
  proxim sft --model path/to/model --data sft.jsonl --warmstart-steps 1000
"""

REWARD_MODEL_EPILOG = """examples:
  proxim reward-model                            pairs built from the task; backbone: the warm-started policy
  proxim reward-model --init runs/sft/model      backbone (and pair sampler): the model of proxim sft
  proxim reward-model --data pairs.jsonl --init runs/sft/model --task none
then: proxim train --preset ppo --init runs/sft/model --reward-model RUN/model --rewards
"""


def _run_offline(command: str, run: Any, args: argparse.Namespace, settings: Sequence[str]) -> int:
    try:
        config = config_from_args(args, skip=[a.name for a in attrs.fields(TrainConfig) if a.name not in settings])
        config.check_inputs()
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail(command, exc)
    try:
        run(config)
    except (ProximError, LookupError, ValueError, OSError) as exc:
        return _fail(command, exc)
    return 0


def _run_sft(args: argparse.Namespace) -> int:
    from proxim.train.sft import sft

    return _run_offline("sft", sft, args, SFT_SETTINGS)


def _run_reward_model(args: argparse.Namespace) -> int:
    from proxim.train.reward_model import train_reward_model

    return _run_offline("reward-model", train_reward_model, args, REWARD_MODEL_SETTINGS)


def add_subcommands(subparsers: Any) -> None:
    """Add ``train``, ``compare``, ``sft`` and ``reward-model`` to the ``proxim`` command line (`proxim.cli`)."""
    train = subparsers.add_parser(
        "train",
        help="train a model with an RL objective (default: GRPO on arithmetic, a few minutes on a CPU)",
        description="Train a causal LM online with a composed RL objective. Every setting below is a field of "
        "proxim.train.TrainConfig; a TOML file (--config) sets any of them, flags override it.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", metavar="TOML", help="read settings from a TOML file (keys are the setting names; objective overrides in a [set] table)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint (with its saved settings)")
    train.add_argument("--print-config", action="store_true", help="check the settings, print them as TOML and exit without training")
    _add_config_flags(train)
    train.set_defaults(run=_run_train)

    compare = subparsers.add_parser(
        "compare",
        help="train several presets on the same task, seeds and budget; write a plot and a table",
        description="Train each PRESET with the same settings (the same seeds, prompts and budget), then write "
        "OUTPUT_DIR/NAME/compare.md (held-out accuracy and reward, KL, wall time) and compare.png.",
        epilog="example:\n  proxim compare grpo rloo drpo lampo ppo --steps 100",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("presets", nargs="+", metavar="PRESET", help="presets to compare (see proxim plugins)")
    compare.add_argument("--name", help="the comparison's folder under output_dir (default compare-<task>-<date>-<time>)")
    compare.add_argument("--config", metavar="TOML", help="read settings from a TOML file")
    _add_config_flags(compare, skip=("preset", "baseline", "advantage", "region", "run_name"))
    compare.set_defaults(run=_run_compare)

    sft = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on {prompt, response} records (default: the task's answers); saves a model",
        description="Fine-tune a causal LM on prompt -> response pairs (loss on the response), report the held-out "
        "loss and task accuracy before and after, and save RUN/model (from_pretrained-loadable, with its tokenizer). "
        "Without --data it trains on the task's answers: the warm start of proxim train, from the same cache. "
        "--warmstart-steps, --warmstart-lr and --warmstart-batch-size set the recipe (default 600 steps).",
        epilog=SFT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sft.add_argument("--config", metavar="TOML", help="read settings from a TOML file")
    _add_config_flags(sft, only=SFT_SETTINGS)
    sft.set_defaults(run=_run_sft)

    rm = subparsers.add_parser(
        "reward-model",
        help="train a sequence-classification reward model on preference pairs (Bradley-Terry); saves it",
        description="Train a transformers sequence-classification model (num_labels=1) with the Bradley-Terry loss "
        "-log sigmoid(r(chosen) - r(rejected)) on {prompt, chosen, rejected} records (default: pairs built from the "
        "task, as proxim train --preset dpo builds them), report the held-out pairwise accuracy before and after, "
        "and save RUN/model for proxim train --reward-model. --steps, --prompts-per-step (pairs per step) and --lr set the recipe.",
        epilog=REWARD_MODEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("--config", metavar="TOML", help="read settings from a TOML file")
    _add_config_flags(rm, only=REWARD_MODEL_SETTINGS)
    rm.set_defaults(run=_run_reward_model)
