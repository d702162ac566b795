"""Build several objectives and print their stage-1 advantages and stage-2 losses on one synthetic batch.

Run: ``python examples/objectives.py``. No model, no download: random log-probs stand in for a policy.
"""

import torch

import proxim

torch.manual_seed(0)
B, T = 8, 6  # 2 prompts x 4 responses, 6 response tokens
old = -torch.rand(B, T, dtype=torch.float64) - 0.05
mask = torch.arange(T).expand(B, T) < torch.randint(2, T + 1, (B, 1))  # ragged lengths
batch = proxim.Rollout(
    old_logprobs=old,
    mask=mask,
    rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
    group=torch.arange(B) // 4,
    ref_logprobs=old + 0.01 * torch.randn(B, T, dtype=torch.float64),
    values=torch.zeros(B, T, dtype=torch.float64),
)
# The policy after a little training: log-probs moved a bit away from the sampling policy.
logprobs = (old + 0.05 * torch.randn(B, T, dtype=torch.float64)).clamp(max=0.0)

objectives = {name: proxim.objective(name) for name in ("grpo", "dr_grpo", "dapo", "rloo", "gspo", "cispo", "dppo", "drpo", "lampo", "ppo")}
objectives["pairwise+quadratic"] = proxim.objective(baseline="group_mean", advantage="pairwise", region="quadratic", delta=0.1)

print(f"{'objective':<20} {'loss':>10} {'policy':>10} {'A[0]':>8} {'clip hi':>8} {'|grad|':>9}")
for name, obj in objectives.items():
    est = obj.advantages(batch)
    lp = logprobs.clone().requires_grad_(True)
    values = torch.zeros(B, T, dtype=torch.float64, requires_grad=True) if obj.has_critic else None
    out = obj.loss(lp, batch, est, values=values)
    out.loss.backward()
    m = out.metrics
    print(
        f"{name:<20} {out.loss.item():>10.5f} {m['loss/policy'].item():>10.5f} {est.advantages[0, 0].item():>8.4f} "
        f"{m['region/clip_fraction_high'].item() if 'region/clip_fraction_high' in m else 0.0:>8.3f} {lp.grad.norm().item():>9.5f}"
    )
