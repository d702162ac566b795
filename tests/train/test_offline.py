"""Offline preference training: sequence log-probs, the built-in preference set, DPO/IPO/hinge runs, record errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from proxim.cli import main
from proxim.errors import ConfigurationError
from proxim.train import TrainConfig, train
from proxim.train.config import PreferenceConfig
from proxim.train.recipes.preference import PreferenceRunResult

from .helpers import TINY

#: `TINY` without the settings of the online loop, which an offline run refuses.
OFFLINE_TINY = {k: v for k, v in TINY.items() if k in PreferenceConfig.names()}

#: Pairs for the count task: the chosen response is the right count, the rejected one is not.
PAIRS = [
    {"prompt": "count a: abca=", "chosen": "2", "rejected": "3"},
    {"prompt": "count b: bbb=", "chosen": "3", "rejected": "1"},
    {"prompt": "count c: acca=", "chosen": "2", "rejected": "0"},
    {"prompt": "count a: bcb=", "chosen": "0", "rejected": "2"},
    {"prompt": [{"role": "user", "content": "count b: abab="}], "chosen": "2", "rejected": "4"},
    {"prompt": "count c: ccccc=", "chosen": "5", "rejected": "4"},
]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sequence_logprobs_equal_a_naive_full_log_softmax_sum() -> None:
    """Chunked, padded scoring (prompts left-padded, responses right-padded, chunks of 3 positions) against one
    unpadded forward per pair and a full log-softmax, summed over the response tokens and EOS; value and gradient."""
    from proxim.train.logprobs import PolicyScorer
    from proxim.train.models import build_tiny_model, byte_tokenizer, tiny_config
    from proxim.train.records import sequence_logprobs

    tok = byte_tokenizer()
    lm = build_tiny_model(tiny_config(32, 1, 2), seed=0).double()
    prompts, responses = ["12+34=", "5+6=", "a longer prompt, "], ["46", "11 and more", ""]
    eos = int(tok.eos_token_id)
    got = sequence_logprobs(PolicyScorer(lm, chunk_size=3), tok, prompts, responses, eos)
    got_grad = torch.autograd.grad(got.sum(), lm.model.embed_tokens.weight)[0]

    want = []
    for p, r in zip(prompts, responses):
        prompt, response = tok(p)["input_ids"], tok(r, add_special_tokens=False)["input_ids"] + [eos]
        logits = lm(input_ids=torch.tensor([prompt + response])).logits[0]
        full = torch.log_softmax(logits, dim=-1)  # [L, V]: the whole log-softmax
        # the logits at position len(prompt) - 1 + t predict response token t
        want.append(sum(full[len(prompt) - 1 + t, token] for t, token in enumerate(response)))
    want_t = torch.stack(want)
    want_grad = torch.autograd.grad(want_t.sum(), lm.model.embed_tokens.weight)[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want_t, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-10)


def test_default_preference_set_prefers_the_better_answer(tmp_path: Path) -> None:
    """Built from the count task with a briefly warm-started tiny model: in every pair the chosen response is the
    right count and the rejected one is not (the count recomputed here from the prompt), on training and held-out pairs."""
    from accelerate import Accelerator

    import proxim
    from proxim.train.models import eos_ids
    from proxim.train.preferences import preference_set
    from proxim.train.warmstart import initial_policy

    config = PreferenceConfig(
        **{**OFFLINE_TINY, "task": "count", "warmstart_steps": 150, "warmstart_lr": 3e-3, "preference_prompts": 64, "eval_size": 32, "cache_dir": str(tmp_path)}
    )
    task = config.load_task(proxim.default_registry())
    assert task is not None
    accelerator = Accelerator(cpu=True)
    lm, tok, _ = initial_policy(config, config, task, config.seed, accelerator, progress=False)
    pairs = preference_set(config, task, lm, tok, eos_ids(tok, lm), accelerator)
    assert pairs.train and pairs.held_out
    for record in pairs.train + pairs.held_out:
        letter, text = re.fullmatch(r"count (\w): (\w+)=", record["prompt"]).groups()  # type: ignore[union-attr]
        right = str(text.count(letter))
        assert record["chosen"].strip() == right and record["rejected"].strip() != right, record
    again = preference_set(config, task, lm, tok, eos_ids(tok, lm), accelerator)  # from the cache
    assert again.origin == pairs.origin and again.train == pairs.train
    assert len(list((tmp_path / "preferences").iterdir())) == 1


@pytest.mark.parametrize("preset", ["dpo", "ipo", "hinge"])
def test_offline_run_writes_a_run_folder(preset: str, tmp_path: Path) -> None:
    base = {**OFFLINE_TINY, "preset": preset, "task": "count", "output_dir": str(tmp_path / "runs")}
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    with pytest.raises(ConfigurationError, match="chat template"):  # the byte tokenizer has none
        train(TrainConfig(**{**base, "data": str(data), "eval_size": 2}))
    plain = write_jsonl(tmp_path / "plain.jsonl", [p for p in PAIRS if isinstance(p["prompt"], str)] * 3)
    result = train(TrainConfig(**{**base, "data": str(plain), "eval_size": 3, "steps": 3, "prompts_per_step": 4, "micro_batch_size": 3}))
    assert isinstance(result, PreferenceRunResult)
    assert result.pairs_before is not None and result.pairs_after is not None and result.after is not None
    assert result.pairs_before.n == 3 and result.pairs_before.reward_accuracy == 0.0  # the policy is the reference
    assert result.pairs_before.loss == pytest.approx({"dpo": 0.6931471805599453, "ipo": 25.0, "hinge": 1.0}[preset], abs=1e-6)
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss/preference"])) for h in history)
    for name in ("model/config.json", "model/tokenizer.json", "summary.md", "eval.json", "config.toml", "plot.png"):
        assert (result.run_dir / name).is_file(), name


def test_bad_records_name_the_line_and_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"prompt": "count a: aa=", "chosen": "2", "rejected": "1"}
    cases = [
        ([good, "", {"prompt": "count a: a=", "chosen": "1"}], "bad.jsonl:3: the field 'rejected' is missing"),
        ([good, {"prompt": "x", "chosen": 2, "rejected": "1"}], "bad.jsonl:2: the field 'chosen' must be a string, got int"),
        ([{"prompt": [{"role": "user"}], "chosen": "1", "rejected": "2"}], "bad.jsonl:1: the field 'prompt' must be a string or a list of chat messages"),
        ([good, ["not", "an", "object"]], "bad.jsonl:2: expected a JSON object"),
    ]
    for records, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
        assert main(["train", "--preset", "dpo", "--data", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    assert main(["train", "--preset", "dpo", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: not JSON" in capsys.readouterr().err
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "count a: a=", "response": "1"}, {"prompt": "count b: b="}])
    args = ["--data", str(sft_data), "--output-dir", str(tmp_path / "runs"), "--tiny-hidden-size", "32", "--tiny-layers", "1", "--tiny-heads", "2", "--quiet"]
    assert main(["sft", *args]) == 2
    assert "sft.jsonl:2: the field 'response' is missing" in capsys.readouterr().err
    assert main(["reward-model", *args, "--run-name", "rm"]) == 2
    assert "sft.jsonl:1: the field 'chosen' is missing" in capsys.readouterr().err


def test_offline_and_online_settings_do_not_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    assert main(["train", "--preset", "grpo", "--data", str(data)]) == 2
    assert "holds records for offline training, but grpo is an online objective" in capsys.readouterr().err
    assert main(["train", "--preset", "dpo", "--group-size", "4", "--epochs", "2", "--rewards", "task"]) == 2
    err = capsys.readouterr().err
    assert "--group-size, --epochs: online settings, but --preset dpo trains offline" in err
    assert main(["train", "--preset", "dpo", "--task", "none"]) == 2
    assert "needs preference pairs: give --data" in capsys.readouterr().err
    init = tmp_path / "init"
    init.mkdir()
    assert main(["train", "--init", str(init), "--model", str(init)]) == 2
    assert "both name the starting model" in capsys.readouterr().err
