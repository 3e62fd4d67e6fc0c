"""The Hugging Face layout of a model directory, and `parcae convert` into it (core dependencies: no transformers)."""

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
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def byte_level_tokenizer_json() -> str:
    """Our byte tokenizer as an HF tokenizer.json: byte-level BPE, no merges (id b = byte b, 256-258 the specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256), chr(257), …
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    alphabet = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    hf = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIALS))
    return hf.to_str(pretty=True)


def save_hf_tokenizer(
    tokenizer: Any, directory: str | Path, *, model_max_length: int, source: Path | None = None
) -> None:
    """tokenizer.json (BPE: copied from `source`; bytes: byte-level BPE) and tokenizer_config.json for AutoTokenizer.
    It adds no BOS (prepend `bos_token_id` as our data does); a literal "<|bos|>" in a text is text, as in ours."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / TOKENIZER_FILE
    if tokenizer.kind == "byte":
        target.write_text(byte_level_tokenizer_json(), encoding="utf-8")
    elif source is None:
        tokenizer.save(directory)
    elif source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    settings = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS, pad_token=PAD)
    settings |= dict(model_max_length=model_max_length, clean_up_tokenization_spaces=False, split_special_tokens=True)
    (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    kind: str = "parcae-lm",
    state_init: str | None = None,
    tokenizer: bool = True,
) -> ConversionReport:
    """`parcae convert`: an official checkpoint ('parcae-lm') or our run/saved model ('run') → a new model directory."""
    source, destination = Path(source), Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(f"{destination} already exists and is not empty; choose a new output directory.")
    tok, stop_id = None, None  # the official models have no end-of-text convention (their generate never stops early)
    if kind == "parcae-lm":
        model, report = load_parcae_lm(source, state_init=state_init)
        tok_file = source / TOKENIZER_FILE
        if tokenizer and not tok_file.is_file():
            report.notes.append(f"no {TOKENIZER_FILE} in {source}: the output has no tokenizer")
        elif tokenizer:
            try:
                tok = load_tokenizer(tok_file)
            except ValueError as err:
                raise ValueError(f"{err} (pass --no-tokenizer to convert the weights without it)") from None
    elif kind == "run":
        from ..train.run import open_run

        run = open_run(source)
        model, tok_file = run.model, run.path / TOKENIZER_FILE
        if state_init is not None:  # the same weights under another initial state (configs are frozen)
            with torch.device("meta"):
                clone = Parcae(model.config.replace(state_init=state_init))
            clone.load_weights(model.state_dict(), device=next(model.parameters()).device)
            model = clone.eval()
        report = ConversionReport(config=model.config)
        tok = run.tokenizer if tokenizer else None
        stop_id = tok.bos_id if tok is not None else None  # documents start with BOS
    else:
        raise ValueError(f"unknown source kind {kind!r}; choose 'parcae-lm' or 'run'.")
    cfg, vocab_limit = model.config, report.vocab_limit
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        fit = f"({tok.vocab_size} ids) does not fit the model ({cfg.vocab_size} rows)"
        raise ValueError(f"the tokenizer in {source} {fit}; pass --no-tokenizer.")
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    write_hf_config(destination, cfg)
    generation = {"eos_token_id": stop_id, "num_steps": cfg.mean_recurrence if cfg.is_looped else None}
    if tok is not None:
        save_hf_tokenizer(tok, destination, model_max_length=cfg.max_seq_len, source=tok_file)
        generation |= {"bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id}
        vocab_limit = min(vocab_limit or tok.vocab_size, tok.vocab_size)
    generation["vocab_limit"] = vocab_limit if vocab_limit is not None and vocab_limit < cfg.vocab_size else None
    text = json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2, sort_keys=True)
    (destination / HF_GENERATION_CONFIG).write_text(text + "\n", encoding="utf-8")  # sampling: transformers' defaults
    return report
