"""What of a model trains: LoRA adapters through peft, and gradient checkpointing.

With ``--lora-rank R`` (0, the default, is off) a model trains low-rank adapters (Hu et al. 2021, arXiv
2106.09685) on ``--lora-targets`` (default every linear layer of the decoder, peft's ``"all-linear"``)
and keeps its own weights frozen. The reference policy is then the same model with its adapter disabled
(`WithoutAdapter`): no second copy of the weights in memory. Checkpoints hold the adapter only
(``adapter_model.safetensors`` and ``adapter_config.json``, peft's format), and so does the run's
``model/`` folder; ``--merge-lora`` also writes ``model-merged/``, a plain model folder with the adapter
folded into the weights, which ``--init`` and ``--model`` load like any other.

``--gradient-checkpointing`` recomputes each decoder layer's activations in the backward pass instead of
keeping them (transformers' non-reentrant checkpointing): less memory for more compute. It needs the
model in training mode, so the model's dropout is switched off (as RL trainers do, TRL's
``disable_dropout``): sampling and scoring must see the same network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from proxim.train.sections import Adapter


def is_adapted(model: Any) -> bool:
    """Whether `model` is a peft model (it trains adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def prepare(model: Any, settings: Adapter, seed: int, task_type: str = "CAUSAL_LM") -> Any:
    """`model` with gradient checkpointing and LoRA adapters as `settings` ask (unchanged when they ask for neither).

    The adapters' random initialisation is drawn from `seed` alone, so that the same settings give the same run.
    The adapted model keeps `model`'s mode: peft marks its wrapper as training while the wrapped modules stay
    in eval mode, and the first ``train(was_training)`` after sampling would then put every module in training
    mode (dropout, MoE routing noise), so that the policy would be scored in another mode than it was sampled in."""
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    if settings.lora_rank == 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the train extra
        raise ImportError("--lora-rank needs peft: pip install 'proxim[train]'") from exc
    targets: Any = list(settings.lora_targets) or "all-linear"
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; a float scales the same
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        exclude_modules=None if settings.lora_targets else _routers(model),
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config).train(model.training)


def _routers(model: nn.Module) -> list[str] | None:
    """The mixture-of-experts routers that subclass `nn.Linear` (Phi-3.5-MoE's, Llama 4's): they return the routing,
    not a tensor, so peft's "all-linear" would wrap them and break them; they keep no adapter. None when there are none."""
    found = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and type(module).__name__.endswith("Router")]
    return found or None


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, the model in training mode without dropout."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class WithoutAdapter(nn.Module):
    """A scorer of an adapted model run with its adapter disabled: the base model, the reference policy of a LoRA run."""

    def __init__(self, scorer: nn.Module, model: Any):
        super().__init__()
        self.scorer = scorer
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.model.disable_adapter():
            return self.scorer(*args, **kwargs)


def plain_state_dict(model: Any) -> dict[str, Tensor]:
    """The weights of `model` as a plain (unadapted) model has them: with a peft model, the adapter merged in
    (then taken out again) and the peft names undone; what an inference engine loads after an update."""
    if not is_adapted(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.merge_adapter()
        try:
            base = model.get_base_model()
            state = {k.replace(".base_layer", ""): v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}
        finally:
            model.unmerge_adapter()
    return state


ADAPTER_FILE = "adapter_model.safetensors"


def load_adapter(model: Any, directory: Any) -> None:
    """Load the adapter weights peft saved in `directory` into the peft `model`, exactly (an unknown weight is an error)."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result: Any = set_peft_model_state_dict(model, load_file(str(Path(directory) / ADAPTER_FILE)))
    if result.unexpected_keys:
        raise RuntimeError(f"{directory}: adapter weights {list(result.unexpected_keys)[:5]} do not belong to this model's adapter.")


def save_trained(model: Any, tokenizer: Any, run_dir: Any, merge: bool) -> None:
    """The run's ``model/`` folder (the adapter alone, for a LoRA run) and, with `merge`, ``model-merged/``:
    the adapter folded into the weights (this changes `model`: call it last)."""
    from pathlib import Path

    from proxim.train.models import save_model_dir

    save_model_dir(model, tokenizer, Path(run_dir) / "model")
    if merge and is_adapted(model):
        save_model_dir(model.merge_and_unload(), tokenizer, Path(run_dir) / "model-merged")
