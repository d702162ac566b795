"""Checkpoints: everything a run needs to continue exactly, written atomically.

Layout of ``RUN_DIR/checkpoints/step_000050/`` (the step count of completed steps)::

    model.safetensors, config.json   the policy (transformers ``save_pretrained``: loadable with from_pretrained)
    critic.safetensors               the critic (objectives with a critic)
    optimizer.pt, scheduler.pt       AdamW and learning-rate schedule state
    rng_rank0.pt, rng_rank1.pt, ...  each process's python / torch (/ numpy, CUDA) RNG states
    state.json                       step, KL coefficient, non-finite counters, timing
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
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"


def name(step: int) -> str:
    return f"step_{step:06d}"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_policy(lm: Any, directory: Path) -> None:
    lm.save_pretrained(str(directory), safe_serialization=True)


def load_policy_weights(lm: torch.nn.Module, directory: Path) -> None:
    """Load ``model.safetensors`` saved by `save_policy` into `lm` exactly (tied weights included)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    result = lm.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{directory}: weights {result.unexpected_keys[:5]} do not belong to this model.")
    loaded = {p.data_ptr() for k, p in lm.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if lm.state_dict()[k].data_ptr() not in loaded]
    if missing:
        raise RuntimeError(f"{directory}: no weights for {missing[:5]}.")


def save(
    run_dir: Path,
    step: int,
    *,
    accelerator: Any,
    lm: torch.nn.Module,
    critic: torch.nn.Module | None,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    config_toml: str,
    keep: int,
) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it). Returns its directory."""
    root = run_dir / "checkpoints"
    final = root / name(step)
    tmp = root / f".tmp-{name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_policy(lm, tmp)
        if critic is not None:
            from safetensors.torch import save_model

            save_model(critic, str(tmp / "critic.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / "config.toml").write_text(config_toml)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text(root / LATEST, final.name + "\n")
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


def load(
    directory: Path, *, accelerator: Any, lm: torch.nn.Module, critic: torch.nn.Module | None, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG from `directory`; returns state.json."""
    load_policy_weights(lm, directory)
    if critic is not None:
        from safetensors.torch import load_model

        load_model(critic, str(directory / "critic.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = directory / f"rng_rank{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return dict(json.loads((directory / "state.json").read_text()))
