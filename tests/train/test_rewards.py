"""Rewards: callables by spec, weighted sums, and a sequence-classification reward model built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from proxim.errors import ConfigurationError
from proxim.train import train
from proxim.train.rewards import Reward, RewardError, RewardModel, load_function, score


def test_load_function_from_module_and_file(tmp_path: Path) -> None:
    fn = load_function("proxim_plugins.tasks:_answers")
    assert callable(fn)
    (tmp_path / "myrewards.py").write_text("def brevity(prompts, completions, **batch):\n    return [-len(c) for c in completions]\n")
    brevity = load_function(f"{tmp_path / 'myrewards.py'}:brevity")
    assert brevity(["p"], ["abc"]) == [-3]
    with pytest.raises(ConfigurationError, match="module:function"):
        load_function("no_colon_here")
    with pytest.raises(ConfigurationError, match="no callable 'missing'"):
        load_function("proxim_plugins.tasks:missing")


def test_weighted_sum_and_per_function_values() -> None:
    def length(prompts, completions, **batch):
        return [float(len(c)) for c in completions]

    def has_answer(prompts, completions, **batch):
        return [float(c == a) for c, a in zip(completions, batch["answer"])]

    rewards = [Reward("length", length, 0.5), Reward("exact", has_answer, 2.0)]
    totals, parts = score(rewards, ["1+1=", "2+2="], ["2", "five"], {"answer": ["2", "4"]})
    assert parts == {"length": [1.0, 4.0], "exact": [1.0, 0.0]}
    assert totals == [0.5 * 1 + 2.0 * 1, 0.5 * 4 + 2.0 * 0]


def _raises(prompts, completions, **batch):
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("fn", "message", "completion"),
    [
        (lambda p, c, **b: [0.0, float("nan")], "reward 'bad' returned nan; for example the completion 'y'.", "y"),
        (lambda p, c, **b: [0.0, float("inf")], "reward 'bad' returned inf; for example the completion 'y'.", "y"),
        (lambda p, c, **b: [0.0], "reward 'bad' returned 1 values for 2 completions.", None),
        (lambda p, c, **b: None, "reward 'bad' returned NoneType None, not a list of 2 numbers (one per completion).", None),
        (lambda p, c, **b: 1.0, "reward 'bad' returned float 1.0, not a list of 2 numbers (one per completion).", None),
        (lambda p, c, **b: [1.0, "2"], "reward 'bad' returned str '2' where a number belongs; for example the completion 'y'.", "y"),
        (_raises, "reward 'bad' raised KeyError: 'answer'; for example the completion 'x'.", "x"),
    ],
    ids=["nan", "inf", "count", "none", "scalar", "string", "raises"],
)
def test_bad_reward_values_are_named(fn, message: str, completion: str | None) -> None:
    with pytest.raises(RewardError) as caught:
        score([Reward("bad", fn)], ["a", "b"], ["x", "y"], {})
    assert str(caught.value) == message
    assert caught.value.reward == "bad" and caught.value.completion == completion


def test_numbers_of_other_kinds_are_accepted() -> None:
    import numpy as np

    totals, _ = score([Reward("mixed", lambda p, c, **b: [True, np.float32(0.5), torch.tensor(2.0)])], ["a"] * 3, ["x", "y", "z"], {})
    assert totals == [1.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama sequence-classifier (one label) with the byte tokenizer, saved like any local model."""
    from transformers import LlamaForSequenceClassification

    from proxim.train.models import byte_tokenizer, tiny_config

    path = tmp_path_factory.mktemp("rm") / "rm"
    config = tiny_config(hidden_size=32, layers=1, heads=2)
    config.num_labels = 1
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible spread of scores
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _independent_scores(path: Path, texts: list[str]) -> list[float]:
    """One unpadded forward per text: the score head's value at the text's last token."""
    from transformers import AutoModelForSequenceClassification

    from proxim.train.models import byte_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = byte_tokenizer()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def test_reward_model_scores_prompt_plus_completion(reward_model_dir: Path) -> None:
    rm = RewardModel(reward_model_dir, batch_size=3)  # batches of 3 force padding and a second batch
    prompts = ["12+34=", "7+8=", "rev abc=", "count a: aab=", "1+1="]
    completions = ["46", "15 and more text", "cba", "2", ""]
    got = rm(prompts, completions)
    want = _independent_scores(reward_model_dir, [p + c for p, c in zip(prompts, completions)])
    assert len({round(w, 4) for w in want}) > 1
    for g, w in zip(got, want):
        assert abs(g - w) < 1e-5


def test_training_with_a_reward_model(reward_model_dir: Path, tiny_config) -> None:
    config = tiny_config(rewards=[], reward_model=str(reward_model_dir), reward_model_weight=2.0, log_samples=4)
    result = train(config)
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4
    want = _independent_scores(reward_model_dir, [s["prompt"] + s["completion"] for s in samples])
    for s, w in zip(samples, want):
        assert abs(s["reward_model"] - w) < 1e-5
        assert abs(s["reward"] - 2.0 * w) < 1e-5
