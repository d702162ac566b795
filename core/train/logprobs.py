"""Log-probs of sampled tokens without materialising the whole ``[B, T, V]`` log-softmax.

The vocabulary dominates memory: a full log-softmax over ``B*T`` positions costs ``B*T*V`` floats (and
as much again for its gradient). Here the output head is applied to chunks of at most ``chunk_size``
positions; each chunk's logits live only while its log-sum-exp and the sampled token's logit are taken,
and under autograd each chunk is checkpointed, so the backward pass recomputes the chunk's logits
instead of keeping them. Peak extra memory: ``chunk_size * V`` floats.

Positions: a scored sequence is ``prompt (left-padded to P) + response (T)``. The hidden state at
position ``P - 1 + t`` predicts response token ``t``, so the last input token is never fed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, L] positions counting only attended tokens, as `generate` computes them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_stats(logits: Tensor, targets: Tensor, temperature: float, want_entropy: bool) -> tuple[Tensor, Tensor]:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # at least float32
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not want_entropy:
        return lp, torch.zeros_like(lp)
    p = torch.softmax(z, dim=-1)
    return lp, lse - (p * z).sum(-1)


def gather_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(head(hidden) / temperature)[target] per position, and optionally the entropy.

    hidden: [B, T, H] hidden states; head: maps [N, H] -> [N, V] logits; targets: [B, T] int64.
    Returns logprobs [B, T] and entropy [B, T] (or None), in float32 or the logits' dtype if wider. At most `chunk_size`
    positions' logits exist at once, in the forward and (through checkpointing) in the backward.
    """
    B, T = targets.shape
    flat_h = hidden.reshape(B * T, hidden.shape[-1])
    flat_t = targets.reshape(B * T)
    use_checkpoint = torch.is_grad_enabled() and flat_h.requires_grad

    def chunk(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return _chunk_stats(head(h), t, temperature, entropy)

    lps, ents = [], []
    for start in range(0, B * T, max(1, chunk_size)):
        h, t = flat_h[start : start + chunk_size], flat_t[start : start + chunk_size]
        lp, ent = checkpoint(chunk, h, t, use_reentrant=False) if use_checkpoint else chunk(h, t)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps).reshape(B, T) if lps else flat_h.new_zeros(B, T, dtype=torch.promote_types(flat_h.dtype, torch.float32))
    ent = (torch.cat(ents).reshape(B, T) if ents else torch.zeros_like(lp)) if entropy else None
    return lp, ent


def logprobs_from_logits(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 4096, entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Like `gather_logprobs` for logits a model already produced ([B, T, V]): the log-softmax is chunked."""
    return gather_logprobs(logits, _identity, targets, temperature, chunk_size, entropy)


def _identity(z: Tensor) -> Tensor:
    return z


def _split_reproduces_logits(lm: Any) -> bool:
    """True when ``output_head(decoder(x))`` equals ``lm(x).logits`` (no logit soft-capping or scaling)."""
    decoder = getattr(lm, "get_decoder", lambda: None)()
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is lm:
        return False
    vocab = int(getattr(lm.config, "vocab_size", 2))
    ids = torch.arange(6, device=next(lm.parameters()).device).remainder(max(vocab, 1)).reshape(1, 6)
    mask = torch.ones_like(ids)
    try:
        with torch.no_grad():
            full = lm(input_ids=ids, attention_mask=mask).logits
            split = head(decoder(input_ids=ids, attention_mask=mask).last_hidden_state)
    except Exception:  # noqa: BLE001 - any model that does not fit the split path uses full logits
        return False
    return full.shape == split.shape and torch.allclose(full.float(), split.float(), rtol=1e-4, atol=1e-5)


class PolicyScorer(nn.Module):
    """A causal LM wrapped so that one `forward` (the one DDP sees) returns response log-probs.

    ``forward(input_ids [B, P+T], attention_mask [B, P+T], targets [B, T]) -> (logprobs [B, T], entropy | None)``.
    When the model is a decoder plus an output head (Llama, Qwen, Mistral, GPT-2, ...), the head is
    applied in chunks to the decoder's hidden states (`gather_logprobs`); otherwise the model's own
    logits for the T response positions are taken and only the log-softmax is chunked.
    """

    def __init__(self, lm: Any, chunk_size: int = 4096):
        super().__init__()
        self.lm: Any = lm
        self.chunk_size = chunk_size
        self.split = _split_reproduces_logits(lm)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, temperature: float = 1.0, entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        T = targets.shape[1]
        ids, mask = input_ids[:, :-1], attention_mask[:, :-1]
        pos = position_ids(mask)
        if self.split:
            hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            return gather_logprobs(hidden[:, -T:], self.lm.get_output_embeddings(), targets, temperature, self.chunk_size, entropy)
        try:
            logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T).logits
        except TypeError:  # a model without logits_to_keep
            logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        return logprobs_from_logits(logits[:, -T:], targets, temperature, self.chunk_size, entropy)


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
        return values


def build_critic(lm: nn.Module, backbone: nn.Module | None = None) -> ValueModel:
    """A critic whose backbone is `backbone` (e.g. a loaded AutoModel) or a copy of `lm`'s decoder."""
    import copy

    if backbone is None:
        decoder = getattr(lm, "get_decoder", lambda: None)()
        if decoder is None or decoder is lm:
            raise ValueError(f"{type(lm).__name__} exposes no decoder backbone (get_decoder()); give the critic its own model path.")
        backbone = copy.deepcopy(decoder)
    hidden = getattr(backbone.config, "hidden_size", None) if hasattr(backbone, "config") else None
    if hidden is None:
        raise ValueError("the critic backbone's config has no hidden_size.")
    return ValueModel(backbone, int(hidden))
