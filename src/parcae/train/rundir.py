"""The run directory (layout: README), claiming a directory for a new run, and the run's data."""

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..data.packing import val_batches
from ..data.shards import INDEX_FILE, ShardStore, is_prepared, prepare, val_split_note
from ..data.tokenizer import TOKENIZER_FILE, Tokenizer, get_tokenizer, load_tokenizer
from ..model.config import ParcaeConfig
from .budget import Echo
from .config import RUN_CONFIG, TrainConfig

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
# What a run writes into its directory: a directory holding any of these (but no run) is not trained into.
RUN_FILES = (RUN_CONFIG, TOKENIZER_FILE, "data", METRICS_FILE, "checkpoints", SUMMARY_FILE, "tensorboard", "wandb")


@dataclass
class RunDirClaim:
    """What starting a new run did to its directory, so that a start that fails can undo it."""

    run_dir: Path
    before: frozenset[str] | None  # its entries before (possibly unrelated files of the user's); None: not there
    aside: Path | None  # where --overwrite renamed a previous run to

    def abandon(self) -> None:
        """Remove what the failed start created; put a run that --overwrite renamed back in place."""
        with contextlib.suppress(OSError):
            if self.before is None:
                shutil.rmtree(self.run_dir)
            else:  # only what is new: the user's own files stay
                for name in set(os.listdir(self.run_dir)) - self.before:
                    path = self.run_dir / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if self.aside is not None:
            with contextlib.suppress(OSError):  # if it cannot move back, it stays where the message said
                self.aside.rename(self.run_dir)


def claim_run_dir(run_dir: Path, overwrite: bool, echo: Echo) -> RunDirClaim:
    """Check that a new run may use `run_dir` and create it. Nothing a user wrote is overwritten: a run there is
    refused unless `overwrite` (then renamed to RUN.old-K), files a run would write are refused outright."""
    aside = None
    if (run_dir / RUN_CONFIG).exists():
        if not overwrite:
            remedy = f"resume it with --resume {run_dir}, choose another --out, or pass --overwrite to move it aside"
            raise ValueError(f"{run_dir} already holds a run; {remedy}.")
        k = 1
        while (aside := run_dir.with_name(f"{run_dir.name}.old-{k}")).exists():
            k += 1
        try:
            run_dir.rename(aside)
        except OSError as err:
            raise ValueError(f"cannot move the run in {run_dir} aside: {err.strerror or err}.") from None
        echo(f"--overwrite: moved the previous run in {run_dir} to {aside} (delete it when no longer needed)")
    elif run_dir.is_dir():
        taken = ", ".join(sorted(name for name in RUN_FILES if (run_dir / name).exists()))
        if taken:
            clash = f"{run_dir} holds no run but has {taken}, which a run would overwrite"
            raise ValueError(f"{clash}; choose another --out.")
    claim = RunDirClaim(run_dir, None, aside)
    try:
        claim.before = frozenset(os.listdir(run_dir)) if run_dir.is_dir() else None
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write-test").write_text("")
        (run_dir / ".write-test").unlink()
    except OSError as err:
        if aside is not None:
            claim.abandon()
        raise ValueError(f"cannot write to --out {run_dir}: {err.strerror or err}.") from None
    return claim


def prepare_data(config: TrainConfig, model_config: ParcaeConfig, run_dir: Path, echo: Echo, progress: bool) -> Path:
    """The tokenized data directory (tokenizing a raw spec into the run once); saves the tokenizer."""
    given = is_prepared(config.data)  # else a raw spec, tokenized into the run
    data_dir = Path(config.data) if given else run_dir / "data"
    if not is_prepared(data_dir):
        tokenizer = get_tokenizer(config.tokenizer)
        echo(f"tokenizing {config.data} into {data_dir} (once per run) …")
        fields = dict(text_field=config.text_field, val_fraction=config.val_fraction, progress=progress)
        prepare(config.data, tokenizer, data_dir, **fields)
    tokenizer = load_tokenizer(data_dir)
    if given and config.tokenizer != "byte":
        requested = get_tokenizer(config.tokenizer)
        if requested.vocab_size != tokenizer.vocab_size or requested.kind != tokenizer.kind:
            raise ValueError(f"--tokenizer {config.tokenizer} differs from the one {data_dir} was prepared with.")
    if tokenizer.vocab_size > model_config.vocab_size:
        sizes = f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is"
        raise ValueError(f"{sizes} {model_config.vocab_size}; use --set vocab_size={tokenizer.vocab_size} (or larger).")
    # The shards must be intact and tokenized by this very tokenizer, or training would use wrong tokens.
    ours = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.pad_id)
    for split in ("train", "val") if (data_dir / "val" / INDEX_FILE).is_file() else ("train",):
        store = ShardStore.open(data_dir, split)
        store.verify()
        saved = (store.index.get("vocab_size"), store.index.get("bos_id"), store.index.get("pad_id"))
        if saved != ours:
            what = f"{data_dir / split} was tokenized with another tokenizer (vocab_size, bos, pad = {saved})"
            raise ValueError(f"{what} than {data_dir / TOKENIZER_FILE} {ours}; prepare the data again.")
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tokenizer-") as tmp:  # rewritten on every start
        os.replace(tokenizer.save(tmp), run_dir / TOKENIZER_FILE)
    return data_dir


def validation_batches(
    config: TrainConfig, data_dir: Path, seq_len: int, tokenizer: Tokenizer, echo: Echo
) -> tuple[list[tuple[Tensor, Tensor]], str | None]:
    """The validation batches (the same on every rank), and why there are none when there are none."""
    if config.eval_batches == 0:
        return [], "validation is off (eval_batches=0)."
    # No val split or an empty one: say why and what to do (a damaged split is an error: ShardStore.open).
    note = val_split_note(data_dir)
    if note is not None:
        echo(f"note: {note}")
        return [], note
    store = ShardStore.open(data_dir, "val")
    return list(val_batches(store, seq_len, config.batch_size, config.eval_batches, pad_id=tokenizer.pad_id)), None
