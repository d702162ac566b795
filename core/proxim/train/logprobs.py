"""Log-probs of sampled tokens without materialising the whole ``[B, T, V]`` log-softmax.

The vocabulary dominates memory: a full log-softmax over ``B*T`` positions costs ``B*T*V`` floats (and
as much again for its gradient). Here the output head is applied to chunks of at most ``chunk_size``
positions; each chunk's logits live only while its log-softmax at the sampled token is taken, and the
backward pass recomputes the chunk's logits instead of keeping them. Peak extra memory: about
``2 * chunk_size * V`` floats (a chunk's logits and their softmax or gradient).

Two paths. A plain ``nn.Linear`` head (every Llama/Qwen/Mistral/GPT-2 output embedding) and given logits
go through `_ChunkedLinearLogprobs`, one autograd function whose backward writes each chunk's logit
gradient ``(onehot(target) - softmax(z)) * g / temperature`` in place and multiplies it straight into the
hidden-state and weight gradients: one recomputed matmul per chunk and no autograd graph per chunk. Any
other head callable is wrapped in `torch.utils.checkpoint` per chunk (the generic path). The chunks are
further cut by bytes (`chunk_rows`): a chunk's logits, in the float32 (or wider) they are reduced in, take
at most `CHUNK_BYTES` of the device: 32 MiB on CPU, where the elementwise passes over a chunk run several
times faster while it stays in cache (benchmarks/logprobs.py), and 1 GiB on a GPU, where the cap bounds
memory (a 152k vocabulary at the default 4096 positions would be 2.3 GiB of float32 logits, as much again
for their softmax or gradient). Never below 256 positions, and never above ``chunk_size``.

Positions: a scored sequence is ``prompt (left-padded to P) + response (T)``. The hidden state at
position ``P - 1 + t`` predicts response token ``t``, so the last input token is never fed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from proxim.train.generation import Generation


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
    positions' logits exist at once, in the forward and in the backward.
    """
    B, T = targets.shape
    flat_h = hidden.reshape(B * T, hidden.shape[-1])
    flat_t = targets.reshape(B * T)
    chunk_size = max(1, chunk_size)
    if B * T == 0:
        lp = flat_h.new_zeros(B, T, dtype=torch.promote_types(flat_h.dtype, torch.float32))
        return lp, torch.zeros_like(lp) if entropy else None
    weight, bias = _linear_parts(head)
    if weight is not None or head is _identity:
        vocab = weight.shape[0] if weight is not None else flat_h.shape[-1]
        dtype = flat_h.dtype if weight is None else torch.promote_types(flat_h.dtype, weight.dtype)  # (autocast's is never wider)
        rows = chunk_rows(chunk_size, vocab, dtype, flat_h.device.type)
        lp, ent = _ChunkedLinearLogprobs.apply(flat_h, weight, bias, flat_t, float(temperature), rows, entropy)  # type: ignore[no-untyped-call]
        return lp.reshape(B, T), ent.reshape(B, T) if entropy else None
    use_checkpoint = torch.is_grad_enabled() and flat_h.requires_grad

    def chunk(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return _chunk_stats(head(h), t, temperature, entropy)

    lps, ents = [], []
    for start in range(0, B * T, chunk_size):
        h, t = flat_h[start : start + chunk_size], flat_t[start : start + chunk_size]
        lp, ent = checkpoint(chunk, h, t, use_reentrant=False) if use_checkpoint else chunk(h, t)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps).reshape(B, T)
    return lp, torch.cat(ents).reshape(B, T) if entropy else None


CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 2**30}
"""Bytes of one chunk's logits (in the width they are reduced in) per device type; see the module docstring.
A device type not named here gets the GPU's budget."""
MIN_CHUNK_ROWS = 256


