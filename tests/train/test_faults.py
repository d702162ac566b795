"""What a user gets wrong loses no finished work and says what is wrong: bad rewards, planted or damaged run
folders, a full disk, names that leave the output folder, files that are not what their setting says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import proxim
from proxim.cli import main
from proxim.train import TrainConfig, TrainingError, train

from .helpers import TINY_RUN_FLAGS

CALLS: list[int] = []


def lowercase_share(prompts, completions, **batch):
    return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def flaky(bad_steps: set[int], how: str = "nan"):
    """A reward that misbehaves on the given steps (by the step the trainer passes), and is fine otherwise."""

    def reward(prompts, completions, step, **batch):
        if step in bad_steps:
            if how == "raise":
                raise RuntimeError("the scoring service is down")
            if how == "none":
                return None
            if how == "scalar":
                return 0.5
            return [float("nan")] * len(completions)
        return lowercase_share(prompts, completions)

    reward.__name__ = "flaky"
    return reward


def _history(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("how", ["nan", "raise", "none", "scalar"])
def test_a_bad_reward_skips_its_step_and_the_run_goes_on(how: str, tiny_config, capfd: pytest.CaptureFixture[str]) -> None:
    result = train(tiny_config(steps=3), rewards=[flaky({1}, how)])
    history = _history(result.run_dir)
    assert [h["reward/failed"] for h in history] == [0.0, 1.0, 0.0]
    assert [h["optim/skipped"] for h in history] == [0.0, 1.0, 0.0]
    assert "loss/total" in history[0] and "loss/total" not in history[1] and "loss/total" in history[2]
    err = capfd.readouterr().err
    assert "step 2: reward 'flaky' " in err and "The step's update is skipped (1 in a row; the run stops at 3)." in err
    assert result.after is not None


def test_k_bad_reward_steps_in_a_row_stop_with_a_checkpoint(tiny_config) -> None:
    config = tiny_config(steps=6, max_reward_failures=2)
    with pytest.raises(
        TrainingError, match=r"2 steps in a row had rewards that failed; the last: reward 'flaky' returned nan; for example the completion"
    ) as caught:
        train(config, rewards=[flaky({2, 3, 4, 5})])
    assert "Fix the reward, or raise max_reward_failures" in str(caught.value)
    run = Path(config.output_dir) / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"  # steps 1-2 trained, step 3 skipped
    assert [h["reward/failed"] for h in _history(run)] == [0.0, 0.0, 1.0]


def test_a_broken_reward_fails_before_the_warm_start(tiny_config, tmp_path: Path) -> None:
    def broken(prompts, completions, **batch):
        return [len(c) / 0 for c in completions]

    config = tiny_config(warmstart_steps=50, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(proxim.ConfigurationError, match=r"reward 'broken' raised ZeroDivisionError: division by zero when tried before training"):
        train(config, rewards=[broken])
    assert not (tmp_path / "cache").exists()  # no warm start was trained
    assert not (Path(config.output_dir) / "run").exists()  # and no run folder made


def _finished_run(tmp_path: Path, *extra: str, steps: int = 4) -> Path:
    flags = [*TINY_RUN_FLAGS, "--steps", str(steps), "--eval-size", "4", "--save-every", "2", "--keep-checkpoints", "3", *extra]
    assert main(["train", *flags, "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]) == 0
    return tmp_path / "runs" / "r"


def _edit_saved_config(run: Path, **changes: object) -> None:
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_resume_takes_no_code_from_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path)
    capsys.readouterr()
    planted = tmp_path / "planted.py"
    planted.write_text("def reward(prompts, completions, **batch):\n    return [0.0] * len(completions)\n")
    _edit_saved_config(run, trust_remote_code=True, rewards=["task", f"{planted}:reward"])
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert f"its saved settings would run code from outside proxim (rewards=['task', '{planted}:reward']; trust_remote_code=True)" in err
    assert f"A run folder is data, not code: check them, and give them again to continue: --rewards task {planted}:reward --trust-remote-code" in err
    # given again, they still differ from what the checkpoint was written with, which is refused as well
    assert main(["train", "--resume", str(run), "--steps", "6", "--trust-remote-code", "--rewards", "task", f"{planted}:reward"]) == 2
    err = capsys.readouterr().err
    assert "the settings differ from the checkpoint's copy" in err and "trust_remote_code: False there, True now" in err


def test_resume_refuses_a_setting_edited_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path)
    _edit_saved_config(run, lr=0.5)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "the settings differ from the checkpoint's copy" in err and "lr: 0.0001 there, 0.5 now" in err


def test_resume_repairs_a_cut_last_line_and_a_broken_evaluation_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _finished_run(tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-40])  # the last line cut in the middle
    (run / "eval.json").write_text('{"before": {"n": 4,')
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-quiet"]) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl:4: the last line is cut short (the run was killed while writing it); it is dropped." in err
    assert "eval.json: not a valid evaluation record; its evaluations will be made again." in err
    assert [h["step"] for h in _history(run)] == [1, 2, 3, 5, 6]  # step 4's record was the cut line; its checkpoint was whole


def test_a_broken_latest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = _finished_run(tmp_path / "full", steps=6)
    run = _finished_run(tmp_path / "cut", steps=4)
    (run / "checkpoints" / "step_000004" / "state.json").write_text("{truncated")
    (run / "checkpoints" / "step_000002" / "optimizer.pt").write_bytes(b"not a torch file")
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-quiet"]) == 1  # no checkpoint that loads: the run cannot go on
    err = capsys.readouterr().err
    assert "skipping the checkpoint step_000004: " in err and "state.json: Expecting property name" in err
    assert "step_000002/optimizer.pt: not a file proxim wrote (torch.load refused to read it)" in err
    assert "no checkpoint could be loaded:" in err
    shutil.rmtree(run)
    run = _finished_run(tmp_path / "cut", steps=4)
    (run / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"\0" * 16)  # unreadable weights
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-quiet"]) == 0
    err = capsys.readouterr().err
    assert "cannot resume from the checkpoint step_000004 (reading " in err and "model.safetensors" in err and "trying the one before it" in err
    assert "resuming" in err and "from step 2 (step_000002)" in err
    got, expected = (
        load_file(str(run / "checkpoints" / "step_000006" / "model.safetensors")),
        load_file(str(want / "checkpoints" / "step_000006" / "model.safetensors")),
    )
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # the steps after the fallback are redone exactly


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from proxim.train import checkpoint
    from proxim.train.models import build_tiny_model, tiny_config
    from proxim.train.optimization import Optimization, parameter_groups
    from proxim.train.step_sections import Optimizer

    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "512k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        lm = build_tiny_model(tiny_config(32, 1, 2), 0)
        opt = Optimization(Accelerator(cpu=True), parameter_groups([(lm, 1e-3)]), Optimizer(), horizon=1)
        save = {"accelerator": opt.accelerator, "models": {"model": lm}, "optimization": opt, "state": {}, "config_toml": "", "keep": 2}
        checkpoint.save(disk, 1, **save)  # fits
        with open(disk / "filler", "wb", buffering=0) as fh:  # fill the disk to the last block
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        with pytest.raises(checkpoint.CheckpointError) as caught:
            checkpoint.save(disk, 2, **save)
        message = str(caught.value)
        assert f"could not write the checkpoint of step 2 into {disk / 'checkpoints'}: writing {disk / 'checkpoints' / '.tmp-step_000002'}" in message
        assert "The previous checkpoint (step_000001) is intact; free space on that disk" in message
        assert checkpoint.latest(disk) == disk / "checkpoints" / "step_000001" and not (disk / "checkpoints" / ".tmp-step_000002").exists()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)  # lazy: a file handle the failed write left may still be open


@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute", "a/b", ".."])
def test_run_names_stay_inside_the_output_folder(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY_RUN_FLAGS, "--output-dir", str(tmp_path / "runs"), "--run-name", name]) == 2
    assert f"run_name={name!r} must be a single folder name (no '/', '..' or absolute path): run folders stay inside --output-dir." in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_files_that_are_not_what_their_setting_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--output-dir", str(tmp_path / "runs"), *TINY_RUN_FLAGS]
    (tmp_path / "arrays.jsonl").write_text('{"prompt": "1+1="}\n["2+2=", "4"]\n')
    assert main(["train", *out, "--task", "none", "--prompts-file", str(tmp_path / "arrays.jsonl"), "--rewards", "proxim_plugins.tasks:_answers"]) == 2
    assert 'arrays.jsonl:2: expected a JSON object such as {"prompt": "2+2=", "answer": "4"}, got list ["2+2=", "4"].' in capsys.readouterr().err
    (tmp_path / "syntax.py").write_text("def reward(prompts, completions, **batch)\n    return []\n")
    assert main(["train", *out, "--rewards", f"{tmp_path / 'syntax.py'}:reward"]) == 2
    assert f"reward '{tmp_path / 'syntax.py'}:reward': {tmp_path / 'syntax.py'}, line 1: expected ':'." in capsys.readouterr().err
    (tmp_path / "importing.py").write_text("import no_such_module_xyz\n")
    assert main(["train", *out, "--rewards", f"{tmp_path / 'importing.py'}:reward"]) == 2
    assert "running" in (err := capsys.readouterr().err) and "raised ModuleNotFoundError: No module named 'no_such_module_xyz'." in err
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "weights.bin").write_bytes(b"")
    for setting in ("--model", "--init", "--reward-model"):
        assert main(["train", *out, setting, str(tmp_path / "not_a_model")]) == 2
        name = setting[2:].replace("-", "_")
        assert f"{name}='{tmp_path / 'not_a_model'}' is not a transformers model folder: it has no config.json." in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was created for any of them


def test_a_failed_start_leaves_no_empty_run_folder(tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxim.train import models

    def fails(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(models, "frozen_copy", fails)
    config = tiny_config(run_name="gone")
    with pytest.raises(OSError, match="the disk went away"):
        train(config)  # grpo has a KL term: the reference is built after the run folder
    assert not (Path(config.output_dir) / "gone").exists()
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    with pytest.raises(OSError):
        train(TrainConfig(**{**config.to_dict(), "output_dir": str(tmp_path), "run_name": "mine"}))
    assert (tmp_path / "mine" / "notes.txt").is_file()  # a folder the run did not create is never removed


def test_an_error_in_a_later_step_checkpoints_the_steps_done(tiny_config, capfd: pytest.CaptureFixture[str]) -> None:
    from typing import ClassVar

    import attrs

    @attrs.frozen
    class FailsOnThirdCall(proxim.TrustRegion):
        name: ClassVar[str] = "fails_on_third_call"

        def __call__(self, logprobs, anchor, advantages, mask, *, metrics=True):
            CALLS.append(1)
            if len(CALLS) == 5:  # two calls per update (the loss, its gradient diagnostics): the first of step 3
                raise RuntimeError("a bug in a plugin's region")
            return proxim.RegionOutput(loss=-advantages * logprobs)

    CALLS.clear()
    config = tiny_config(steps=5, save_every=0)
    with pytest.raises(RuntimeError, match="a bug in a plugin's region"):
        train(config, objective=proxim.objective(advantage="group_normalized", region=FailsOnThirdCall()), rewards=[lowercase_share])
    run = Path(config.output_dir) / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"  # steps 1 and 2 kept, though save_every=0
    assert "the run failed in step 3; its 2 completed steps are checkpointed in" in capfd.readouterr().err


class _Saver:
    """A stand-in for a transformers model or tokenizer: save_pretrained writes one file, or fails as a full disk does."""

    def __init__(self, name: str, text: str, fail: bool = False) -> None:
        self.name, self.text, self.fail = name, text, fail

    def save_pretrained(self, directory: str, **_: object) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        (Path(directory) / self.name).write_text(self.text)


def test_a_model_folder_is_replaced_whole_or_kept(tmp_path: Path) -> None:
    """model/ is written beside its place and renamed in: a failed write names the folder and keeps the old one."""
    from proxim.errors import TrainingError
    from proxim.train.models import save_model_dir

    target = tmp_path / "run" / "model"
    save_model_dir(_Saver("model.safetensors", "v1"), _Saver("tokenizer.json", "t1"), target)
    (target / "stale.txt").write_text("from an earlier save")
    save_model_dir(_Saver("model.safetensors", "v2"), _Saver("tokenizer.json", "t2"), target)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "tokenizer.json"]  # replaced whole
    assert (target / "model.safetensors").read_text() == "v2"
    with pytest.raises(TrainingError, match=r"could not write the model folder .*run/model: No space left on device"):
        save_model_dir(_Saver("model.safetensors", "v3"), _Saver("tokenizer.json", "t3", fail=True), target)
    assert (target / "model.safetensors").read_text() == "v2"  # the previous folder, untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no temporary folder left
