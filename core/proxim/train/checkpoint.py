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
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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

    models: the unwrapped trained modules by name; ``"model"`` is saved with ``save_pretrained``.
    """
    from safetensors.torch import save_model

    root = run_dir / "checkpoints"
    final, tmp = root / name(step), root / f".tmp-{name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        for key, module in models.items():
            if key == PRIMARY:
                module.save_pretrained(str(tmp), safe_serialization=True)  # type: ignore[operator]
            else:
                save_model(module, str(tmp / f"{key}.safetensors"))
        torch.save(optimization.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
        (tmp / "config.toml").write_text(config_toml)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / LATEST, final.name + "\n")
        kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in kept[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load(directory: Path, *, accelerator: Accelerator, models: Mapping[str, nn.Module], optimization: Optimization) -> dict[str, Any]:
    """Restore the modules, the optimisation state and this process's RNG from `directory`; returns state.json."""
    from safetensors.torch import load_model

    for key, module in models.items():
        if key == PRIMARY:
            load_weights(module, directory)
        else:
            load_model(module, str(directory / f"{key}.safetensors"))
    optimization.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    rng_file = directory / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return dict(json.loads((directory / "state.json").read_text()))
