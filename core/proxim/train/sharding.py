"""Sharded training (FSDP2): what proxim's loop needs around accelerate's ``fully_shard``.

Launched with an FSDP configuration (``accelerate launch --config_file examples/accelerate/fsdp2.yaml``),
accelerate shards each model that `prepare` is given: every process keeps 1/N of each weight, gradient
and AdamW state, and a layer's full weights exist only while it runs. proxim adds four things:

- **CPU.** accelerate forms a CPU (gloo) process group only when told it runs on CPU, and then ignores an
  FSDP configuration (it wraps the model in DDP instead, without a word). `enable_on_cpu` turns the FSDP
  configuration back on, so that a CPU launch shards exactly as a GPU launch does; that is how the tests
  run it. On GPUs accelerate's own path is used unchanged.
- **Several models, one optimiser.** accelerate's FSDP2 path takes one model with its optimiser; a PPO run
  trains a policy and a critic with one AdamW. `prepare` shards each model on its own (each its own FSDP
  root, decoder layers their own units) and points the optimiser at the shards.
- **Sampling.** ``generate`` runs the causal LM *inside* the wrapped scorer, so the hooks of the wrapper
  (the FSDP root, which owns the embeddings, the final norm and the output head) never gather those:
  `full_parameters` gathers them for the duration. Each decoder layer still gathers its weights at every
  decoding step, a collective, so every process must run the same number of steps: the generator passes
  ``synced_gpus=True`` (`is_sharded`) and the evaluation gives every process as many prompts.
- **Checkpoints** hold full (gathered) tensors, in exactly the format one process writes: `full_tensors`
  gathers a module's weights or an optimiser's states (a collective; only the main process keeps them),
  and `load_full` / `shard_optimizer_state` cut full tensors back into this process's shards. So a
  checkpoint resumes under any number of processes, with or without FSDP, and ``model/`` is a plain
  model folder. The price: the main process holds one full copy on the host while writing.

FSDP version 1 and DeepSpeed are not wired in (`check_supported`): FSDP1 is refused, DeepSpeed is
launched by accelerate as it is, untested (it needs CUDA and the deepspeed package).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from proxim.errors import ConfigurationError

if TYPE_CHECKING:
    from accelerate import Accelerator

#: Every submodule of a sharded model -> the FSDP root it belongs to (`root_of`).
_ROOTS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch`` with an FSDP configuration sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def enable_on_cpu(accelerator: Accelerator, precision: str) -> None:
    """Shard with FSDP2 on a CPU (gloo) group when the launch asked for FSDP (see the module docstring).

    accelerate's state keeps ``MULTI_CPU`` whenever it runs on CPU; this sets the distributed type to FSDP
    and gives the state the plugin built from the launch's FSDP settings (FSDP_* variables), as accelerate
    does on GPUs."""
    if not requested() or accelerator.num_processes < 2:
        return
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_supported(accelerator: Accelerator) -> None:
    """Refuse launches proxim does not train under: FSDP version 1, and DeepSpeed without CUDA."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigurationError(
            "the accelerate configuration asks for FSDP version 1; proxim shards with FSDP2 only. "
            "Set fsdp_version: 2 in its fsdp_config (see examples/accelerate/fsdp2.yaml)."
        )
    if kind == DistributedType.DEEPSPEED and not torch.cuda.is_available():
        raise ConfigurationError("DeepSpeed needs CUDA GPUs; on CPU launch with examples/accelerate/fsdp2.yaml (FSDP2) or ddp.yaml instead.")


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run's models are sharded (FSDP2, also over one process on a GPU): forward passes are then collectives."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def splits_parameters(accelerator: Accelerator) -> bool:
    """Whether the run's parameters are split over its processes: FSDP2 (`is_sharded`) or DeepSpeed's ZeRO."""
    from accelerate.utils import DistributedType

    return is_sharded(accelerator) or accelerator.distributed_type == DistributedType.DEEPSPEED