def chunk_rows(chunk_size: int, vocab: int, dtype: torch.dtype, device_type: str) -> int:
    """Positions per chunk: `chunk_size`, cut so that a chunk's logits take at most the device's `CHUNK_BYTES`.

    The logits are reduced in `dtype` promoted to at least float32 (4 bytes per entry for float32, bfloat16
    and float16 logits alike, 8 for float64), so a chunk of r positions takes ``r * vocab * width`` bytes.
    Never below `MIN_CHUNK_ROWS` positions (fewer would waste the matmul), and never above `chunk_size`."""
    width = torch.promote_types(dtype, torch.float32).itemsize
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"])
    return max(1, min(chunk_size, max(MIN_CHUNK_ROWS, budget // (width * max(vocab, 1)))))


def _linear_parts(head: Any) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) of a plain ``nn.Linear`` head with no hooks; (None, None) for anything else."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None, None
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None, None
    return head.weight, head.bias


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """``log_softmax(F.linear(h, weight, bias) / tau)[target]`` (and entropy), ``rows`` positions at a time.

    h: [N, H] (or [N, V] logits when `weight` is None); targets: [N]. Returns (logprobs [N], entropy [N] or
    an empty tensor). Saves only its inputs; the backward recomputes each chunk's logits z (the same
    autocast dtype as the forward's) and, with p = softmax(z / tau) and upstream gradients g (logprobs)
    and e (entropy), uses  dlogprob/dz = (onehot(target) - p) / tau  and
    dentropy/dz = -p * (z / tau - sum(p * z / tau)) / tau.
    """

    @staticmethod
    def forward(
        ctx: Any, h: Tensor, weight: Tensor | None, bias: Tensor | None, targets: Tensor, temperature: float, rows: int, want_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        N = h.shape[0]
        lp: Tensor | None = None
        ent: Tensor | None = None
        logits_dtype = None
        for start in range(0, N, rows):
            z, fresh = _chunk_logits(h[start : start + rows], weight, bias, None)
            logits_dtype = logits_dtype or z.dtype
            z = _scaled_float(z, fresh, temperature)
            if lp is None:
                lp = z.new_empty(N)
                ent = z.new_empty(N if want_entropy else 0)
            t = targets[start : start + rows].unsqueeze(-1)
            ls = torch.log_softmax(z, dim=-1)
            del z
            lp[start : start + rows] = ls.gather(-1, t).squeeze(-1)
            if want_entropy:
                assert ent is not None
                ent[start : start + rows] = -(ls.exp() * ls).sum(-1)
            del ls
        assert lp is not None and ent is not None
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.temperature, ctx.rows, ctx.logits_dtype = temperature, rows, logits_dtype
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_lp: Tensor | None, grad_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        h, weight, bias, targets = ctx.saved_tensors
        tau, rows, cd = ctx.temperature, ctx.rows, ctx.logits_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        N = h.shape[0]
        if grad_ent is not None and grad_ent.numel() == 0:
            grad_ent = None
        grad_h = torch.empty_like(h) if need_h else None
        w = weight.to(cd) if weight is not None else None
        b = bias.to(cd) if bias is not None else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device) if need_b else None
        for start in range(0, N, rows):
            stop = min(start + rows, N)
            hc = h[start:stop]
            z, fresh = _chunk_logits(hc, w, b, cd)
            z = _scaled_float(z, fresh, tau)
            g = grad_lp[start:stop].to(z.dtype) / tau if grad_lp is not None else None
            p = torch.softmax(z, dim=-1)
            if grad_ent is not None:  # dz = p * (-g - e * (z - mu)) / tau + onehot * g / tau
                e = grad_ent[start:stop].to(z.dtype).unsqueeze(-1) / tau
                mu = (p * z).sum(-1, keepdim=True)
                if not fresh:
                    z = z.clone()
                gz = z.sub_(mu).mul_(e.neg())
                if g is not None:
                    gz.sub_(g.unsqueeze(-1))
                gz.mul_(p)
                del p
            else:
                gz = p.mul_(g.neg().unsqueeze(-1)) if g is not None else torch.zeros_like(p)
            del z
            if g is not None:
                gz.scatter_add_(-1, targets[start:stop].unsqueeze(-1), g.unsqueeze(-1))
            if weight is None:  # h were the logits
                if grad_h is not None:
                    grad_h[start:stop] = gz
                continue
            assert w is not None
            gzc = gz.to(cd)
            if grad_h is not None:
                torch.mm(gzc, w, out=grad_h[start:stop]) if grad_h.dtype == cd else grad_h[start:stop].copy_(gzc @ w)
            if grad_w is not None:
                if grad_w.dtype == cd:
                    grad_w.addmm_(gzc.T, hc.to(cd))
                else:
                    grad_w += (gzc.T @ hc.to(cd)).to(grad_w.dtype)
            if grad_b is not None:
                grad_b += gz.sum(0).to(grad_b.dtype)
            del gz
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunk_logits(h: Tensor, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype | None) -> tuple[Tensor, bool]:
    """[c, V] logits of a chunk, and whether the tensor is new (safe to modify in place). `dtype`: cast
    the inputs first (the backward reproducing the forward's autocast dtype); None: as the forward runs."""
    if weight is None:
        return h, False
    if dtype is not None:
        h = h.to(dtype)
    return torch.nn.functional.linear(h, weight, bias), True


def _scaled_float(z: Tensor, fresh: bool, temperature: float) -> Tensor:
    """z / temperature in at least float32, in place when `z` is a fresh float32 tensor."""
    wide = torch.promote_types(z.dtype, torch.float32)
    if z.dtype != wide:
        z, fresh = z.to(wide), True
    if temperature != 1.0:
        z = z.div_(temperature) if fresh else z / temperature
    return z


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
    except Exception:
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
            lp, ent = gather_logprobs(hidden[:, -T:], self.lm.get_output_embeddings(), targets, temperature, self.chunk_size, entropy)
        else:
            try:
                logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T).logits
            except TypeError:  # a model without logits_to_keep
                logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            lp, ent = logprobs_from_logits(logits[:, -T:], targets, temperature, self.chunk_size, entropy)
        # fresh tensors, not views: under FSDP2 this is the sharded root's output, whose views it warns about
        # (an in-place op on one would skip the root's pre-backward hook)
        return lp.clone(), None if ent is None else ent.clone()


def scored_rows(generation: Generation, idx: Tensor) -> tuple[Tensor, Tensor, int]:
    """Rows `idx` of a generation as model input: prompt + response cut after the last response token any
    row has (ids, attention mask as int64), and that response width."""
    valid = generation.response_mask[idx]
    width = int(valid.any(0).nonzero().max()) + 1 if bool(valid.any()) else 1
    ids = torch.cat([generation.prompt_ids[idx], generation.response_ids[idx, :width]], 1)
    mask = torch.cat([generation.prompt_mask[idx], valid[:, :width]], 1).long()
    return ids, mask, width


def response_logprobs(scorer: nn.Module, generation: Generation, idx: Tensor, temperature: float, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [b, T] (and entropy) in float32 of the sampled responses of rows `idx` under `scorer` (a
    `PolicyScorer`, or its DDP wrapper), forwarding only up to their last response token; 0 past it."""
    T = generation.response_ids.shape[1]
    ids, mask, width = scored_rows(generation, idx)
    lp, ent = scorer(ids, mask, generation.response_ids[idx, :width], temperature, entropy)
    pad = (0, T - width)
    return F.pad(lp.float(), pad), None if ent is None else F.pad(ent.float(), pad)
