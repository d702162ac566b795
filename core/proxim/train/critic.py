"""The critic of objectives that learn state values (PPO's GAE): a value head on its own decoder backbone.

Its own backbone rather than a second head on the policy's: the value loss then never moves the policy's
weights, and the critic can be another (smaller or larger) model (``--critic-model``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proxim.errors import ConfigurationError
from proxim.train.generation import Generation
from proxim.train.logprobs import position_ids, scored_rows


class ValueModel(nn.Module):
    """A critic: a value head (Linear(hidden, 1)) on its own decoder backbone.

    ``forward(input_ids [B, P+T], attention_mask [B, P+T], T) -> values [B, T]``, the value V(s_t) of the
    state before response token t (read at the same positions as the log-probs). The head starts at
    zero, so the first values are 0 and the backbone starts from the policy's own weights.
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, T: int) -> Tensor:
        ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        values: Tensor = self.head(hidden[:, -T:].float()).squeeze(-1)
        return values.clone()  # not a view: under FSDP2 this is a sharded root's output, whose views it warns about


def build_critic(lm: nn.Module, backbone_dir: str | None = None, trust_remote_code: bool = False, checkpointing: bool = False) -> ValueModel:
    """A critic whose backbone is the model in `backbone_dir` (``--critic-model``), or else a copy of `lm`'s decoder.

    The copy is the critic's own: a LoRA policy's copy carries its own adapter (the base weights frozen, as in
    the policy), trained by the value loss only; `checkpointing` turns on gradient checkpointing in it."""
    if backbone_dir is not None:
        from transformers import AutoModel

        backbone: nn.Module = AutoModel.from_pretrained(backbone_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    else:
        decoder = getattr(lm, "get_decoder", lambda: None)()
        if decoder is None or decoder is lm:
            raise ConfigurationError(f"{type(lm).__name__} exposes no decoder backbone (get_decoder()); give the critic its own model with --critic-model.")
        backbone = copy.deepcopy(decoder)
    if checkpointing and backbone_dir is not None:
        from proxim.train.adapters import enable_checkpointing

        enable_checkpointing(backbone)
    hidden = getattr(backbone.config, "hidden_size", None) if hasattr(backbone, "config") else None
    if hidden is None:
        raise ConfigurationError("the critic backbone's config has no hidden_size.")
    return ValueModel(backbone, int(hidden))


def response_values(critic: nn.Module, generation: Generation, idx: Tensor) -> Tensor:
    """Critic values [b, T] in float32 at the response positions of rows `idx` (0 past each response)."""
    T = generation.response_ids.shape[1]
    ids, mask, width = scored_rows(generation, idx)
    return F.pad(critic(ids, mask, width).float(), (0, T - width))
