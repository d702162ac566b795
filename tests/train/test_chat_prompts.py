"""Chat prompts: rows and records whose prompt is a list of messages, rendered by the tokenizer's chat template.

Every expected token id below is written out by hand from the template and the tokenizer built here: ids
0-255 are the bytes of the text, then the special tokens in the order of `SPECIALS`. Nothing calls the
code under test to find out what it should produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from proxim.cli import main
from proxim.errors import ConfigurationError
from proxim.train import SFTConfig, TrainConfig, Trainer, train
from proxim.train.prompts import RowSource, encode_prompts, read_jsonl
from proxim.train.records import PAIR_FIELDS, SUPERVISED_FIELDS, encode_responses, read_records, render_prompts
from proxim.train.supervised import encode_supervised

from .helpers import TINY

SPECIALS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")
PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = range(256, 262)

#: Each turn: the role's token, the content, EOS and a newline; the generation prompt opens the assistant's turn.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: The same without the BOS: the text starts with a role token (as ChatML templates start with <|im_start|>).
TEMPLATE_WITHOUT_BOS = TEMPLATE.removeprefix("{{ bos_token }}")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
#: CONVERSATION rendered with the generation prompt, by hand.
CONVERSATION_IDS = [BOS, SYSTEM, *b"Be brief.", EOS, 10, USER, *b"2+2=", EOS, 10, ASSISTANT]


def chat_tokenizer(template: str | None = TEMPLATE) -> Any:
    """A byte-level tokenizer made in code (no merges: one token per byte) that adds <bos> to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left")
    fast.chat_template = template
    return fast


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_tokenizer_made_here_is_what_the_hand_derivations_assume() -> None:
    tok = chat_tokenizer()
    assert tok("ab")["input_ids"] == [BOS, 97, 98]  # a BOS, then one id per byte
    assert tok("<|user|>é", add_special_tokens=False)["input_ids"] == [USER, 0xC3, 0xA9]


# -- prompt rows -----------------------------------------------------------------------------------


def test_a_chat_prompt_is_encoded_as_the_templates_tokens_with_one_bos() -> None:
    source = RowSource([{"prompt": CONVERSATION, "answer": "4"}, {"prompt": "plain 2+2="}], seed=0, eval_size=0, tokenizer=chat_tokenizer())
    rows = {r["answer"] if "answer" in r else "plain": r for r in source.batch(0, 0, 1, 2)}
    assert rows["4"]["prompt"] == "<bos><|system|>Be brief.<eos>\n<|user|>2+2=<eos>\n<|assistant|>"  # the rendered text the rewards see
    ids = encode_prompts(chat_tokenizer(), [rows["4"]["prompt"], rows["plain"]["prompt"]])
    assert ids[0] == CONVERSATION_IDS and ids[0].count(BOS) == 1
    assert ids[1] == [BOS, *b"plain 2+2="]  # a string prompt still gets the tokenizer's BOS


def test_a_template_without_bos_gets_none_added() -> None:
    """Text that starts with a special token is formatted already: encoded as is, as apply_chat_template(tokenize=True) does."""
    tok = chat_tokenizer(TEMPLATE_WITHOUT_BOS)
    (row,) = RowSource([{"prompt": CONVERSATION[1:]}] * 2, seed=0, eval_size=1, tokenizer=tok).eval_rows()
    assert encode_prompts(tok, [row["prompt"]]) == [[USER, *b"2+2=", EOS, 10, ASSISTANT]]


def test_the_system_prompt_comes_first_unless_the_row_has_its_own() -> None:
    rows = [{"prompt": CONVERSATION[1:], "id": "none"}, {"prompt": [{"role": "system", "content": "Own."}, CONVERSATION[1]], "id": "own"}]
    source = RowSource(rows, seed=0, eval_size=0, tokenizer=chat_tokenizer(), system_prompt="Be brief.")
    by_id = {r["id"]: encode_prompts(chat_tokenizer(), [r["prompt"]])[0] for r in source.batch(0, 0, 1, 2)}
    assert by_id["none"] == CONVERSATION_IDS
    assert by_id["own"] == [BOS, SYSTEM, *b"Own.", EOS, 10, USER, *b"2+2=", EOS, 10, ASSISTANT]


