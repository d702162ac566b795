"""Golden test: the losses of the first three GRPO steps on the tiny model, fixed seed.

The expected losses are not read off the trainer: `naive_grpo_losses` re-derives them with a plain
implementation written for this test (full log-softmax, the GRPO formula of arXiv 2402.03300 written out
per sequence, torch's own AdamW and clip_grad_norm_), reusing from proxim only the model and tokenizer
builders, the task's prompt draw and the per-step seed. The pinned numbers below were produced by that
reference implementation on torch 2.13 CPU; they guard against silent drift of the whole pipeline.
"""

from __future__ import annotations

import json
import random

import torch

from proxim.train import train
from proxim.train.loop import step_seed
from proxim.train.models import build_tiny_model, byte_tokenizer, tiny_config
from proxim_plugins import tasks

SEED, PROMPTS, G, LR, BETA, EPS_CLIP, MAX_NEW, EPOCHS = 0, 4, 4, 3e-3, 0.04, 0.2, 5, 2
#: naive_grpo_losses(3) on torch 2.13 CPU (the mean of each step's two updates).
GOLDEN = (-0.054200426951614866, -0.03550325335874249, -0.027700695933653145)


def lowercase_share(prompts: list[str], completions: list[str], **batch: object) -> list[float]:
    """A dense reward, so that a random tiny model gets different rewards within a group: the share of a-z characters."""
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def naive_grpo_losses(steps: int) -> list[float]:
    tok = byte_tokenizer()
    policy = build_tiny_model(tiny_config(32, 1, 2), SEED)
    reference = build_tiny_model(tiny_config(32, 1, 2), SEED).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    task = tasks.Arithmetic()
    losses = []
    for step in range(steps):
        torch.manual_seed(step_seed(SEED, step, 0))
        examples = task.train_examples(random.Random(f"proxim-train-arithmetic-{SEED}-{step}-0"), PROMPTS)
        prompts = [e.prompt for e in examples for _ in range(G)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        from transformers import GenerationConfig

        gen_config = GenerationConfig(do_sample=True, max_new_tokens=MAX_NEW, pad_token_id=256, eos_token_id=[258], temperature=1.0, top_p=1.0, top_k=0)
        policy.eval()
        with torch.no_grad():
            out = policy.generate(**enc, generation_config=gen_config)
        policy.train()
        P = enc["input_ids"].shape[1]
        response = out[:, P:]
        # each response counts up to and including its first <eos>
        lengths = []
        for row in response.tolist():
            lengths.append(row.index(258) + 1 if 258 in row else len(row))
        completions = [tok.decode(row[:n], skip_special_tokens=True) for row, n in zip(response.tolist(), lengths)]
        rewards = torch.tensor(lowercase_share(prompts, completions), dtype=torch.float64)
        advantages = torch.zeros(len(prompts), dtype=torch.float64)
        for g in range(PROMPTS):
            r = rewards[g * G : (g + 1) * G]
            advantages[g * G : (g + 1) * G] = (r - r.mean()) / (r.std() + 1e-6)  # Bessel-corrected std, eps 1e-6

        ids = torch.cat([enc["input_ids"], response], 1)
        mask = torch.cat([enc["attention_mask"], torch.tensor([[1] * n + [0] * (response.shape[1] - n) for n in lengths])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        def token_logprobs(model: torch.nn.Module, ids=ids, mask=mask, positions=positions, P=P, response=response) -> torch.Tensor:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
            logp = torch.log_softmax(logits, -1)[:, P - 1 : P - 1 + response.shape[1]]
            return logp.gather(-1, response.unsqueeze(-1)).squeeze(-1)

        with torch.no_grad():
            old = token_logprobs(policy)  # the sampling policy's log-probs, fixed for the whole step
            ref = token_logprobs(reference)
        epoch_losses = []
        for _ in range(EPOCHS):  # one full-batch update per epoch; the second one sees ratios != 1
            lp = token_logprobs(policy)
            total = 0.0
            for i, n in enumerate(lengths):  # (1/B) sum_i (1/|o_i|) sum_t [-min(r A, clip(r) A) + beta * k3]
                ratio = torch.exp(lp[i, :n] - old[i, :n])
                surrogate = torch.minimum(ratio * advantages[i], ratio.clamp(1 - EPS_CLIP, 1 + EPS_CLIP) * advantages[i])
                d = ref[i, :n] - lp[i, :n]
                k3 = torch.exp(d) - d - 1
                total = total + (-surrogate + BETA * k3).mean()
            loss = total / len(lengths)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            epoch_losses.append(float(loss.detach()))
        losses.append(sum(epoch_losses) / EPOCHS)  # the trainer logs the mean over the step's updates
    return losses


def test_first_three_grpo_losses(tiny_config) -> None:
    config = tiny_config(preset="grpo", steps=3, lr=LR, prompts_per_step=PROMPTS, group_size=G, seed=SEED, epochs=EPOCHS)
    result = train(config, rewards=[lowercase_share])
    logged = [json.loads(line)["loss/total"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    want = naive_grpo_losses(3)
    assert len(logged) == 3
    for got, expected in zip(logged, want):
        assert abs(got - expected) < 1e-6, (logged, want)
    # and the pipeline as a whole has not drifted (sampling, prompts, rewards, model initialisation)
    for expected, pinned in zip(want, GOLDEN):
        assert abs(expected - pinned) < 1e-5, (want, GOLDEN)
