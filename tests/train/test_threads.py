"""The ``threads`` setting: auto counts the cores other processes leave idle; a resumed run keeps its checkpoint's count."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from proxim.errors import ConfigurationError
from proxim.train import threads

from .helpers import PYTHON, TINY_RUN_FLAGS, cli_env


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_a_bad_threads_value_is_refused_with_the_choices(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"threads=.*expected 'auto'.*at least 1"):
        threads.check_setting(value)


@pytest.mark.parametrize(
    ("idle", "processes", "expected"),
    [(2.0, 1, 2), (1.6, 1, 2), (1.4, 1, 1), (0.1, 1, 1), (2.0, 2, 1), (None, 1, 2), (None, 2, 1), (7.0, 1, 2)],
)
def test_auto_takes_the_idle_cores_shared_by_the_local_processes(two_cores: None, idle: float | None, processes: int, expected: int) -> None:
    assert threads.choose("auto", processes, idle=lambda: idle).count == expected


def test_a_number_or_omp_num_threads_wins_over_the_measurement(two_cores: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.choose("3", idle=lambda: 0.0) == threads.ThreadChoice(3, "threads setting")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads.choose("auto", idle=lambda: 0.0) == threads.ThreadChoice(5, "OMP_NUM_THREADS")


def test_idle_cores_is_the_share_of_cpu_time_nobody_used(two_cores: None) -> None:
    # 300 ticks passed on the machine, 225 of them busy: a quarter of two cores was idle
    samples = iter([(1000, 4000), (1225, 4300)])
    assert threads.idle_cores(0.0, read=lambda: next(samples)) == pytest.approx(0.5)
    assert threads.idle_cores(0.0, read=lambda: None) is None


def test_the_machine_reading_is_a_fraction_of_its_cores() -> None:
    idle = threads.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= idle <= (threads.os.cpu_count() or 1) + 1e-9


def test_a_resumed_run_keeps_its_checkpoints_thread_count(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    common = [*TINY_RUN_FLAGS, "--eval-size", "4", "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]
    first = subprocess.run([PYTHON, "-m", "proxim", "train", *common, "--steps", "2", "--threads", "1"], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    env["OMP_NUM_THREADS"] = "2"
    resumed = subprocess.run(
        [PYTHON, "-m", "proxim", "train", "--resume", str(tmp_path / "runs" / "r"), "--steps", "3", "--threads", "auto"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    for step in (2, 3):  # written before and after the resume, although OMP_NUM_THREADS now says 2
        assert json.loads((tmp_path / "runs" / "r" / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())["threads"] == 1


def test_the_cli_refuses_a_bad_threads_flag_without_a_traceback(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-m", "proxim", "train", "--threads", "0", "--steps", "1"], env=cli_env(tmp_path), capture_output=True, text=True)
    assert out.returncode != 0
    assert "threads='0'" in out.stderr and "Traceback" not in out.stderr


def test_apply_sets_torchs_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
