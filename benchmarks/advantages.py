"""Benchmark 2: stage 1 (rewards -> per-token advantages), proxim vs verl vs a Python-loop reference.

Cells: group_normalized (GRPO), leave_one_out (RLOO) and pairwise (LamPO) on 4096 groups of 16 responses,
and GAE at T = 1024. Each implementation returns [B, T] advantages (T = --tokens for the outcome
estimators: their per-group work does not depend on T, the final broadcast does, for everyone alike).

  proxim       ``objective(...).advantages(rollout)``: the whole stage 1, checks and metrics included
  verl         verl 0.9's estimator (``compute_*_outcome_advantage``: a Python loop over responses)
  verl vec     verl's vectorized twin where it has one
  Python loop  a plain-Python reference (lists and loops, from tensors to tensors)

    python benchmarks/advantages.py                   # CPU, writes docs/benchmarks.md
    .venv-peers/bin/python benchmarks/advantages.py   # with the verl columns
    python benchmarks/advantages.py --device cuda --quick --no-write
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

import proxim
from proxim import ops

# -- Python-loop references ----------------------------------------------------------------------------


def _groups(group: list[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    return members


def _to_tokens(values: list[float], mask: torch.Tensor) -> torch.Tensor:
    return ops.broadcast_to_tokens(torch.tensor(values, dtype=torch.float32, device=mask.device), mask)


def loop_group_normalized(rewards: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r, out = rewards.tolist(), [0.0] * rewards.numel()
    for idx in _groups(group.tolist()).values():
        vals = [r[i] for i in idx]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 1.0
        for i in idx:
            out[i] = (r[i] - mean) / (std + eps) if std + eps > 0 else 0.0
    return _to_tokens(out, mask)


def loop_leave_one_out(rewards: torch.Tensor, group: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r, out = rewards.tolist(), [0.0] * rewards.numel()
    for idx in _groups(group.tolist()).values():
        total = sum(r[i] for i in idx)
        for i in idx:
            out[i] = r[i] - (total - r[i]) / (len(idx) - 1)
    return _to_tokens(out, mask)


def loop_pairwise(rewards: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, old: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """LamPO defaults: baseline none, length-normalised confidence, normalizer 'count', no scaling."""
    r = rewards.tolist()
    conf = (torch.where(mask, old, torch.zeros(())).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    out = [0.0] * rewards.numel()
    for idx in _groups(group.tolist()).values():
        for i in idx:
            total = 0.0
            for j in idx:
                if j == i:
                    continue
                gap = r[i] - r[j]
                sign = (gap > 0) - (gap < 0)
                total += gap / (1.0 + math.exp(sign * (conf[i] - conf[j]) / tau))  # sigmoid(-sign * dl / tau)
            out[i] = total / (len(idx) - 1) if len(idx) > 1 else 0.0
    return _to_tokens(out, mask)


def loop_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """GAE with verl's skipping of masked positions, then whitening over valid tokens (Bessel, eps 1e-8)."""
    rw, vs, ms = rewards.tolist(), values.tolist(), mask.tolist()
    adv = []
    for row_r, row_v, row_m in zip(rw, vs, ms, strict=True):
        out, next_value, running = [0.0] * len(row_r), 0.0, 0.0
        for t in range(len(row_r) - 1, -1, -1):
            if row_m[t]:
                running = row_r[t] + gamma * next_value - row_v[t] + gamma * lam * running
                next_value = row_v[t]
                out[t] = running
        adv.append(out)
    flat = [a for row_a, row_m in zip(adv, ms, strict=True) for a, m in zip(row_a, row_m, strict=True) if m]
    mean = sum(flat) / len(flat)
    inv = 1.0 / math.sqrt(sum((a - mean) ** 2 for a in flat) / (len(flat) - 1) + 1e-8)
    whitened = [[(a - mean) * inv if m else 0.0 for a, m in zip(row_a, row_m, strict=True)] for row_a, row_m in zip(adv, ms, strict=True)]
    return torch.tensor(whitened, dtype=torch.float32, device=mask.device)


# -- cells ---------------------------------------------------------------------------------------------


