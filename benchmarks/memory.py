"""Benchmark: memory and time of one policy update, with and without LoRA and gradient checkpointing.

Two parts:

  computed  bytes per parameter of each combination of features, from the parameter count alone, and
            what they come to for common model sizes (docs/scale.md explains each term);
  measured  one online-RL policy update on CPU, each configuration in a fresh child process: the reference
            log-probs (no grad), the policy's log-probs and a policy-gradient loss, backward, AdamW. The
            models are proxim's own (`PolicyScorer`, `adapters.prepare`): a full fine-tune with a frozen
            reference copy (`models.frozen_copy`'s role), or LoRA whose reference is the same model with its
            adapter disabled (`adapters.WithoutAdapter`); each with and without gradient checkpointing.

Memory on CPU, from the child's resident set (/proc/self/status), with glibc's mmap threshold at 64 KiB so
that every tensor above it is its own mapping, returned to the OS when freed (resident memory then follows
what torch holds): "models" is the resident growth from building the policy and its reference; "models +
AdamW" the same after a first update, when AdamW holds its two states per trained weight; "forward +
backward" the high-water mark above that during the next update's log-probs and backward pass (the
kernel's mark is reset first: ``echo 5 > /proc/self/clear_refs``), that is the activations and the
gradients; "AdamW step" the high-water mark above the resident set during the optimiser step (its
temporaries). Time: the median of the timed updates after the warm-up one, on CPU time of one thread
(``time.thread_time``). The tiny model's figures are at the allocator's granularity (its weights are 2 MiB).

    python benchmarks/memory.py                       # the tiny model and a 50 M random Llama, T = 512
    python benchmarks/memory.py --quick               # the tiny model only, shorter sequences
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

#: name -> LlamaConfig keyword arguments. "tiny" is proxim's default built-in model; "50M" a random Llama
#: of 50 M parameters with a 32k vocabulary (tied embeddings), small enough for a CPU.
MODELS: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 259, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4},
    "50M": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8},
}
CONFIGS = (("full + reference copy", 0, False), ("full + reference copy", 0, True), ("LoRA r=16", 16, False), ("LoRA r=16", 16, True))
SIZES = {"0.5 B": 0.5e9, "1.5 B": 1.5e9, "7 B": 7e9, "70 B": 70e9}


def _status(*keys: str) -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024 for k in keys}  # type: ignore[union-attr]


def child(spec: dict[str, Any]) -> None:
    """One configuration, in this fresh process: print its memory and update time as JSON."""
    torch.set_num_threads(spec["threads"])
    run = build(spec, "tiny", 2, 8, 8)  # load every kernel and module first, at a negligible size
    run["update"]()
    del run
    start = _status("VmRSS")["VmRSS"]
    run = build(spec, spec["model"], spec["batch"], spec["prompt"], spec["response"])
    built = _status("VmRSS")["VmRSS"] - start
    run["update"]()  # warm-up: AdamW allocates its states
    static = _status("VmRSS")["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    run["backward"]()
    activations = _status("VmHWM")["VmHWM"] - static
    Path("/proc/self/clear_refs").write_text("5")
    before_step = _status("VmRSS")["VmRSS"]
    run["step"]()
    stepping = _status("VmHWM")["VmHWM"] - before_step
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.thread_time()
        run["update"]()
        times.append(time.thread_time() - t0)
    result = {k: run[k] for k in ("params", "trainable")}
    result.update(built=built, static=static - start, activations=activations, stepping=stepping, time=statistics.median(times))
    print(json.dumps(result))


def build(spec: dict[str, Any], model: str, B: int, P: int, T: int) -> dict[str, Any]:
    """The policy (and its reference) and one update's parts: ``backward`` (reference log-probs under no_grad,
    the policy's, a policy-gradient loss with a KL-like term, backward), ``step`` (AdamW) and ``update`` (both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from proxim.train import adapters
    from proxim.train.generation import Generation
    from proxim.train.logprobs import PolicyScorer, response_logprobs
    from proxim.train.sections import Adapter

    torch.manual_seed(0)
    shape = MODELS[model]
    config = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=True, max_position_embeddings=P + T)
    lm = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in lm.parameters())
    settings = Adapter(lora_rank=spec["rank"], gradient_checkpointing=spec["checkpointing"])
    reference_lm = None
    if spec["rank"] == 0:  # a frozen copy of the initial policy (what models.frozen_copy loads)
        reference_lm = LlamaForCausalLM(config).float().eval().requires_grad_(False)
        reference_lm.load_state_dict(lm.state_dict())
    lm = adapters.prepare(lm, settings, seed=0)
    policy = PolicyScorer(lm)
    reference = adapters.WithoutAdapter(policy, lm) if reference_lm is None else PolicyScorer(reference_lm)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    ids = torch.randint(0, shape["vocab_size"], (B, P + T))
    generation = Generation(
        prompt_ids=ids[:, :P],
        prompt_mask=torch.ones(B, P, dtype=torch.bool),
        response_ids=ids[:, P:],
        response_mask=torch.ones(B, T, dtype=torch.bool),
        rollout_logprobs=None,
        completions=[""] * B,
        truncated=torch.zeros(B, dtype=torch.bool),
    )
    rows = torch.arange(B)
    advantages = torch.randn(B, 1)

    def backward() -> None:
        with torch.no_grad():
            ref = response_logprobs(reference, generation, rows, 1.0)[0]
        lp = response_logprobs(policy, generation, rows, 1.0)[0]
        loss = -(lp * advantages).mean() + 0.01 * (lp - ref).pow(2).mean()
        loss.backward()

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def update() -> None:
        backward()
        step()

    return {"params": n_params, "trainable": sum(p.numel() for p in trainable), "backward": backward, "step": step, "update": update}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    # glibc serves blocks above this size with their own mmap and unmaps them when freed: resident memory then
    # follows what torch holds (by default the threshold grows to 32 MiB after frees, and freed heap stays resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {spec} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


