"""Benchmark 1: stage 2 (loss forward + backward) of grpo, ppo (policy part), dppo, drpo and gspo.

For each objective and size (B, T), times in one process, round-robin:
  hand      a minimal hand-written torch expression of the same math (the yardstick; no metrics)
  proxim    ``obj.loss(logprobs, batch, estimate).loss`` then the gradient, eager, with its metrics (the
            default, what the trainer calls every minibatch)
  proxim -m the same with ``metrics=False`` (loss terms only: the same loss and gradient, no diagnostics)
  compiled  proxim under ``torch.compile(obj.loss, fullgraph=True)`` (compile time reported separately),
            with metrics and with ``metrics=False`` (compiled -m)
  verl      verl 0.9's functions as its actor composes them (policy loss [+ kl_penalty + agg_loss])
  TRL       TRL 1.16's ``GRPOTrainer._compute_loss`` (stub trainer; its metric code included, as in training)
Each proxim call gets a fresh minibatch object (``batch[:]``, views, no copy), as a trainer's ``batch[idx]``
does, so the constants a Rollout derives once (mask operands, counts, zero-padded log-probs) are paid on every
call here. And the memory traffic the loss cannot avoid (read logprobs, anchor, advantages, mask [, ref]; write the
gradient) per second, against a plain ``copy_`` of one [B, T] float32 tensor.

    python benchmarks/objective.py                   # CPU, writes docs/benchmarks.md
    .venv-peers/bin/python benchmarks/objective.py   # with the verl and TRL columns
    python benchmarks/objective.py --device cuda     # on a GPU machine
    python benchmarks/objective.py --quick --no-write

Goals (issue 5): proxim eager within 1.05x of hand; compiled at most 0.6x of hand (eager); proxim eager
faster than verl and TRL. Ratios are reported for both proxim columns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

import proxim

OBJECTIVES = ("grpo", "ppo", "dppo", "drpo", "gspo")
SIZES = ((64, 1024), (256, 1024), (64, 4096))
BETA = 0.04  # grpo's KL coefficient
LR_CLAMP = 20.0  # proxim, verl: log-ratios clamped to +-20 before exp


def preset(name: str) -> proxim.Objective:
    if name == "ppo":  # the policy part only: no critic term, KL is in the reward (stage 1)
        return proxim.objective("ppo", value_coef=0.0)
    return proxim.objective(name)


# -- hand-written: the same math, as few torch ops as one would write by hand -------------------------


def hand_grpo(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    ratio = (lp - old).clamp(-LR_CLAMP, LR_CLAMP).exp()
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    d = (ref - lp).clamp(-LR_CLAMP, LR_CLAMP)
    per = pg + BETA * (d.exp() - d - 1)
    return ((per * m).sum(1) / n).mean()


def hand_ppo(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    ratio = (lp - old).clamp(-LR_CLAMP, LR_CLAMP).exp()
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    return (pg * m).sum() / n.sum()


def hand_dppo(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    ratio = (lp - old).clamp(-LR_CLAMP, LR_CLAMP).exp()
    shift = lp.detach().exp() - old.exp()
    masked = ((adv > 0) & (shift > 0.15)) | ((adv < 0) & (shift < -0.15))
    per = -(ratio * adv).masked_fill(masked, 0.0)
    return (per * m).sum() / n.sum()


def hand_drpo(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    ratio = (lp - old).clamp(-LR_CLAMP, LR_CLAMP).exp()
    per = -adv * ratio + adv.abs() * old.exp() * (ratio - 1) ** 2 / (2 * 12.5)
    return (per * m).sum() / (m.shape[0] * m.shape[1])


def hand_gspo(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    nk = n.unsqueeze(1)
    s = (((lp - old) * m).sum(1, keepdim=True) / nk).clamp(-LR_CLAMP, 10.0).exp()
    per = -torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    return ((per * m).sum(1) / n).mean()


HAND: dict[str, Callable[..., torch.Tensor]] = {"grpo": hand_grpo, "ppo": hand_ppo, "dppo": hand_dppo, "drpo": hand_drpo, "gspo": hand_gspo}
#: Bytes per token that the loss must move at least: read logprobs, anchor, advantages (4 each), the
#: bool mask (1) and, for grpo, ref (4); write the gradient (4).
BYTES_PER_TOKEN = {"grpo": 21, "ppo": 17, "dppo": 17, "drpo": 17, "gspo": 17}


# -- peers ---------------------------------------------------------------------------------------------


def verl_fn(core_algos: Any, name: str) -> Callable[..., torch.Tensor] | None:
    """verl's own functions, composed as its actor does (verl/workers/utils/losses.py::ppo_loss)."""
    if name == "drpo":
        return None  # no DRPO in verl
    cfg = {
        "grpo": dict(loss_mode="vanilla", clip_ratio=0.2, loss_agg_mode="seq-mean-token-mean"),
        "ppo": dict(loss_mode="vanilla", clip_ratio=0.2, loss_agg_mode="token-mean"),
        "dppo": dict(loss_mode="dppo_tv", clip_ratio=0.15, clip_ratio_c=20.0, loss_agg_mode="token-mean"),
        "gspo": dict(loss_mode="gspo", clip_ratio=3e-4, clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean"),
    }[name]
    mode = cfg["loss_agg_mode"]
    config = common.verl_actor_config(**cfg)
    policy = core_algos.get_policy_loss_fn(cfg["loss_mode"])

    def loss(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        pg, _ = policy(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=m, loss_agg_mode=mode, config=config)
        if name == "grpo":
            kl = core_algos.kl_penalty(lp, ref, "low_var_kl")
            pg = pg + BETA * core_algos.agg_loss(kl, m, mode)
        return pg

    return loss


def trl_fn(name: str, mask: torch.Tensor) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None:
    if name == "grpo":
        return common.trl_grpo_loss("grpo", mask, beta=BETA, epsilon=0.2, use_bias_correction_kl=False)
    if name == "ppo":  # PPO's clipped policy loss with a token mean over the batch
        return common.trl_grpo_loss("bnpo", mask, beta=0.0, epsilon=0.2)
    if name == "gspo":
        return common.trl_grpo_loss("grpo", mask, beta=0.0, epsilon=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence")
    return None  # TRL has neither DPPO (removed) nor DRPO


# -- one cell ------------------------------------------------------------------------------------------


def inputs(b: int, t: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = torch.empty(b, t).uniform_(0.02, 0.98, generator=g).log()
    lp = (old + 0.2 * torch.randn(b, t, generator=g)).clamp(max=-1e-4)
    ref = (old + 0.2 * torch.randn(b, t, generator=g)).clamp(max=-1e-4)
    seq_adv = torch.randn(b, generator=g)
    adv = torch.where(mask, seq_adv.unsqueeze(1).expand(b, t), torch.zeros(()))
    group = torch.arange(b) // 16
    d = {"mask": mask, "old": old, "lp": lp, "ref": ref, "seq_adv": seq_adv, "adv": adv, "group": group}
    d = {k: v.to(device) for k, v in d.items()}
    d["fmask"] = d["mask"].float()
    d["n"] = d["fmask"].sum(1).clamp(min=1)
    d["rollout"] = proxim.Rollout(old_logprobs=d["old"], mask=d["mask"], rewards=d["seq_adv"], group=d["group"], ref_logprobs=d["ref"])
    d["estimate"] = proxim.Estimate(advantages=d["adv"])
    return d


def gradient_of(loss_fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor) -> Callable[[], Any]:
    def step() -> Any:
        return torch.autograd.grad(loss_fn(leaf), leaf)

    return step


def cell(name: str, b: int, t: int, device: torch.device, repeats: int, core_algos: Any, with_trl: bool) -> dict[str, Any]:
    x = inputs(b, t, device)
    leaf = x["lp"].clone().requires_grad_(True)
    obj = preset(name)
    hand = HAND[name]
    batch, est = x["rollout"], x["estimate"]
    fns: dict[str, Callable[[], Any]] = {
        "hand": gradient_of(lambda lp: hand(lp, x["old"], x["ref"], x["adv"], x["fmask"], x["n"]), leaf),
        "proxim": gradient_of(lambda lp: obj.loss(lp, batch[:], est).loss, leaf),
        "proxim -m": gradient_of(lambda lp: obj.loss(lp, batch[:], est, metrics=False).loss, leaf),
    }
    torch._dynamo.reset()
    compiled_loss = torch.compile(obj.loss, fullgraph=True)
    compile_s = 0.0
    for metrics in (True, False):
        start = time.perf_counter()
        torch.autograd.grad(compiled_loss(leaf, batch[:], est, metrics=metrics).loss, leaf)
        common.sync(device)
        compile_s += time.perf_counter() - start
    fns["compiled"] = gradient_of(lambda lp: compiled_loss(lp, batch[:], est).loss, leaf)
    fns["compiled -m"] = gradient_of(lambda lp: compiled_loss(lp, batch[:], est, metrics=False).loss, leaf)
    if core_algos is not None and (vf := verl_fn(core_algos, name)) is not None:
        fns["verl"] = gradient_of(lambda lp: vf(lp, x["old"], x["ref"], x["adv"], x["fmask"]), leaf)
    if with_trl and (tf := trl_fn(name, x["mask"])) is not None:
        trl_inputs = common.trl_harness.grpo_inputs(x["mask"], x["seq_adv"], x["old"], ref=x["ref"])
        fns["TRL"] = gradient_of(lambda lp: tf(lp, trl_inputs), leaf)
    src = torch.randn(b, t, device=device)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    times = common.measure(fns, device, repeats)
    times["compile_s"] = compile_s
    return times


def main() -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    args = p.parse_args()
    device = common.setup(args)
    repeats = args.repeats or (3 if args.quick else 7)
    sizes = SIZES[:1] if args.quick else SIZES
    core_algos = common.load_verl()
    with_trl = common.trl_available()
    rows, summary = [], []
    ratios: dict[str, list[float]] = {
        key: []
        for key in ("proxim/hand", "proxim -m/hand", "compiled/hand", "compiled -m/hand", "verl/proxim", "verl/proxim -m", "TRL/proxim", "TRL/proxim -m")
    }

    def pair(key: str, num: float | None, den: float | None, key_m: str, num_m: float | None, den_m: float | None) -> str:
        """'a / b' for the with-metrics and -m ratios of one cell, recorded for the summary."""
        if num is None or den is None or num_m is None or den_m is None:
            return "–"
        ratios[key].append(num / den)
        ratios[key_m].append(num_m / den_m)
        return f"{num / den:.2f} / {num_m / den_m:.2f}"

    for name in args.objectives:
        for b, t in sizes:
            r = cell(name, b, t, device, repeats, core_algos, with_trl)
            eager, bare, hand, comp, comp_bare = r["proxim"], r["proxim -m"], r["hand"], r["compiled"], r["compiled -m"]
            verl, trl = r.get("verl"), r.get("TRL")
            moved = BYTES_PER_TOKEN[name] * b * t
            copy_bw = 2 * 4 * b * t / r["copy"]
            row = [
                name,
                f"{b}x{t}",
                *(common.fmt_time(v) for v in (hand, eager, bare, comp, comp_bare, verl, trl)),
                pair("proxim/hand", eager, hand, "proxim -m/hand", bare, hand),
                pair("compiled/hand", comp, hand, "compiled -m/hand", comp_bare, hand),
                pair("verl/proxim", verl, eager, "verl/proxim -m", verl, bare),
                pair("TRL/proxim", trl, eager, "TRL/proxim -m", trl, bare),
                f"{moved / bare / 1e9:.2f} / {moved / comp_bare / 1e9:.2f} / {copy_bw / 1e9:.1f}",
                f"{r['compile_s']:.1f} s",
            ]
            rows.append(row)
            print(" | ".join(row), flush=True)
    header = [
        "objective",
        "B x T",
        "hand",
        "proxim",
        "proxim -m",
        "compiled",
        "compiled -m",
        "verl",
        "TRL",
        "proxim/hand (-m)",
        "compiled/hand (-m)",
        "verl/proxim (-m)",
        "TRL/proxim (-m)",
        "GB/s proxim -m / compiled -m / copy",
        "compile",
    ]
    tab = common.table(header, rows)
    for key, values in ratios.items():
        if values:
            summary.append(f"- {key}: median {sorted(values)[len(values) // 2]:.2f}x, range {min(values):.2f}x to {max(values):.2f}x over {len(values)} cells")
    print()
    print(tab)
    print("\n".join(summary))
    if args.no_write or args.quick:
        return
    body = "\n".join(
        [
            "Stage 2, forward and backward (the gradient with respect to the current log-probs), float32, "
            "right-padded batches (lengths uniform in [T/2, T]), one advantage per sequence. 'proxim' is "
            "`obj.loss(...)` as the trainer calls it, with its metrics (clip fractions, ratio mean and max, "
            "approximate KL); 'proxim -m' is `obj.loss(..., metrics=False)`, the same loss and gradient without "
            "them, like the hand-written loss; 'compiled' and 'compiled -m' the same under `torch.compile`. "
            "Each proxim call gets a fresh minibatch object (`batch[:]`), as the trainer's `batch[idx]` does. "
            "Ratio columns give 'with metrics / -m'. Times are per call; "
            "ratios are of medians (lower is faster for the numerator). 'verl/proxim' > 1 means proxim is faster. "
            "GB/s counts only the bytes the loss cannot avoid moving (inputs read once, gradient written once) "
            "against a plain `copy_` of one [B, T] float32 tensor (read + write). TRL's time includes its metric "
            "code (several `.item()` syncs), as in training; verl's policy losses call `.item()` three times too.",
            "",
            common.header_lines(device, args.threads, repeats),
            "",
            tab,
            "",
            *summary,
        ]
    )
    suffix = "" if device.type == "cpu" else f" ({device.type})"
    common.write_section(f"objective-{device.type}", f"1. Objective, stage 2{suffix}", body)


if __name__ == "__main__":
    main()