def outcome_data(groups: int, size: int, tokens: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    b = groups * size
    lengths = torch.randint(1, tokens + 1, (b,), generator=g)
    mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = (torch.rand(b, generator=g) < 0.4).float() + 0.1 * torch.randn(b, generator=g)
    old = torch.empty(b, tokens).uniform_(0.05, 0.95, generator=g).log()
    group = torch.arange(b) // size
    d = {"mask": mask, "rewards": rewards, "old": old, "group": group}
    d = {k: v.to(device) for k, v in d.items()}
    d["rollout"] = proxim.Rollout(old_logprobs=d["old"], mask=d["mask"], rewards=d["rewards"], group=d["group"])
    d["token_rewards"] = ops.sequence_to_token_rewards(d["rewards"], d["mask"])
    d["fmask"] = d["mask"].float()
    return d


def verl_index(group: torch.Tensor) -> Any:
    """verl's group ids: a numpy object array (numpy comes with verl)."""
    import numpy as np

    return np.array([str(i) for i in group.tolist()], dtype=object)


def gae_data(batch: int, tokens: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.where(mask, 0.05 * torch.randn(batch, tokens, generator=g), torch.zeros(()))
    rewards = rewards + ops.sequence_to_token_rewards(torch.randn(batch, generator=g), mask)
    values = torch.randn(batch, tokens, generator=g)
    old = torch.empty(batch, tokens).uniform_(0.05, 0.95, generator=g).log()
    d = {"mask": mask, "rewards": rewards, "values": values, "old": old}
    d = {k: v.to(device) for k, v in d.items()}
    d["rollout"] = proxim.Rollout(old_logprobs=d["old"], mask=d["mask"], rewards=d["rewards"], values=d["values"])
    d["fmask"] = d["mask"].float()
    return d


def check(name: str, results: dict[str, torch.Tensor], mask: torch.Tensor, atol: float) -> None:
    """Every implementation gives the same advantages on valid tokens (a benchmark of different math is void)."""
    ref = results["proxim"][mask]
    for impl, out in results.items():
        err = (out[mask].float() - ref.float()).abs().max().item()
        if err > atol:
            raise SystemExit(f"{name}: {impl} differs from proxim by {err:.3g} (> {atol}); refusing to time different math")


def outcome_cells(core_algos: Any, groups: int, size: int, tokens: int, device: torch.device, repeats: int) -> list[tuple[str, str, dict[str, float]]]:
    d = outcome_data(groups, size, tokens, device)
    rollout, mask = d["rollout"], d["mask"]
    cells = []
    specs: list[tuple[str, proxim.Objective, Callable[[], torch.Tensor], list[str]]] = [
        (
            "group_normalized",
            proxim.objective("grpo", kl_coef=0.0),
            lambda: loop_group_normalized(d["rewards"], d["group"], mask),
            ["compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"],
        ),
        (
            "leave_one_out",
            proxim.objective("rloo", kl_coef=0.0),
            lambda: loop_leave_one_out(d["rewards"], d["group"], mask),
            ["compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"],
        ),
        ("pairwise", proxim.objective("lampo"), lambda: loop_pairwise(d["rewards"], d["group"], mask, d["old"]), []),
    ]
    for name, obj, loop, verl_names in specs:
        fns: dict[str, Callable[[], torch.Tensor]] = {"proxim": (lambda obj=obj: obj.advantages(rollout).advantages), "Python loop": loop}
        if core_algos is not None:
            index = verl_index(d["group"])
            for label, fn_name in zip(("verl", "verl vec"), verl_names):
                fn = getattr(core_algos, fn_name)
                fns[label] = lambda fn=fn, index=index: fn(d["token_rewards"], d["fmask"], index)[0]
        check(name, {k: f() for k, f in fns.items()}, mask, atol=1e-4)
        cells.append((name, f"{groups} x {size} (T={tokens})", common.measure(fns, device, repeats, min_time=0.2)))
        print(name, {k: common.fmt_time(v) for k, v in cells[-1][2].items()}, flush=True)
    return cells


def gae_cell(core_algos: Any, batch: int, tokens: int, device: torch.device, repeats: int) -> tuple[str, str, dict[str, float]]:
    d = gae_data(batch, tokens, device)
    obj = proxim.objective("ppo", kl_coef=0.0, gamma=1.0, lam=0.95)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "proxim": lambda: obj.advantages(d["rollout"]).advantages,
        "Python loop": lambda: loop_gae(d["rewards"], d["values"], d["mask"], 1.0, 0.95),
    }
    if core_algos is not None:
        fns["verl"] = lambda: core_algos.compute_gae_advantage_return(d["rewards"], d["values"], d["fmask"], 1.0, 0.95)[0]
    check("gae", {k: f() for k, f in fns.items()}, d["mask"], atol=1e-3)
    times = common.measure(fns, device, repeats, min_time=0.2)
    print("gae", {k: common.fmt_time(v) for k, v in times.items()}, flush=True)
    return ("gae", f"{batch} x {tokens}", times)


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=4096)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16, help="T of the outcome cells' [B, T] output")
    p.add_argument("--gae-batch", type=int, default=256)
    p.add_argument("--gae-tokens", type=int, default=1024)
    args = p.parse_args()
    device = common.setup(args)
    repeats = args.repeats or (3 if args.quick else 5)
    groups = args.groups // 8 if args.quick else args.groups
    gae_batch = args.gae_batch // 4 if args.quick else args.gae_batch
    core_algos = common.load_verl()
    cells = outcome_cells(core_algos, groups, args.group_size, args.tokens, device, repeats)
    cells.append(gae_cell(core_algos, gae_batch, args.gae_tokens, device, repeats))
    header = ["estimator", "size", "proxim", "verl", "verl vec", "Python loop", "verl/proxim", "verl vec/proxim", "loop/proxim"]
    rows = []
    for name, size, t in cells:
        px = t["proxim"]
        rows.append(
            [
                name,
                size,
                common.fmt_time(px),
                common.fmt_time(t.get("verl")),
                common.fmt_time(t.get("verl vec")),
                common.fmt_time(t["Python loop"]),
                common.fmt_ratio(t["verl"] / px if "verl" in t else None),
                common.fmt_ratio(t["verl vec"] / px if "verl vec" in t else None),
                common.fmt_ratio(t["Python loop"] / px),
            ]
        )
    tab = common.table(header, rows)
    print()
    print(tab)
    if args.no_write or args.quick:
        return
    body = "\n".join(
        [
            f"Stage 1 on float32: {args.groups} groups of {args.group_size} responses (B = {args.groups * args.group_size}, "
            f"T = {args.tokens} for the [B, T] output) for the outcome estimators; GAE (gamma 1, lambda 0.95, whitened) "
            f"on B = {args.gae_batch}, T = {args.gae_tokens} with right padding. proxim's time is the whole "
            "`Objective.advantages` call (group-size check and stage-1 metrics included). Ratios > 1 mean proxim is "
            "faster. Every implementation's output is checked against proxim's before timing. verl has no pairwise "
            "estimator; 'verl vec' is its vectorized variant where it has one.",
            "",
            common.header_lines(device, args.threads, repeats),
            "",
            tab,
        ]
    )
    suffix = "" if device.type == "cpu" else f" ({device.type})"
    common.write_section(f"advantages-{device.type}", f"2. Advantages, stage 1{suffix}", body)


if __name__ == "__main__":
    main()