#: Bytes per parameter of the model that stay for the whole run (float32 weights; AdamW keeps two float32
#: states per trained weight; the gradient exists from the backward pass to the optimiser step).
TERMS = {
    "full fine-tune + reference copy": {"weights": 4, "gradients": 4, "adam": 8, "reference": 4},
    "full fine-tune, no reference (kl_coef = 0)": {"weights": 4, "gradients": 4, "adam": 8, "reference": 0},
    "LoRA (reference: adapter disabled)": {"weights": 4, "gradients": 0, "adam": 0, "reference": 0},
    "PPO: full + reference + critic backbone": {"weights": 8, "gradients": 8, "adam": 16, "reference": 4},
}


def computed_table(processes: tuple[int, ...] = (1, 8, 64)) -> str:
    header = ["features", "bytes / parameter", *[f"{size}, N = {n}" for size in SIZES for n in processes[:2]]]
    rows = []
    for name, terms in TERMS.items():
        per = sum(terms.values())
        cells = [f"{per * count / n / 2**30:.1f} GiB" for count in SIZES.values() for n in processes[:2]]
        rows.append([name, f"{per} ({' + '.join(f'{v} {k}' for k, v in terms.items() if v)})", *cells])
    return common.table(header, rows)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per update (default 4)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--response", type=int, default=448, help="response tokens (default 448: 512 in all)")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("the measured part reads the process's resident memory: CPU only")
    models = ("tiny",) if args.quick else tuple(MODELS)
    response = 64 if args.quick else args.response
    repeats = args.repeats or (1 if args.quick else 3)
    print("computed (weights, gradients and AdamW states; activations and the temporary gathers not included):\n")
    print(computed_table())
    rows = []
    for model in models:
        for label, rank, checkpointing in CONFIGS:
            spec = {"model": model, "rank": rank, "checkpointing": checkpointing, "batch": args.batch, "prompt": args.prompt}
            spec.update(response=response, repeats=repeats, threads=args.threads)
            r = run_child(spec)
            row = [model, f"{r['params'] / 1e6:.2f} M", label, "yes" if checkpointing else "no", f"{r['trainable'] / 1e6:.3f} M"]
            row += [mib(r["built"]), mib(r["static"]), mib(r["activations"]), mib(r["stepping"]), f"{r['time']:.2f} s"]
            rows.append(row)
            print(" | ".join(row), flush=True)
    header = [
        "model",
        "parameters",
        "features",
        "gradient checkpointing",
        "trained",
        "models",
        "models + AdamW",
        "forward + backward",
        "AdamW step",
        "update time",
    ]
    print()
    print(f"measured: B = {args.batch}, T = {args.prompt} + {response} tokens, float32, {common.machine(torch.device('cpu'), args.threads)}\n")
    print(common.table(header, rows))


if __name__ == "__main__":
    main()
