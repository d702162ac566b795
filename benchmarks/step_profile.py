"""Where one online RL step's time goes: the phases of ``Trainer.step``, timed inside the process that trains.

Builds the trainer of ``proxim train`` (the default job: GRPO on arithmetic, the built-in tiny model after its
cached warm start, 32 prompts x 8 responses) or of a Qwen2-0.5B-shaped model with random weights (``--size
0.5b``: hidden 896, 24 layers, 14 heads, 2 key-value heads, MLP 4864, vocabulary 151936, tied embeddings; the
byte tokenizer, so prompts are short), runs ``--steps`` steps and reports each phase's inclusive wall time
per step and its share of the step, over the steps after ``--skip`` (the first ones pay for lazy
initialisation). Phases are timed by wrapping the functions that do them (no profiler, so Python-heavy code
is not inflated):

  sample              `Trainer.sample`: encoding, ``generate``, decoding
    generate          transformers ``generate``
  score               the rewards
  rollout             `Trainer.rollout`: the no-grad forwards (old log-probs when recomputed, reference)
  stage 1             ``Objective.advantages``
  rollout metrics     the step's reward, length and KL metrics
  update              `Trainer.update`: stage 2 and the optimiser
    policy forward    the policy's log-probs with gradients
    stage 2 loss      ``Objective.loss`` (forward)
    stage 2 backward  the loss's own backward: from ``backward`` starting to the gradient reaching the log-probs
    gradient diag.    ``Objective.gradient_diagnostics``
    backward          the whole backward pass (stage 2's included)
    optimiser         clipping, AdamW and the schedule
  sync, log samples   the generator's weight sync; samples.jsonl
  loop                what the step loop adds around a step (metrics.jsonl, progress, the stop check)

    python benchmarks/step_profile.py                          # the default job, 40 steps
    python benchmarks/step_profile.py --size 0.5b --steps 4 --skip 1
    python benchmarks/step_profile.py -- --old-logprobs recompute   # any proxim train flags after --

The warm start comes from the usual cache ($PROXIM_CACHE_DIR or ~/.cache/proxim); the first run makes it.
Not part of the package and never run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common
import torch

QWEN2_05B = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
PHASES = (
    ("sample", 0),
    ("generate", 1),
    ("score", 0),
    ("rollout", 0),
    ("stage 1", 0),
    ("rollout metrics", 0),
    ("update", 0),
    ("policy forward", 1),
    ("stage 2 loss", 1),
    ("stage 2 backward", 1),
    ("gradient diag.", 1),
    ("backward", 1),
    ("optimiser", 1),
    ("sync", 0),
    ("log samples", 0),
    ("loop", 0),
)


class Clock:
    """Inclusive wall time per label and step; `wrap` times a function under a label."""

    def __init__(self) -> None:
        self.step = -1
        self.times: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, label: str, seconds: float) -> None:
        self.times[label][self.step] += seconds

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - start)

    def wrap(self, owner: Any, name: str, label: str | Callable[..., str | None]) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            chosen = label(*args, **kwargs) if callable(label) else label
            if chosen is None:
                return original(*args, **kwargs)
            with self.timed(chosen):
                return original(*args, **kwargs)

        setattr(owner, name, timed)


def qwen2_05b(directory: Path) -> str:
    """A Qwen2-0.5B-shaped model with random weights (seed 0) and the byte tokenizer, saved in `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from proxim.train import models

    tokenizer = models.byte_tokenizer()
    config = Qwen2Config(**QWEN2_05B, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(config).float()
    models.save_model_dir(lm, tokenizer, directory)
    return str(directory)


def instrument(clock: Clock) -> None:
    """Wrap the functions of one step's phases (see the module docstring)."""
    import accelerate
    from transformers.generation.utils import GenerationMixin

    import proxim
    from proxim.train import logprobs, optimization
    from proxim.train.recipes import online

    for name, label in (("sample", "sample"), ("score", "score"), ("rollout", "rollout"), ("update", "update"), ("_rollout_metrics", "rollout metrics")):
        clock.wrap(online.Trainer, name, label)
    clock.wrap(online.Trainer, "_log_samples", "log samples")
    clock.wrap(GenerationMixin, "generate", "generate")
    clock.wrap(proxim.Objective, "advantages", "stage 1")
    clock.wrap(proxim.Objective, "gradient_diagnostics", "gradient diag.")
    clock.wrap(logprobs.PolicyScorer, "forward", lambda *a, **k: "policy forward" if torch.is_grad_enabled() else None)
    clock.wrap(optimization.Optimization, "_step", "optimiser")
    backward_start: list[float] = []
    loss = proxim.Objective.loss

    def timed_loss(self: Any, logprobs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with clock.timed("stage 2 loss"):
            out = loss(self, logprobs, *args, **kwargs)
        if logprobs.requires_grad:
            step = clock.step

            def reached(grad: torch.Tensor) -> None:
                if backward_start and clock.step == step:
                    clock.add("stage 2 backward", time.perf_counter() - backward_start[-1])

            logprobs.register_hook(reached)
        return out

    proxim.Objective.loss = timed_loss  # type: ignore[method-assign]
    backward = accelerate.Accelerator.backward

    def timed_backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        backward_start.append(time.perf_counter())
        with clock.timed("backward"):
            return backward(self, *args, **kwargs)

    accelerate.Accelerator.backward = timed_backward  # type: ignore[method-assign]


def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    from proxim.cli import build_parser
    from proxim.train import TrainConfig
    from proxim.train.cli import config_from_args
    from proxim.train.recipes import online

    clock = Clock()
    instrument(clock)
    with tempfile.TemporaryDirectory(prefix="proxim-step-profile-") as tmp:
        flags = ["--steps", str(args.steps), "--save-every", "0", "--tracker", "none", "--quiet", "--eval-size", "1", "--output-dir", tmp]
        if args.size == "0.5b":
            flags += ["--model", qwen2_05b(Path(tmp) / "qwen2-0.5b"), "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "16"]
        config = config_from_args(build_parser().parse_args(["train", *flags, *extra]), TrainConfig)
        trainer = online.Trainer(config)
        step = online.Trainer.step

        def timed_step(self: Any, k: int) -> dict[str, float]:
            clock.step = k
            with clock.timed("step"):
                return step(self, k)

        online.Trainer.step = timed_step  # type: ignore[method-assign]
        marks: list[float] = []
        original = trainer.session.run_steps

        def run_steps(*a: Any, **k: Any) -> Any:
            fn = k["step"] if "step" in k else a[0]

            def stamped(s: int) -> dict[str, float]:
                marks.append(time.perf_counter())
                return fn(s)

            return original(stamped, *a[1:], **{key: v for key, v in k.items() if key != "step"})

        trainer.session.run_steps = run_steps  # type: ignore[method-assign]
        trainer.generator.sync = _timed_sync(clock, trainer.generator.sync)
        trainer.run()
        threads = torch.get_num_threads()
    steps = list(range(args.skip, args.steps))
    # the loop's own time: from one step's start to the next's, less the step (the last step has no next mark)
    for k in steps[:-1]:
        clock.step = k
        clock.add("loop", marks[k + 1] - marks[k] - clock.times["step"][k])
    return {"clock": clock, "steps": steps, "threads": threads, "params": trainer.n_params, "config": config}


def _timed_sync(clock: Clock, sync: Callable[[Any], None]) -> Callable[[Any], None]:
    def timed(lm: Any) -> None:
        with clock.timed("sync"):
            sync(lm)

    return timed


def report(result: dict[str, Any]) -> str:
    clock, steps = result["clock"], result["steps"]
    per_step = statistics.median(clock.times["step"][k] for k in steps)
    rows = []
    for label, depth in PHASES:
        values = [clock.times[label].get(k, 0.0) for k in (steps[:-1] if label == "loop" else steps)]
        med = statistics.median(values) if values else 0.0
        rows.append(["&nbsp;&nbsp;" * depth + label, common.fmt_time(med), f"{100 * med / per_step:.1f}%"])
    rows.append(["step (median)", common.fmt_time(per_step), "100%"])
    return common.table(["phase", "per step (median)", "share of the step"], rows)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("default", "0.5b"), default="default", help="the default job's tiny model, or a Qwen2-0.5B-shaped one")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=3, help="leading steps left out of the medians")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: proxim's choice, the threads setting)")
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        raise SystemExit("--skip must be below --steps")
    if args.threads is not None:
        extra = ["--threads", str(args.threads), *extra]
    result = run(args, extra)
    print(f"- command: `{common.command()}`")
    print(f"- machine: {common.cpu_model()}; torch threads at the end: {result['threads']}")
    print(f"- versions: {common.versions()}")
    print(f"- model: {result['params'] / 1e6:.2f} M parameters; steps {args.skip + 1}..{args.steps} of {args.steps}")
    print()
    print(report(result))


if __name__ == "__main__":
    main()
