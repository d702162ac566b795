"""Checkpoints: everything a run needs to continue exactly, written atomically; the same for every recipe.

Layout of ``RUN_DIR/checkpoints/step_000050/`` (the number of completed steps)::

    model.safetensors, config.json   the trained model (transformers ``save_pretrained``: loadable with from_pretrained)
    <name>.safetensors               every other trained module (the critic), by safetensors' ``save_model``
    optimizer.pt                     AdamW, the learning-rate schedule and its horizon, the non-finite counters
    rng_rank0.pt, rng_rank1.pt, ...  each process's python / torch (/ numpy, CUDA) RNG states
    state.json                       step, the recipe's own state (e.g. the KL coefficient), timing
    config.toml                      the run's configuration

A checkpoint is written into ``checkpoints/.tmp-step_000050`` and renamed into place when complete, then
``checkpoints/latest`` (a one-line text file naming it) is replaced atomically; a run killed while
saving leaves the previous checkpoint intact.

Sharded (FSDP2) runs write the same files: every process takes part in gathering the weights and the
optimiser's states to full tensors (`proxim.train.sharding`), and the main process writes them. A
checkpoint therefore resumes under any number of processes, sharded or not, and its model files load
with ``from_pretrained``; resuming cuts the full tensors back into each process's shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn

from proxim.errors import TrainingError
from proxim.train import adapters, sharding
from proxim.train.files import atomic_write
from proxim.train.models import load_weights

if TYPE_CHECKING:
    from accelerate import Accelerator

    from proxim.train.optimization import Optimization

LATEST = "latest"
#: The module saved with ``save_pretrained``, so that a checkpoint folder is also a model folder.
PRIMARY = "model"


def name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointError(TrainingError):
    """A checkpoint that could not be written or read; the message names the file and why."""


@contextlib.contextmanager
def _file(path: Path, doing: str) -> Iterator[None]:
    """Turn a failure to write or read `path` into a `CheckpointError` naming the file (torch's disk-full message included)."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc):
            reason = "not a file proxim wrote (torch.load refused to read it)"
        elif isinstance(exc, RuntimeError) and ("inline_container" in str(exc) or "write" in str(exc).lower()):
            reason = f"the write failed (is the disk full?): {reason}"
        raise CheckpointError(f"{doing} {path}: {reason}") from exc


def save(
    run_dir: Path,
    step: int,
    *,
    accelerator: Accelerator,
    models: Mapping[str, nn.Module],
    optimization: Optimization,
    state: dict[str, Any],
    config_toml: str,
    keep: int,
) -> Path:
    """Write the checkpoint of `step` completed steps (collective: every process calls it). Returns its folder.

    models: the unwrapped trained modules by name; ``"model"`` is saved with ``save_pretrained``. A write that
    fails (a full disk, no permission) raises `CheckpointError` naming the file; the previous checkpoint stays.
    """
    root = run_dir / "checkpoints"
    final, tmp = root / name(step), root / f".tmp-{name(step)}"
    try:
        if accelerator.is_main_process:
            with _file(tmp, "creating"):
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        accelerator.wait_for_everyone()
        with _file(tmp / f"rng_rank{accelerator.process_index}.pt", "writing"):
            torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
        gathered = {key: full_weights(module, keep=accelerator.is_main_process) for key, module in models.items()}  # collective when sharded
        optimizer_state = optimization.state_dict()  # (also collective when sharded)
        if accelerator.is_main_process:
            _write_files(tmp, step, models, gathered, optimizer_state, state, config_toml)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with _file(final, "moving into place"):
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic_write(root / LATEST, final.name + "\n")
            kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
            for old in kept[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except CheckpointError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        kept_note = f"the previous checkpoint ({previous.name}) is intact" if previous is not None else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write the checkpoint of step {step} into {root}: {exc}. {kept_note.capitalize()}; free space on that disk "
            "(or choose another --output-dir) and continue with --resume."
        ) from exc
    accelerator.wait_for_everyone()
    return final


def _write_files(
    tmp: Path,
    step: int,
    models: Mapping[str, nn.Module],
    gathered: Mapping[str, dict[str, torch.Tensor] | None],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    config_toml: str,
) -> None:
    from safetensors.torch import save_file, save_model

    for key, module in models.items():
        target = tmp / (_primary_file(module) if key == PRIMARY else f"{key}.safetensors")
        full = gathered.get(key)
        with _file(target, "writing"):
            if key == PRIMARY:
                extra = {} if full is None else {"state_dict": full}
                module.save_pretrained(str(tmp), safe_serialization=True, **extra)  # type: ignore[operator]
            elif full is None:
                save_model(module, str(target))
            else:
                save_file(_once(full), str(target), metadata={"format": "pt"})
    with _file(tmp / "optimizer.pt", "writing"):
        torch.save(optimizer_state, tmp / "optimizer.pt")
    with _file(tmp / "state.json", "writing"):
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
    with _file(tmp / "config.toml", "writing"):
        (tmp / "config.toml").write_text(config_toml)


def full_weights(module: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The full weights of a sharded `module` (every process calls it; only where `keep` are they kept), or None
    when it is not sharded (then it is saved from the module itself). An adapted model gives its adapter's only."""
    if not sharding.has_shards(module):
        return None
    keys = list(adapter_keys(module).values()) if adapters.is_adapted(module) else None
    return sharding.module_state(module, keys, keep)


def adapter_keys(model: Any) -> dict[str, str]:
    """A peft model's adapter weights: the name peft saves each under -> its name in the model's state dict.

    peft decides which weights an adapter saves and how it renames them; its answer is read off by identity."""
    from peft import get_peft_model_state_dict

    current = model.state_dict(keep_vars=True)
    by_id = {id(v): k for k, v in current.items()}
    return {saved: by_id[id(v)] for saved, v in get_peft_model_state_dict(model, state_dict=current).items()}


def _once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tensor under one name (safetensors stores a shared tensor once, as ``save_model`` does)."""
    from safetensors.torch import _remove_duplicate_names

    dropped = {name for names in _remove_duplicate_names(state).values() for name in names}
    return {k: v for k, v in state.items() if k not in dropped}


def _primary_file(module: nn.Module) -> str:
    """The weights file ``save_pretrained`` writes for the trained model: the adapter's, for a LoRA run."""
    return adapters.ADAPTER_FILE if adapters.is_adapted(module) else "model.safetensors"


def candidates(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first (the one ``checkpoints/latest`` names leads)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    return ([named] if named in found else []) + [p for p in found if p != named]


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint folder with a ``state.json``, or None (whether it can be read: `problem`)."""
    return next((p for p in candidates(run_dir) if (p / "state.json").is_file()), None)


def problem(directory: Path) -> str | None:
    """Why the checkpoint in `directory` cannot be resumed from, read cheaply (before any model is built); None if it looks complete."""
    state = directory / "state.json"
    try:
        parsed = json.loads(state.read_text())
    except (OSError, ValueError) as exc:
        return f"{state}: {exc}"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("step"), int):
        return f"{state}: no step count in it"
    if not any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", adapters.ADAPTER_FILE)):
        return f"{directory}: no model.safetensors (nor {adapters.ADAPTER_FILE})"
    if not (directory / "optimizer.pt").is_file():
        return f"{directory}: no optimizer.pt"
    return None


def usable(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The newest checkpoint that looks complete; each newer one that does not is named, with why, through `say`."""
    for directory in candidates(run_dir):
        why = problem(directory)
        if why is None:
            return directory
        say(f"skipping the checkpoint {directory.name}: {why}")
    return None


def load_latest(
    run_dir: Path, *, accelerator: Accelerator, models: Mapping[str, nn.Module], optimization: Optimization, say: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """Restore the newest checkpoint that loads, falling back to older ones with a message; returns (its folder, state.json)."""
    failures = []
    for directory in candidates(run_dir):
        why = problem(directory)  # (`usable` has named these already, when the run folder was opened)
        if why is None:
            try:
                return directory, load(directory, accelerator=accelerator, models=models, optimization=optimization)
            except CheckpointError as exc:
                why = str(exc)
                say(f"cannot resume from the checkpoint {directory.name} ({why}); trying the one before it")
        failures.append(f"  {directory.name}: {why}")
    raise CheckpointError(f"{run_dir}: no checkpoint could be loaded:\n" + ("\n".join(failures) or "  (none)"))


def load(directory: Path, *, accelerator: Accelerator, models: Mapping[str, nn.Module], optimization: Optimization) -> dict[str, Any]:
    """Restore the modules, the optimisation state and this process's RNG from `directory`; returns state.json.

    A file that cannot be read raises `CheckpointError` naming it."""
    from safetensors.torch import load_model

    for key, module in models.items():
        with _file(directory / (_primary_file(module) if key == PRIMARY else f"{key}.safetensors"), "reading"):
            if sharding.has_shards(module):
                _load_sharded(module, directory, key)
            elif key == PRIMARY and adapters.is_adapted(module):
                adapters.load_adapter(module, directory)
            elif key == PRIMARY:
                load_weights(module, directory)
            else:
                load_model(module, str(directory / f"{key}.safetensors"))
    with _file(directory / "optimizer.pt", "reading"):
        optimization.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    rng_file = directory / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        with _file(rng_file, "reading"):
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    with _file(directory / "state.json", "reading"):
        return dict(json.loads((directory / "state.json").read_text()))


def _load_sharded(module: nn.Module, directory: Path, key: str) -> None:
    """Load the full tensors of `key`'s files into the sharded `module`: each process keeps its shard."""
    from safetensors.torch import load_file

    if key != PRIMARY:
        sharding.load_full(module, load_file(str(directory / f"{key}.safetensors")))
    elif adapters.is_adapted(module):
        names = adapter_keys(module)
        saved = load_file(str(directory / adapters.ADAPTER_FILE))
        unknown = [k for k in saved if k not in names]
        if unknown:
            raise RuntimeError(f"{directory}: adapter weights {unknown[:5]} do not belong to this model's adapter.")
        sharding.load_full(module, {names[k]: v for k, v in saved.items()}, partial=True)
    else:
        sharding.load_full(module, _model_tensors(directory))


def _model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model files ``save_pretrained`` wrote into `directory` (one file, or shards with an index)."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(directory / shard)))
    return tensors