def test_a_system_prompt_with_string_prompts_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"prompts: row 0: system_prompt is put first in chat prompts, but this prompt is a string"):
        RowSource([{"prompt": "2+2="}] * 2, seed=0, eval_size=1, tokenizer=chat_tokenizer(), system_prompt="Be brief.")
    with pytest.raises(ConfigurationError, match="the prompts here are the task's strings"):
        TrainConfig(task="arithmetic", system_prompt="Be brief.").check()


def test_chat_prompts_without_a_chat_template_name_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"prompts: row 0: .* the tokenizer has no chat template .*--tokenizer DIR"):
        RowSource([{"prompt": CONVERSATION}] * 2, seed=0, eval_size=1, tokenizer=chat_tokenizer(template=None))


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([{"role": "user"}], 'message 0 is {"role": "user"}'),
        ([{"content": "hi"}], 'message 0 is {"content": "hi"}'),
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "hi"}], "message 1 has the role 'robot': use 'system' or 'user' or 'assistant'"),
        ([], "must be a string or a list of chat messages such as"),
        ([{"role": "user", "content": 4}], "each an object with a string"),
    ],
)
def test_bad_messages_name_the_row_and_the_fix(prompt: Any, message: str, tmp_path: Path) -> None:
    rows = [{"prompt": "fine"}, {"prompt": prompt}]
    with pytest.raises(ConfigurationError, match="prompts: row 1: the field 'prompt'") as raised:
        RowSource(rows, seed=0, eval_size=0, tokenizer=chat_tokenizer())
    assert message in str(raised.value)
    with pytest.raises(ConfigurationError, match=r"rows.jsonl:2: the field 'prompt'") as raised:
        read_jsonl(write_jsonl(tmp_path / "rows.jsonl", rows))
    assert message in str(raised.value)
    with pytest.raises(ConfigurationError, match=r"pairs.jsonl:2: the field 'prompt'"):
        read_records(write_jsonl(tmp_path / "pairs.jsonl", [{**r, "chosen": "a", "rejected": "b"} for r in rows]), PAIR_FIELDS)


def test_messages_under_another_key_say_where_they_go() -> None:
    with pytest.raises(ConfigurationError, match=r"prompts: row 0: chat messages go in the 'prompt' field.*rename 'messages' to 'prompt'"):
        RowSource([{"messages": CONVERSATION}] * 2, seed=0, eval_size=1, tokenizer=chat_tokenizer())


# -- records: supervised and preference ------------------------------------------------------------


def test_sft_loss_covers_exactly_the_assistant_turn(tmp_path: Path) -> None:
    records = read_records(
        write_jsonl(
            tmp_path / "sft.jsonl",
            [
                {"prompt": CONVERSATION, "response": [{"role": "assistant", "content": "4"}]},
                {"prompt": CONVERSATION[1:], "response": "4"},  # a string response: the text after the generation prompt
            ],
        ),
        SUPERVISED_FIELDS,
    )
    rendered = render_prompts(records, chat_tokenizer(), "sft.jsonl", system_prompt="Be brief.")
    # the assistant's turn is "4<eos>\n": cut after the EOS the template writes (sampling stops there), not doubled
    assert [r["response"] for r in rendered] == ["4<eos>", "4"]
    ids, mask, labels = encode_supervised(chat_tokenizer(), [(r["prompt"], r["response"]) for r in rendered], EOS, "cpu")
    want = [*CONVERSATION_IDS, *b"4", EOS]
    for i in range(2):
        assert ids[i].tolist() == want and mask[i].tolist() == [1] * len(want)
        assert labels[i].tolist() == [-100] * len(CONVERSATION_IDS) + [*b"4", EOS]


