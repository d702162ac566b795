"""The embedded default model and tokenizer, built in code (nothing is downloaded), and model loading.

The tokenizer is lossless byte-level: ids 0-255 are the bytes of the UTF-8 text, 256-258 are
``<pad>``, ``<bos>`` and ``<eos>`` (259 symbols; a `tokenizers` byte-level BPE with no merges). Every
encoded prompt starts with ``<bos>``; prompts are left-padded for generation.

The tiny model is a transformers Llama (defaults: hidden 128, 2 layers, 4 heads, MLP 512, tied
embeddings: 0.43 M parameters), built from a seed, so that the same seed gives the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from proxim.train.sections import Model

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
BYTE_VOCAB = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (what ByteLevel pre-tokenizers emit)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` over bytes: ids 0-255 = bytes, 256 <pad>, 257 <bos>, 258 <eos>; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_char = _bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(BYTE_VOCAB)}
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = BYTE_VOCAB + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=4096)


def tiny_config(hidden_size: int = 128, layers: int = 2, heads: int = 4, max_positions: int = 256) -> Any:
    """The `LlamaConfig` of the built-in model (MLP width 4 x hidden, tied input/output embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=BYTE_VOCAB + len(SPECIAL_TOKENS),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=BYTE_VOCAB,
        bos_token_id=BYTE_VOCAB + 1,
        eos_token_id=BYTE_VOCAB + 2,
    )


def build_tiny_model(config: Any, seed: int) -> Any:
    """A freshly initialised `LlamaForCausalLM` from `config`; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def load_causal_lm(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """A transformers causal LM from a local directory, in float32 (mixed precision is accelerate's job)."""
    from transformers import AutoModelForCausalLM

    _check_local_dir(path, "model")
    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=torch.float32)


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a model, with left padding and a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    _check_local_dir(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an end-of-sequence token; set one and save it again.")
        tok.pad_token = tok.eos_token
    return tok


def start_tokenizer(settings: Model) -> Any:
    """The tokenizer of the model a run starts from: the byte tokenizer, or ``--tokenizer``, or the start model's."""
    start = settings.start_model()
    return byte_tokenizer() if start is None else load_tokenizer(settings.tokenizer or start, settings.trust_remote_code)


def start_policy(settings: Model, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """The model a run starts from, before any warm start: the built-in tiny model (built from `seed`) or the
    directory `settings.start_model()`; its tokenizer; and its identity (what a warm-start cache entry depends on)."""
    start = settings.start_model()
    if start is None:
        tiny = tiny_config(settings.tiny_hidden_size, settings.tiny_layers, settings.tiny_heads)
        return build_tiny_model(tiny, seed), byte_tokenizer(), {"builtin": tiny.to_dict(), "seed": seed}
    tokenizer = start_tokenizer(settings)
    lm = load_causal_lm(start, settings.trust_remote_code)
    mtime = max((p.stat().st_mtime for p in Path(start).glob("*.safetensors")), default=0)
    return lm, tokenizer, {"path": str(Path(start).resolve()), "mtime": mtime}


def load_policy(directory: Path, settings: Model, tokenizer_beside: bool) -> tuple[Any, Any]:
    """The causal LM in `directory`, its dropout off (`disable_dropout`), and its tokenizer: saved beside it
    (`tokenizer_beside`, a run's ``init/`` folder), else from ``--tokenizer`` or the same folder."""
    tokenizer = load_tokenizer(directory if tokenizer_beside else settings.tokenizer or directory, settings.trust_remote_code)
    return disable_dropout(load_causal_lm(directory, settings.trust_remote_code)), tokenizer


def disable_dropout(model: Any) -> Any:
    """`model` with every dropout probability set to 0 (its `nn.Dropout` modules, and the float ``*dropout*``
    attributes that attention and decoder layers read when training, such as ``attention_dropout``); returned.

    A policy is sampled in eval mode and scored in whatever mode it is in: with dropout left on, the two see
    different networks and the first ratio of a rollout is not 1 (GPT-2's 0.1 dropouts did this once a LoRA
    model had been put back in training mode by ``generate``). TRL turns dropout off for DPO and reward models too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def frozen_copy(directory: Path, settings: Model, device: torch.device | str) -> Any:
    """The causal LM in `directory`, on `device`, in eval mode and without gradients: a reference policy."""
    return load_causal_lm(directory, settings.trust_remote_code).to(device).eval().requires_grad_(False)


def load_weights(module: torch.nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load the weights ``save_pretrained`` wrote into `directory` into `module` exactly (tied weights included).

    One file goes through safetensors' ``load_model`` (which knows that tied tensors are saved once);
    a sharded checkpoint through transformers' ``load_sharded_checkpoint``, where a weight missing from
    the shards must be tied to one they hold. Missing or unexpected weights are an error naming them.
    """
    folder = Path(directory)
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors.torch import load_model

        load_model(module, str(single), strict=True)
        return
    if not (folder / "model.safetensors.index.json").is_file():
        raise FileNotFoundError(f"no model.safetensors (or sharded model.safetensors.index.json) in {folder}")
    from transformers.trainer_utils import load_sharded_checkpoint

    result = load_sharded_checkpoint(module, str(folder), strict=False, prefer_safe=True)
    state = module.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in result.missing_keys}
    untied = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
    if untied or result.unexpected_keys:
        raise RuntimeError(f"{folder}: no weights for {untied[:5]}; weights {list(result.unexpected_keys)[:5]} do not belong to this model.")


def save_model_dir(model: Any, tokenizer: Any, directory: str | os.PathLike[str]) -> None:
    """Write `model` (safetensors) and `tokenizer` into `directory`: a folder `from_pretrained` loads.

    The folder is written beside its place and renamed into it, so a reader (or a run that is killed while
    writing) sees the previous folder or the new one whole, never a part. A failed write (a full disk, no
    permission) raises `TrainingError` naming the folder, and leaves the previous one as it was."""
    import shutil

    from proxim.errors import TrainingError

    target = Path(directory)
    tmp, old = target.with_name(f".{target.name}.tmp-{os.getpid()}"), target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise TrainingError(
            f"could not write the model folder {target}: {exc.strerror or exc}; free space on that disk or choose another --output-dir."
        ) from exc
    shutil.rmtree(old, ignore_errors=True)


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("neither the tokenizer nor the model names an end-of-sequence token; responses could never end.")
    return sorted(ids)


def _check_local_dir(path: str | os.PathLike[str], what: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} path {str(path)!r} is not a local directory. proxim loads models from disk only "
            f"(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))."
        )
