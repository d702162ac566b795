"""PPO on gymnasium's CartPole with proxim's parts: the objectives are not tied to tokens.

Run: ``pip install gymnasium`` then ``python examples/cartpole.py`` (about 1-3 minutes on 2 CPU cores).
It prints the mean return of recent episodes and stops once that reaches CartPole-v1's solved level
(475 over the last 20 episodes) or the step budget runs out; exit status 0 means solved.

The mapping to proxim's data contract: one row per piece of an episode (4 environments step 128
times per update, as in cleanrl; each environment's stream is cut into rows where episodes end), one
"token" per time step.
  old_logprobs [B, T]  log pi_old(a_t | s_t) of the actions taken
  mask         [B, T]  True on the row's steps (rows are padded to the longest)
  rewards      [B, T]  per-step rewards (+1 per step; a row that ends without a terminal state also
                       carries gamma * V(next state) on its last step, the bootstrap that GAE's
                       "V after the last step = 0" leaves out)
  values       [B, T]  V(s_t) when sampled
``proxim.objective("ppo", ...)`` then supplies GAE (the advantage), the critic baseline, the clipped
surrogate, the clipped value loss and the entropy bonus; this file supplies the environment and networks.
"""

from __future__ import annotations

import argparse
from collections import deque

import gymnasium as gym
import torch
from torch import nn

import proxim

GAMMA, LAM = 0.99, 0.95


def mlp(out: int, scale: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, 2**0.5)
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(net[-1].weight, scale)
    return net


def collect(envs: gym.vector.VectorEnv, obs: torch.Tensor, actor: nn.Module, critic: nn.Module, steps: int, finished: deque):
    """Step every env `steps` times; cut each env's stream into rows at episode ends (and at the end).

    A row that stops without a terminal state (time-limit truncation, or the end of this rollout) gets
    gamma * V(next state) added to its last reward, the bootstrap that GAE's "V after the row = 0" omits.
    """
    n = envs.num_envs
    states, actions, logprobs, rewards, ends, next_values = [], [], [], [], [], []
    lengths = torch.zeros(n)
    for _ in range(steps):
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=actor(obs))
            action = dist.sample()
        next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
        # With autoreset "same step", a finished env's next_obs is already the next episode's first state;
        # the final state of the finished episode is in info["final_obs"].
        bootstrap_from = next_obs.clone()
        for i in range(n):
            if truncated[i] and not terminated[i]:
                bootstrap_from[i] = torch.as_tensor(info["final_obs"][i], dtype=torch.float32)
        with torch.no_grad():
            next_value = critic(bootstrap_from).squeeze(-1)
        states.append(obs)
        actions.append(action)
        logprobs.append(dist.log_prob(action))
        rewards.append(torch.as_tensor(reward, dtype=torch.float32))
        ends.append(torch.as_tensor(terminated | truncated))
        next_values.append(torch.where(torch.as_tensor(terminated), 0.0, next_value))
        lengths += 1
        for i in torch.nonzero(ends[-1]).flatten().tolist():
            finished.append(int(lengths[i]))
            lengths[i] = 0
        obs = next_obs
    ends[-1] = torch.ones(n, dtype=torch.bool)  # every stream is cut where this rollout stops
    rows = []
    for i in range(n):
        start = 0
        for t in range(steps):
            if ends[t][i]:
                rows.append((i, start, t + 1))
                start = t + 1
    longest = max(stop - start for _, start, stop in rows)

    def gather(seq: list, dtype=None) -> torch.Tensor:
        stacked = torch.stack(seq, dim=1)  # [envs, steps, ...]
        out = torch.zeros((len(rows), longest, *stacked.shape[2:]), dtype=dtype or stacked.dtype)
        for r, (i, start, stop) in enumerate(rows):
            out[r, : stop - start] = stacked[i, start:stop]
        return out

    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for r, (_, start, stop) in enumerate(rows):
        mask[r, : stop - start] = True
    row_rewards = gather(rewards)
    last = torch.tensor([stop - start - 1 for _, start, stop in rows])
    boot = torch.stack([next_values[stop - 1][i] for i, _, stop in rows])
    row_rewards[torch.arange(len(rows)), last] += GAMMA * boot
    row_states = gather(states)
    with torch.no_grad():
        values = critic(row_states).squeeze(-1)
    batch = proxim.Rollout(old_logprobs=gather(logprobs), mask=mask, rewards=row_rewards, values=values)
    return batch, row_states, gather(actions), obs


def main(max_steps: int = 300_000, seed: int = 1, quiet: bool = False) -> float:
    torch.manual_seed(seed)
    envs = gym.make_vec(
        "CartPole-v1", num_envs=4, vectorization_mode="sync", vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
    )
    obs = torch.as_tensor(envs.reset(seed=seed)[0], dtype=torch.float32)
    actor, critic = mlp(2, 0.01), mlp(1, 1.0)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=2.5e-4, eps=1e-5)
    iterations = max_steps // (4 * 128)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / iterations)
    objective = proxim.objective(
        "ppo", kl_coef=0.0, gamma=GAMMA, lam=LAM, entropy_coef=0.01, value_coef=0.5, value_clip=0.2, eps_low=0.2
    )
    finished: deque = deque(maxlen=20)
    recent = 0.0
    for iteration in range(iterations):
        batch, states, actions, obs = collect(envs, obs, actor, critic, 128, finished)
        estimate = objective.advantages(batch)
        for _ in range(4):  # epochs
            for index in torch.randperm(batch.batch_size).chunk(4):  # minibatches of rows
                dist = torch.distributions.Categorical(logits=actor(states[index]))
                out = objective.loss(
                    dist.log_prob(actions[index]),
                    batch[index],
                    estimate[index],
                    values=critic(states[index]).squeeze(-1),
                    entropy=dist.entropy(),
                )
                optimizer.zero_grad()
                out.loss.backward()
                for net in (actor, critic):  # clipped apart, so the critic's larger gradient cannot shrink the actor's
                    nn.utils.clip_grad_norm_(net.parameters(), 0.5)
                optimizer.step()
        schedule.step()
        recent = sum(finished) / max(len(finished), 1)
        if not quiet and iteration % 10 == 0:
            m = out.metrics
            print(f"steps {(iteration + 1) * 512:>7}  return {recent:6.1f}  value loss {m['loss/value'].item():7.3f}  approx kl {m['region/approx_kl'].item():.4f}", flush=True)
        if len(finished) == finished.maxlen and recent >= 475:
            break
    return recent


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    final = main(args.max_steps, args.seed)
    print(f"final mean return over the last 20 episodes: {final:.1f} ({'solved' if final >= 475 else 'not solved'})")
    raise SystemExit(0 if final >= 475 else 1)