def test_preference_records_put_chosen_and_rejected_after_the_same_prompt(tmp_path: Path) -> None:
    pairs = [
        {"prompt": CONVERSATION[1:], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "22"}]},
        {"prompt": CONVERSATION[1:], "chosen": "4", "rejected": "22"},
    ]
    rendered = render_prompts(read_records(write_jsonl(tmp_path / "pairs.jsonl", pairs), PAIR_FIELDS), chat_tokenizer(), "pairs.jsonl", "Be brief.")
    for r in rendered:
        ids, attention, response, response_mask = encode_responses(chat_tokenizer(), [r["prompt"]] * 2, [r["chosen"], r["rejected"]], EOS, "cpu")
        P = len(CONVERSATION_IDS)  # the prompt columns, then the response columns
        assert ids[:, :P].tolist() == [CONVERSATION_IDS] * 2 and attention[:, :P].all()
        assert response[0][response_mask[0]].tolist() == [*b"4", EOS] and response[1][response_mask[1]].tolist() == [*b"22", EOS]
    with pytest.raises(ConfigurationError, match=r"pairs.jsonl:1: the field 'chosen' is a list of chat messages but the prompt is a string"):
        read_records(
            write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}]), PAIR_FIELDS
        )
    with pytest.raises(ConfigurationError, match=r"pairs.jsonl:1: the field 'chosen' .* message 0 has the role 'user': use 'assistant'"):
        read_records(write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": CONVERSATION, "chosen": CONVERSATION[1:], "rejected": "5"}]), PAIR_FIELDS)


# -- runs end to end -------------------------------------------------------------------------------

ROWS = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)} for a in range(3) for b in range(4)]
REWARD_FILE = "def digits(prompts, completions, **batch):\n    return [sum(ch.isdigit() for ch in c) / (1 + len(c)) for c in completions]\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with the chat tokenizer (its template saved beside it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chat") / "model"
    config = LlamaConfig(
        vocab_size=256 + len(SPECIALS), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def test_an_online_run_samples_from_the_templates_tokens(chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    settings = {"model": str(chat_model), "task": None, "prompts_file": str(prompts), "system_prompt": "Be brief.", "max_new_tokens": 6}
    config = TrainConfig(**{**TINY, **settings, "output_dir": str(tmp_path / "runs"), "run_name": "chat"})
    trainer = Trainer(config, rewards=[lambda prompts, completions, **batch: [float(len(c)) for c in completions]])
    rows = trainer.prompts.batch(0, 0, 1, 2)
    generation = trainer.sample(rows)  # the ids the policy samples from, through the trainer's own path
    for i, row in enumerate(rows):
        user = row["prompt"].split("<|user|>")[1].split("<eos>")[0].encode()
        want = [BOS, SYSTEM, *b"Be brief.", EOS, 10, USER, *user, EOS, 10, ASSISTANT]
        got = generation.prompt_ids[i * TINY["group_size"]][generation.prompt_mask[i * TINY["group_size"]]].tolist()
        assert got == want
    # the same run through the command line: two steps, held-out prompts rendered in eval_before.jsonl
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    flags = ["--model", str(chat_model), "--task", "none", "--prompts-file", str(prompts), "--system-prompt", "Be brief.", "--max-new-tokens", "6"]
    flags += ["--rewards", f"{tmp_path / 'rewards.py'}:digits", "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "2"]
    assert main(["train", *flags, "--quiet", "--tracker", "none", "--output-dir", str(tmp_path / "runs"), "--run-name", "cli"]) == 0
    run = tmp_path / "runs" / "cli"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    held_out = [json.loads(line)["prompt"] for line in (run / "eval_before.jsonl").read_text().splitlines()]
    assert held_out == [f"<bos><|system|>Be brief.<eos>\n<|user|>{r['prompt'][0]['content']}<eos>\n<|assistant|>" for r in ROWS[:2]]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--system-prompt TEXT  system message put first in every chat prompt" in capsys.readouterr().out
    assert main(["train", *flags, "--print-config"]) == 0
    assert 'system_prompt = "Be brief."' in capsys.readouterr().out


def test_sft_and_dpo_runs_on_chat_records(chat_model: Path, tmp_path: Path) -> None:
    from proxim.train import sft

    replies = [{**r, "response": [{"role": "assistant", "content": r["answer"]}]} for r in ROWS]
    base = {"model": str(chat_model), "task": None, "system_prompt": "Be brief.", "eval_size": 2, "quiet": True, "tracker": "none"}
    run = {"output_dir": str(tmp_path / "runs"), "save_every": 0}
    result = sft(SFTConfig(**base, **run, data=str(write_jsonl(tmp_path / "sft.jsonl", replies)), warmstart_steps=2, run_name="sft"))
    assert result.after is not None and torch.isfinite(torch.tensor(result.after.loss)) and result.after.loss < result.before.loss
    pairs = [{**r, "chosen": r["answer"], "rejected": [{"role": "assistant", "content": r["answer"] + "0"}]} for r in ROWS]
    config = TrainConfig(**base, **run, preset="dpo", data=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), steps=2, prompts_per_step=4, run_name="dpo")
    dpo = train(config)
    history = [json.loads(line) for line in (dpo.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and all(torch.isfinite(torch.tensor(h["loss/preference"])) for h in history)
