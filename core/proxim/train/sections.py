"""The sections of settings that recipes share: each a small frozen class of related settings, with its checks.

A recipe's configuration (`proxim.train.config`) inherits the sections it uses. A section checks its own
values on construction (`proxim.train.settings`) and what needs a look around in `Checked.validate`
(files and directories exist, the task is registered), cooperatively through ``super()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from proxim.errors import ConfigurationError
from proxim.train import threads
from proxim.train.files import check_run_name
from proxim.train.settings import Settings, section, setting

if TYPE_CHECKING:
    import proxim
    from proxim.tasks import Task


@attrs.frozen
class CheckContext:
    """What the checks need beyond the settings: the registry, the process count, what the caller passes in code."""

    registry: proxim.Registry
    num_processes: int = 1
    custom_rewards: bool = False
    custom_prompts: bool = False


class Checked(Settings):
    """Sections add their own checks to `validate` (cooperatively, through ``super()``)."""

    def validate(self, context: CheckContext) -> None:
        """Raise `ConfigurationError` for what this configuration's sections find wrong."""


def _local_dirs(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and not Path(value).is_dir():
            raise ConfigurationError(f"{name}={value!r} is not a local directory (nothing is downloaded).")


#: What a folder must hold to be what a setting names (checked before anything is built).
MODEL_FILES = {"model": ("config.json",), "init": ("config.json",), "critic_model": ("config.json",), "reward_model": ("config.json",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _model_dirs(settings: Settings, *names: str) -> None:
    """Each named setting, when set, is a local folder saved by transformers (``config.json``; a tokenizer where one is read)."""
    _local_dirs(settings, *names)
    for name in names:
        value = getattr(settings, name)
        if value is None:
            continue
        folder = Path(value)
        if name != "tokenizer" and not (folder / "config.json").is_file():
            raise ConfigurationError(
                f"{name}={value!r} is not a transformers model folder: it has no config.json. Save one with "
                "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) (proxim sft writes RUN/model that way)."
            )
        reads_tokenizer = name == "tokenizer" or (name in ("model", "init") and getattr(settings, "tokenizer", None) is None)
        if reads_tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigurationError(
                f"{name}={value!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it there with "
                "tokenizer.save_pretrained(DIR), or give its folder with --tokenizer."
            )


def _files(settings: Settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and not Path(value).is_file():
            raise ConfigurationError(f"{name}={value!r} does not exist.")


# -- objective -------------------------------------------------------------------------------------


@section("objective")
class Preset(Checked):
    preset: str | None = setting(
        None,
        "objective preset (see `proxim plugins`); default grpo when no --baseline/--advantage/--region is given, else none (free composition)",
        none_word=False,
    )


@section("objective")
class Parts(Checked):
    baseline: str | None = setting(None, "baseline part by name, replacing the preset's")
    advantage: str | None = setting(None, "advantage part by name, replacing the preset's")
    region: str | None = setting(None, "trust-region part by name, replacing the preset's")


@section("objective")
class Overrides(Checked):
    set: dict[str, Any] = setting({}, "objective hyperparameter overrides, routed by name: --set kl_coef=0.01 --set region.eps_high=0.28", metavar="KEY=VALUE")


@section("objective")
class AdaptiveKL(Checked):
    adaptive_kl: bool = setting(False, "adapt kl_coef toward kl_target after each rollout (Ziegler et al. 2019); needs kl_coef > 0")
    kl_target: float = setting(6.0, "adaptive KL: target KL per sequence (nats)", min=0.0, min_open=True)
    kl_horizon: int = setting(10000, "adaptive KL: horizon, in sequences", min=1)


# -- task, prompts and rewards ---------------------------------------------------------------------


@section("task and rewards")
class TaskChoice(Checked):
    task: str | None = setting(
        "arithmetic", "registered task (arithmetic, reverse, count, or a plugin's): prompts, reward and held-out set; 'none' with a prompts_file"
    )
    eval_size: int | None = setting(None, "held-out prompts to evaluate before and after training; default the task's (200)", min=1)

    def validate(self, context: CheckContext) -> None:
        if self.task is not None:
            context.registry.get("task", self.task)
        super().validate(context)

    def load_task(self, registry: proxim.Registry) -> Task | None:
        """The task's instance, or None without one."""
        return registry.get("task", self.task)() if self.task is not None else None


@section("task and rewards")
class PromptFiles(Checked):
    prompts_file: str | None = setting(None, 'JSONL file of training prompts ({"prompt": ..., "answer": ..., other fields}), instead of the task\'s')
    eval_prompts_file: str | None = setting(
        None, "JSONL file of held-out prompts; default: the task's held-out set, or the first eval_size rows of prompts_file"
    )

    def validate(self, context: CheckContext) -> None:
        _files(self, "prompts_file", "eval_prompts_file")
        super().validate(context)


@section("task and rewards")
class Rewards(Checked):
    rewards: list[str] = setting(
        ["task"], "reward functions: 'task', 'module:function' or 'file.py:function'", metavar="SPEC", runs_code=lambda specs: any(s != "task" for s in specs)
    )
    reward_weights: list[float] = setting([], "one weight per reward function (default all 1)", metavar="W")
    reward_model: str | None = setting(None, "directory of a transformers sequence-classification reward model (num_labels=1), added to the rewards")
    reward_model_weight: float = setting(1.0, "weight of the reward model's score")
    max_reward_failures: int = setting(
        3,
        "skip a step whose rewards fail (raise, or return NaN/inf, None or the wrong count); stop with an error (and a checkpoint) after this many in a row",
        min=1,
    )

    def validate(self, context: CheckContext) -> None:
        _model_dirs(self, "reward_model")
        super().validate(context)


@section("task and rewards")
class Records(Checked):
    data: str | None = setting(
        None,
        "JSONL records for offline training: {prompt, chosen, rejected} pairs for --preset dpo/ipo/hinge and proxim reward-model, {prompt, response} for proxim sft; default: built from the task",
    )
    system_prompt: str | None = setting(
        None, "system message put first in every chat prompt (a prompt given as a list of messages) that has none of its own", metavar="TEXT"
    )

    def validate(self, context: CheckContext) -> None:
        _files(self, "data")
        if self.system_prompt is not None and self.data is None and getattr(self, "prompts_file", None) is None and not context.custom_prompts:
            raise ConfigurationError(
                "system_prompt is put first in chat prompts, but the prompts here are the task's strings; give chat prompts "
                "(--prompts-file, or --data records) or drop --system-prompt."
            )
        super().validate(context)


@section("task and rewards")
class PreferencePairs(Checked):
    preference_prompts: int = setting(
        16384,
        "default preference set: training prompts the initial policy answers twice (sampled); the better answer by task reward is chosen, ties are dropped (held out: 8 answers to each held-out prompt, paired two by two)",
        min=1,
    )


# -- model -----------------------------------------------------------------------------------------


@section("model")
class Model(Checked):
    model: str | None = setting(None, "local directory of a transformers causal LM and its tokenizer; default the built-in tiny Llama")
    tokenizer: str | None = setting(None, "tokenizer directory, when it is not the model's")
    trust_remote_code: bool = setting(False, "allow model code shipped with a local model (off unless asked for)", runs_code=lambda on: on is True)
    tiny_hidden_size: int = setting(128, "built-in model: hidden size", min=8)
    tiny_layers: int = setting(2, "built-in model: decoder layers", min=1)
    tiny_heads: int = setting(4, "built-in model: attention heads (must divide the hidden size)", min=1)
    mixed_precision: str = setting(
        "auto",
        "accelerate mixed precision: auto (bf16 on a CUDA GPU that supports it, else float32; an accelerate launch's fp16/bf16 wins), "
        "no (float32), fp16 (with loss scaling; CUDA only) or bf16",
        choices=("auto", "no", "fp16", "bf16"),
    )
    threads: str = setting(
        "auto",
        "CPU threads per process for torch: auto (the cores other processes leave idle when the run starts, shared by "
        "this launch's processes; OMP_NUM_THREADS wins; a resumed run keeps its checkpoint's count) or a number",
        resumable=True,
        none_word=False,
    )

    def validate(self, context: CheckContext) -> None:
        threads.check_setting(self.threads)
        if self.tiny_hidden_size % self.tiny_heads:
            raise ConfigurationError(f"tiny_heads={self.tiny_heads} must divide tiny_hidden_size={self.tiny_hidden_size}.")
        _model_dirs(self, "model", "tokenizer")
        super().validate(context)

    def start_model(self) -> str | None:
        """The directory training starts from; None for the built-in tiny model."""
        return self.model


@section("model")
class Init(Model):
    init: str | None = setting(
        None,
        "start from this saved policy instead of --model, as is (no warm start): a proxim sft model/ folder or any local causal LM with its tokenizer; it is also the KL reference, and proxim reward-model's backbone",
    )

    def validate(self, context: CheckContext) -> None:
        if self.init is not None and self.model is not None:
            raise ConfigurationError(f"init={self.init!r} and model={self.model!r} both name the starting model; give one of them.")
        _model_dirs(self, "init")
        super().validate(context)

    def start_model(self) -> str | None:
        """The directory training starts from (`init`, else `model`); None for the built-in tiny model."""
        return self.init or self.model


@section("model")
class Critic(Checked):
    critic_model: str | None = setting(None, "critic backbone directory (objectives with a critic); default a copy of the policy's backbone")

    def validate(self, context: CheckContext) -> None:
        _model_dirs(self, "critic_model")
        super().validate(context)


@section("model")
class Scoring(Checked):
    logprob_chunk_size: int = setting(4096, "token positions whose logits exist at once when gathering log-probs", min=1)


@section("model")
class Adapter(Checked):
    lora_rank: int = setting(
        0, "LoRA adapter rank (0: off, the model trains all its weights); the reference policy is then the model with its adapter disabled", min=0
    )
    lora_alpha: float = setting(16.0, "LoRA scaling alpha (the adapter's update is scaled by alpha / rank)", min=0.0, min_open=True)
    lora_dropout: float = setting(0.0, "dropout on the LoRA adapter's input", min=0.0, max=1.0)
    lora_targets: list[str] = setting([], "module names that get adapters (e.g. q_proj v_proj); default every linear layer of the decoder", metavar="NAME")
    merge_lora: bool = setting(False, "also save RUN/model-merged: the adapter merged into the weights, a plain model folder")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, more compute), policy and critic")

    def validate(self, context: CheckContext) -> None:
        if self.merge_lora and self.lora_rank == 0:
            raise ConfigurationError("merge_lora saves the LoRA adapter merged into the weights, but lora_rank is 0 (no adapter); set --lora-rank.")
        super().validate(context)


# -- warm start ------------------------------------------------------------------------------------


@section("warm start")
class WarmStart(Checked):
    warmstart_steps: int | None = setting(
        None, "supervised steps on the task's answers before RL (cached); default 600 for the built-in model, 0 for --model", min=0
    )
    warmstart_lr: float = setting(1e-3, "supervised learning rate (linear warm-up over 100 updates)", min=0.0, min_open=True)
    warmstart_batch_size: int = setting(64, "supervised examples per step", min=1)
    cache_dir: str | None = setting(None, "warm-start cache; default $PROXIM_CACHE_DIR or ~/.cache/proxim")

    def warmstart_steps_for(self, start_model: str | None) -> int:
        """The warm start's length: the setting, else 600 for the built-in model and 0 for a model directory."""
        if self.warmstart_steps is not None:
            return self.warmstart_steps
        return 600 if start_model is None else 0


@section("warm start")
class Start(Init, WarmStart):
    """Where a run starts: a model (`Init`) and its warm start; a directory given as ``init`` is used as is."""

    def validate(self, context: CheckContext) -> None:
        if self.init is not None and self.warmstart_steps:
            raise ConfigurationError(f"init={self.init!r} is used as is, without a warm start; drop warmstart_steps, or give the directory as model instead.")
        super().validate(context)


# -- run -------------------------------------------------------------------------------------------


@section("run")
class Run(Checked):
    output_dir: str = setting("runs", "where run folders are created")
    seed: int = setting(0, "seed of prompts, sampling, shuffling and the built-in model", min=0)
    save_every: int = setting(50, "checkpoint every N steps (0: only at the end and on interruption)", min=0, resumable=True)
    keep_checkpoints: int = setting(2, "checkpoints kept (oldest deleted)", min=1, resumable=True)
    tracker: str = setting(
        "auto", "accelerate tracker: auto (tensorboard when installed), tensorboard, none", choices=("auto", "tensorboard", "none"), resumable=True
    )
    quiet: bool = setting(False, "no progress bar or progress messages (the final table is still printed)", resumable=True)


@section("run")
class RunName(Checked):
    run_name: str | None = setting(None, "the run folder's name; default <preset>-<task>-<date>-<time>")

    def validate(self, context: CheckContext) -> None:
        if self.run_name is not None:
            check_run_name(self.run_name)
        super().validate(context)


@section("run")
class Evaluation(Checked):
    eval_every: int = setting(
        0, "also evaluate on the held-out set every N steps, logged as eval/* in metrics.jsonl (0: before and after only)", min=0, resumable=True
    )


@section("run")
class SampleLog(Checked):
    log_samples: int = setting(4, "completions per step written to samples.jsonl", min=0, resumable=True)
