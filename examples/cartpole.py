"""PPO on gymnasium's CartPole with proxim's parts: the objectives are not tied to tokens.

Run: ``pip install gymnasium`` then ``python examples/cartpole.py``. It prints the mean return of the
last 20 episodes and stops once that reaches CartPole-v1's solved level (475) or the step budget
(``--max-steps``, default 300k, over which the learning rate is annealed) runs out; exit status 0 means
solved. Seeds 1-10 solve in 68k-151k environment steps (seed 1: 151k, 2: 69k, 3: 115k), which on
one core of a busy 2-core machine takes 15-60 s.

The hyperparameters are cleanrl's ppo.py defaults: 4 environments x 128 steps per update, 4 epochs of
4 minibatches of 128 steps, Adam lr 2.5e-4 annealed to 0, gamma 0.99, lambda 0.95, clip 0.2 (ratio and
value), entropy 0.01, value 0.5, gradient norm 0.5 (here per network: the actor and critic are separate).

The mapping to proxim's data contract: one row per piece of an episode (each environment's stream of
128 steps is cut into rows where episodes end, and ends at the end of the rollout), one "token" per
time step.
  old_logprobs [B, T]  log pi_old(a_t | s_t) of the actions taken
  mask         [B, T]  True on the row's steps (rows are padded to the longest)
  rewards      [B, T]  per-step rewards (+1 per step; a row that ends without a terminal state also
                       carries gamma * V(next state) on its last step, the bootstrap that GAE's
                       "V after the last step = 0" leaves out; after a time-limit truncation the next
                       state is info["final_obs"], since with AutoresetMode.SAME_STEP the observation
                       returned is already the next episode's first)
  values       [B, T]  V(s_t) when sampled
``objective.advantages`` (stage 1: GAE along each row, advantage whitening, the critic's targets) needs
the rows. ``objective.loss`` (stage 2: clipped surrogate, clipped value loss, entropy bonus, a mean
over the minibatch's steps) treats steps independently, so after stage 1 the batch is reshaped to one
step per row ([512, 1]) and the steps are shuffled into minibatches, as cleanrl does. (Minibatches of
whole rows also learn, a little slower: once episodes outlast a rollout there are only 4-6 rows of up
to 128 correlated steps, which chunk(4) splits into 3-4 lopsided minibatches.)

The episode returns come from gymnasium's RecordEpisodeStatistics, which follows an episode across
rollouts. (Counting an episode's steps inside each rollout counts only its last piece, at most 128
steps, and reads a policy that balances for 500 steps as scoring 60-90.)
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import NamedTuple

import gymnasium as gym
import torch
from torch import nn

import proxim

GAMMA, LAM = 0.99, 0.95
NUM_ENVS, NUM_STEPS, EPOCHS, MINIBATCHES = 4, 128, 4, 4
SOLVED = 475.0  # CartPole-v1's reward threshold, over the last 20 episodes


def mlp(out: int, scale: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, 2**0.5)
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(net[-1].weight, scale)
    return net


def collect(envs: gym.vector.VectorEnv, obs: torch.Tensor, actor: nn.Module, critic: nn.Module, steps: int, returns: deque):
    """Step every env `steps` times; cut each env's stream into rows at episode ends (and at the end).

    A row that stops without a terminal state (time-limit truncation, or the end of this rollout) gets
    gamma * V(next state) added to its last reward, the bootstrap that GAE's "V after the row = 0" omits.
    The returns of the episodes that end are appended to `returns`.
    """
    n = envs.num_envs
    states, actions, logprobs, rewards, ends, next_values = [], [], [], [], [], []
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
        if "episode" in info:  # RecordEpisodeStatistics: whole-episode returns, on the step each episode ends
            returns.extend(info["episode"]["r"][info["_episode"]].tolist())
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

    def gather(seq: list) -> torch.Tensor:
        stacked = torch.stack(seq, dim=1)  # [envs, steps, ...]
        out = torch.zeros((len(rows), longest, *stacked.shape[2:]), dtype=stacked.dtype)
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


def one_step_per_row(batch: proxim.Rollout, estimate: proxim.Estimate, states: torch.Tensor, actions: torch.Tensor):
    """[rows, T] -> [steps, 1]: for stage 2, which treats steps independently, once stage 1 has run on rows."""
    mask = batch.mask

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t[mask].unsqueeze(1)

    steps = proxim.Rollout(old_logprobs=flat(batch.old_logprobs), mask=flat(mask), rewards=flat(batch.rewards), values=flat(batch.values))
    return steps, proxim.Estimate(advantages=flat(estimate.advantages), returns=flat(estimate.returns)), flat(states), flat(actions)


class Result(NamedTuple):
    mean_return: float  # over the last 20 episodes
    steps: int  # environment steps taken
    seconds: float

    @property
    def solved(self) -> bool:
        return self.mean_return >= SOLVED


def main(max_steps: int = 300_000, seed: int = 1, quiet: bool = False) -> Result:
    """Train until solved or `max_steps` environment steps; one torch thread, restored afterwards.

    The networks are tiny, so extra threads only add synchronisation, which on a busy machine (another
    process on the other core) made each step 50-80x slower here; one thread also makes a seed's run
    independent of the core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(max_steps, seed, quiet)
    finally:
        torch.set_num_threads(threads)


def train(max_steps: int, seed: int, quiet: bool) -> Result:
    start = time.perf_counter()
    torch.manual_seed(seed)
    envs = gym.make_vec("CartPole-v1", num_envs=NUM_ENVS, vectorization_mode="sync", vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    obs = torch.as_tensor(envs.reset(seed=seed)[0], dtype=torch.float32)
    actor, critic = mlp(2, 0.01), mlp(1, 1.0)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=2.5e-4, eps=1e-5)
    iterations = max_steps // (NUM_ENVS * NUM_STEPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / iterations)
    objective = proxim.objective("ppo", kl_coef=0.0, gamma=GAMMA, lam=LAM, entropy_coef=0.01, value_coef=0.5, value_clip=0.2, eps_low=0.2)
    returns: deque = deque(maxlen=20)
    recent, steps = 0.0, 0
    for iteration in range(iterations):
        batch, states, actions, obs = collect(envs, obs, actor, critic, NUM_STEPS, returns)
        steps += NUM_ENVS * NUM_STEPS
        estimate = objective.advantages(batch)  # stage 1, on rows: GAE runs along time
        batch, estimate, states, actions = one_step_per_row(batch, estimate, states, actions)
        for _ in range(EPOCHS):
            for index in torch.randperm(batch.batch_size).chunk(MINIBATCHES):
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
        recent = sum(returns) / max(len(returns), 1)
        if not quiet and iteration % 10 == 0:
            m = out.metrics
            print(f"steps {steps:>7}  return {recent:6.1f}  value loss {m['loss/value'].item():7.3f}  approx kl {m['region/approx_kl'].item():.4f}", flush=True)
        if len(returns) == returns.maxlen and recent >= SOLVED:
            break
    envs.close()
    return Result(recent, steps, time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = main(args.max_steps, args.seed)
    verdict = "solved" if result.solved else "not solved"
    print(f"mean return over the last 20 episodes: {result.mean_return:.1f} ({verdict}) after {result.steps} steps, {result.seconds:.0f} s")
    raise SystemExit(0 if result.solved else 1)
