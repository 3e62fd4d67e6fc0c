"""The Hugging Face layout of a model directory, and `parcae convert` (official checkpoints or our runs → it).

The extra files make a `save_pretrained` directory loadable by transformers too (`model_type` in config.json,
a tokenizer as a `PreTrainedTokenizerFast`). Nothing here imports transformers, so `parcae convert` works with
the core dependencies only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data.tokenizer import BOS, EOS, PAD, SPECIALS, TOKENIZER_FILE, load_tokenizer
from ..model.config import ParcaeConfig
from ..model.io import CONFIG_FILE
from ..model.parcae import Parcae
from .official import ConversionReport
from .official_files import load_parcae_lm

HF_MODEL_TYPE = "parcae"
HF_ARCHITECTURE = "ParcaeForCausalLM"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_GENERATION_CONFIG = "generation_config.json"


def write_hf_config(directory: str | Path, config: ParcaeConfig, **extra: Any) -> None:
    """config.json of a directory both loaders read: our fields plus transformers' `model_type`."""
    values = {**config.to_dict(), "model_type": HF_MODEL_TYPE, "architectures": [HF_ARCHITECTURE], **extra}
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def byte_level_tokenizer_json() -> str:
    """Our byte tokenizer as a Hugging Face tokenizer.json: a byte-level BPE without merges, so id b is byte b
    and 256/257/258 are <|bos|>/<|eos|>/<|pad|> — the same ids for every valid Unicode text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256), chr(257), … in
    # byte order.
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    hf = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIALS))
    return hf.to_str(pretty=True)


def save_hf_tokenizer(
    tokenizer: Any, directory: str | Path, *, model_max_length: int, source: Path | None = None
) -> None:
    """tokenizer.json (a BPE one copied byte for byte from `source`, the byte tokenizer as its byte-level BPE)
    and tokenizer_config.json, so `AutoTokenizer` returns a `PreTrainedTokenizerFast`. It adds no BOS: prepend
    `bos_token_id` as Parcae's data pipeline and `parcae generate` do."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER_FILE
    if tokenizer.kind == "byte":
        target.write_text(byte_level_tokenizer_json(), encoding="utf-8")
    elif source is not None and source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    elif source is None:
        tokenizer.save(directory)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    settings |= {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    settings["split_special_tokens"] = True  # a literal "<|bos|>" in a text is ordinary text, as in our tokenizers
    (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    kind: str = "parcae-lm",
    state_init: str | None = None,
    tokenizer: bool = True,
) -> ConversionReport:
    """`parcae convert`: an official checkpoint (kind 'parcae-lm') or one of our runs / saved models (kind
    'run') → a model directory that our loaders and transformers' Auto classes read. `destination` must not exist
    or be empty."""
    source, destination = Path(source), Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} already exists and is not empty; choose a new output directory.")
    if kind == "parcae-lm":
        model, report = load_parcae_lm(source, state_init=state_init)
        tok_file = source / TOKENIZER_FILE
        tok = None
        if tokenizer and tok_file.is_file():
            try:
                tok = load_tokenizer(tok_file)
            except ValueError as err:
                raise ValueError(f"{err} (pass --no-tokenizer to convert the weights without it)") from None
        vocab_limit = report.vocab_limit
        stop_id = None  # the official models have no end-of-text convention (their generate never stops early)
    elif kind == "run":
        from ..train.run import open_run

        run = open_run(source)
        model = run.model
        if state_init is not None:  # the same weights under another initial state (configs are frozen)
            with torch.device("meta"):
                clone = Parcae(model.config.replace(state_init=state_init))
            clone.load_weights(model.state_dict(), device=next(model.parameters()).device)
            model = clone.eval()
        report = ConversionReport(config=model.config)
        tok = run.tokenizer if tokenizer else None
        tok_file = run.path / TOKENIZER_FILE
        vocab_limit, stop_id = None, (tok.bos_id if tok is not None else None)  # documents start with BOS
    else:
        raise ValueError(f"unknown source kind {kind!r}; choose 'parcae-lm' or 'run'.")
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {source} ({tok.vocab_size} ids) does not fit the model "
            f"({model.config.vocab_size} rows); pass --no-tokenizer."
        )
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    write_hf_config(destination, model.config)
    bos = pad = None
    if tok is not None:
        save_hf_tokenizer(tok, destination, model_max_length=model.config.max_seq_len, source=tok_file)
        bos, pad = tok.bos_id, tok.pad_id
        vocab_limit = min(vocab_limit or tok.vocab_size, tok.vocab_size)
    if vocab_limit is not None and vocab_limit >= model.config.vocab_size:
        vocab_limit = None
    # transformers' sampling defaults plus ours (`num_steps`, `vocab_limit`); unset ones are left out.
    generation = {"bos_token_id": bos, "eos_token_id": stop_id, "pad_token_id": pad, "vocab_limit": vocab_limit}
    generation["num_steps"] = model.config.mean_recurrence if model.config.is_looped else None
    text = json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2, sort_keys=True)
    (destination / HF_GENERATION_CONFIG).write_text(text + "\n", encoding="utf-8")
    if tok is None and tokenizer and kind == "parcae-lm":
        report.notes.append(f"no {TOKENIZER_FILE} in {source}: the output has no tokenizer")
    return report