# -- preparing models ------------------------------------------------------------------------------


def prepare(accelerator: Accelerator, models: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> tuple[list[nn.Module], Any]:
    """Shard each of `models` (its own FSDP root) and move `optimizer` onto the shards; returns (models, accelerate's optimiser).

    The optimiser's parameter groups keep their order, so its state dict is laid out as in a single process."""
    from accelerate.utils.fsdp_utils import fsdp2_canonicalize_names

    where: dict[int, tuple[int, str]] = {}
    for index, model in enumerate(models):
        for name, param in fsdp2_canonicalize_names(dict(model.named_parameters())).items():
            where[id(param)] = (index, name)
    groups = []
    for group in optimizer.param_groups:
        try:
            groups.append([where[id(p)] for p in group["params"]])
        except KeyError:
            raise ValueError("the optimiser holds a parameter that none of the models given to prepare() has") from None
        group["params"] = []  # no second reference to the full weights while they are sharded
    sharded = []
    for model in models:
        _name_layer_units(accelerator, model)
        sharded.append(accelerator.prepare(model))
        for module in sharded[-1].modules():
            _ROOTS[module] = sharded[-1]
    named = [fsdp2_canonicalize_names(dict(m.named_parameters())) for m in sharded]
    for group, keys in zip(optimizer.param_groups, groups):
        group["params"] = [named[index][name] for index, name in keys]
    return sharded, accelerator.prepare_optimizer(optimizer)


def prepare_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """A frozen model (a reference policy) sharded like the trained ones when the run is sharded; else as it is.

    Its forward passes are then collectives too, which every process runs the same number of times."""
    if not is_sharded(accelerator):
        return module
    _name_layer_units(accelerator, module)
    sharded: nn.Module = accelerator.prepare(module)
    for part in sharded.modules():
        _ROOTS[part] = sharded
    return sharded


def _name_layer_units(accelerator: Accelerator, model: nn.Module) -> None:
    """Let accelerate's transformer auto-wrap find the decoder layers of the transformers models inside `model`.

    accelerate reads ``_no_split_modules`` (the layer classes) from the top module only, and keeps the first
    model's answer for every later one; proxim's wrappers (the scorer, the critic) are plain modules."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    original = plugin.__dict__.setdefault("_proxim_wrap", (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap))
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = original
    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy or getattr(model, "_no_split_modules", None):
        return
    names = sorted({n for m in model.modules() if m is not model for n in (getattr(m, "_no_split_modules", None) or [])})
    model._no_split_modules = names  # type: ignore[assignment]


# -- running a submodule of a sharded model --------------------------------------------------------


def root_of(module: nn.Module) -> nn.Module | None:
    """The sharded model (FSDP root) that `module` belongs to, or None when it is not sharded."""
    return _ROOTS.get(module)


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """The parameters of `module`'s FSDP root gathered while the block runs (a collective on entry; nothing when unsharded).

    For a forward that does not go through the root (``generate`` on the causal LM inside the scorer): the
    root's own parameters are gathered here; its layer units still gather theirs in their own forward."""
    root = root_of(module)
    if root is None:
        yield
        return
    state = root._get_fsdp_state()  # type: ignore[operator]
    state._lazy_init()  # as the root's first forward would: this submodule must not become a root of its own
    root.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        root.reshard()  # type: ignore[operator]


def clip_grad_norm(parameters: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded `parameters` (DTensor gradients, possibly on several meshes:
    one per sharded model) to `max_norm`; returns the norm before clipping (a plain tensor, the same on every process).

    accelerate's ``clip_grad_norm_`` first compares the parameters with each prepared model's, elementwise
    when they are not the same objects, which fails on DTensors (the frozen reference is a prepared model too)."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = [get_total_norm([p.grad for p in params if p.grad is not None]) for params in by_mesh.values()]
    full = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack(full), 2) if full else torch.zeros(())
    if max_norm != float("inf"):
        for params in by_mesh.values():
            clip_grads_with_norm_(params, max_norm, total)
    return total


def check_same_count(count: int, device: torch.device, what: str) -> None:
    """Raise `TrainingError` unless every process is about to make `count` collective calls (one all-reduce).

    A process making one forward pass of a sharded model fewer than the others would wait for ever."""
    import torch.distributed as dist

    from proxim.errors import TrainingError

    both = torch.tensor([count, -count], device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    most, least = int(both[0]), -int(both[1])
    if most != least:
        raise TrainingError(
            f"the processes make different numbers of {what} (from {least} to {most}; this one {count}); with sharded models "
            "every process must run the same forward passes: give every process as many prompts."
        )


# -- full tensors for checkpoints ------------------------------------------------------------------


def _reshard(module: nn.Module) -> None:
    """Put `module`'s root back into its sharded state, so that its state dict holds the shards (after a gather)."""
    from torch.distributed.fsdp import FSDPModule

    root = root_of(module)
    if root is not None:
        for part in root.modules():
            if isinstance(part, FSDPModule):
                part.reshard()


def has_shards(module: nn.Module) -> bool:
    """Whether `module` holds sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensors(value: Any, keep: bool) -> Any:
    """`value` (a state dict, or any nesting of dicts, lists and tuples) with every DTensor gathered to a full
    tensor on the CPU: a collective, in the same order on every process. keep: False drops the gathered
    tensors (None in their place), for the processes that do not write them."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, Any] = {}  # a tensor met twice (tied weights) is gathered once and stays one tensor

    def walk(v: Any) -> Any:
        if isinstance(v, DTensor):
            if id(v) not in seen:
                full = v.full_tensor()  # (a view into the all-gather's padded buffer: copied out, to own its storage)
                seen[id(v)] = full.to("cpu", copy=True) if keep else None
            return seen[id(v)]
        if torch.is_tensor(v):
            return v.detach()
        if isinstance(v, Mapping):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    with torch.no_grad():
        return walk(value)


def module_state(module: nn.Module, keys: Sequence[str] | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
    """The full weights of a sharded `module` (collective; `full_tensors`), or only those named in `keys`."""
    _reshard(module)
    state = module.state_dict(keep_vars=True)
    if keys is not None:
        state = {k: state[k] for k in keys}
    gathered: dict[str, torch.Tensor] = full_tensors(dict(state), keep)  # keep_vars: a tied weight is one object, gathered once
    return gathered


def _shard_like(full: torch.Tensor, target: Any) -> Any:
    """`full` cut like `target`: this process's shard of it when `target` is a DTensor (no communication), else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return full
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"a saved tensor of shape {tuple(full.shape)} does not fit a weight of shape {tuple(target.shape)}")
    local = full.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=None)


def load_full(module: nn.Module, state: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Load full tensors (a checkpoint's) into a sharded `module`: each process keeps its own shard of each.

    Weights absent from `state` must be tied to one it holds (saved once), unless `partial` (an adapter's
    weights only); a weight that `module` does not have is an error naming it."""
    _reshard(module)
    current = module.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in current]
    if unexpected:
        raise RuntimeError(f"weights {unexpected[:5]} do not belong to this model")
    loaded = {id(current[k]) for k in state}
    missing = [k for k in current if k not in state and id(current[k]) not in loaded]
    if missing and not partial:
        raise RuntimeError(f"no weights for {missing[:5]}")
    module.load_state_dict({k: _shard_like(v, current[k]) for k, v in state.items()}, strict=False)


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A full optimiser state dict (torch's layout: parameters by position) with each state tensor cut like its
    parameter, to load into `optimizer` when its parameters are shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        index: {k: _shard_like(v, params[int(index)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in values.items()}
        for index, values in state["state"].items()
    }
    return {**state, "state": per_param}
