"""`parcae core download`: the CORE task files of the public DCLM eval bundle, downloaded once, verified, cached. Each
file's sha256 (DIR/manifest.json) is checked on every use: a changed file is an error, never silently other scores."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.shards import sha256_file

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# We had no network to hash the zip ourselves: the value several independent public projects record for it.
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
MANIFEST = "manifest.json"
EXTRA_DIR = "extra"
CACHED = "cached"  # `parcae eval --core` with no value (or this word): the verified cache
_CHUNK = 1 << 20
_OFFLINE = "`parcae core download --from eval_bundle.zip`"
# Where each task file lies in the bundle: eval_bundle/eval_data/<category>/<stem>.jsonl (the bundle's core.yaml).
BUNDLE_CATEGORIES: dict[str, str] = {
    "world_knowledge": "jeopardy_all bigbench_qa_wikidata arc_easy arc_challenge",
    "commonsense_reasoning": "copa commonsense_qa piqa openbook_qa",
    "language_understanding": "lambada_openai hellaswag winograd_wsc winogrande bigbench_language_identification",
    "symbolic_problem_solving": "bigbench_dyck_languages agi_eval_lsat_ar bigbench_cs_algorithms bigbench_operators "
    "bigbench_repeat_copy_logic",
    "reading_comprehension": "squad coqa boolq",
}
# The formats (core's kind names) of the bundle's CORE tasks that `core.CORE_TASKS` does not list: in DIR/extra.
EXTRA_KINDS = {
    "hellaswag.jsonl": "multiple_choice",
    "squad.jsonl": "language_modeling",
    "coqa.jsonl": "language_modeling",
}


def default_dir() -> Path:
    """The cache folder: $PARCAE_CACHE/core, else $XDG_CACHE_HOME/parcae/core, else ~/.cache/parcae/core."""
    if os.environ.get("PARCAE_CACHE"):
        return Path(os.environ["PARCAE_CACHE"]).expanduser() / "core"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "parcae" / "core"


def layout() -> Iterator[tuple[str, str, str]]:
    """(path in DIR, path in the zip, format) of every task file installed."""
    from .core import CORE_TASKS

    kinds = {spec.file: spec.kind for spec in CORE_TASKS}
    for category, stems in BUNDLE_CATEGORIES.items():
        for file in (f"{stem}.jsonl" for stem in stems.split()):
            relative = file if file in kinds else f"{EXTRA_DIR}/{file}"
            yield relative, f"eval_bundle/eval_data/{category}/{file}", kinds.get(file) or EXTRA_KINDS[file]


def verify(directory: str | Path) -> dict[str, Any]:
    """The manifest of an installed folder, after checking every file it lists (size and sha256)."""
    directory = Path(directory)
    where = "" if directory == default_dir() else f" --dir {directory}"
    path, redo = directory / MANIFEST, f"`parcae core download --force{where}`"  # the command that reinstalls
    if not path.is_file():
        hint = f"run `parcae core download` (offline: {_OFFLINE}) or pass --core DIR"
        raise FileNotFoundError(f"no CORE task files in {directory}: {hint}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CORE manifest ({err}); run {redo}.") from None
    if set(files) != {relative for relative, _, _ in layout()}:
        raise ValueError(f"{directory} holds another set of task files than this version installs; run {redo}.")
    for name, (size, sha256) in files.items():
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the installed CORE tasks; run {redo}.")
        if file.stat().st_size != size or sha256_file(file) != sha256:
            raise ValueError(f"{file} changed after it was installed (sha256 mismatch); run {redo}.")
    return manifest


def resolve_core_dir(value: str) -> Path:
    """The task folder of `--core [DIR]`: the verified cache for 'cached', else DIR (verified if it has a manifest)."""
    directory = default_dir() if value == CACHED else Path(value)
    if value == CACHED or (directory / MANIFEST).is_file():
        verify(directory)
    return directory


def _download(url: str, target: Path, *, timeout: float, progress: bool) -> None:
    """Stream `url` into the new file `target` (tqdm progress); any network failure is one OSError line."""
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            name = Path(url).name or "download"
            with tqdm.wrapattr(out, "write", total=total, desc=name, disable=not progress) as sink:
                shutil.copyfileobj(response, sink, _CHUNK)
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError and timeouts are OSErrors
        reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        hint = f"Offline? Copy eval_bundle.zip from a machine that has it and run {_OFFLINE}."
        raise OSError(f"cannot download {url}: {reason}. {hint}") from None


def _extract(zip_path: Path, staging: Path) -> dict[str, dict[str, Any]]:
    """Copy every task file of the bundle into `staging`, checking CRC-32 and format; its manifest entries."""
    from .core import read_examples

    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{zip_path} is not a readable zip file ({err}); download the bundle again.") from None
    files: dict[str, dict[str, Any]] = {}
    with archive:
        for relative, member, kind in layout():
            if member not in archive.namelist():
                raise ValueError(f"{zip_path} has no {member}: not the CORE eval bundle, or an incomplete copy.")
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:  # reading the member to its end checks its CRC-32
                with archive.open(member) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                raise ValueError(f"{zip_path}: {member} is corrupt ({err}); download the bundle again.") from None
            try:
                found, examples = read_examples(target)
            except (ValueError, UnicodeDecodeError) as err:  # name the member, not the temporary copy
                raise ValueError(f"{zip_path}: {str(err).replace(str(target), member)}") from None
            if found != kind:
                raise ValueError(f"{zip_path}: {member} holds {found} examples, expected {kind}.")
            size = target.stat().st_size
            files[relative] = dict(sha256=sha256_file(target), bytes=size, examples=len(examples), format=kind)
    return files


def download(
    directory: str | Path | None = None,
    *,
    source_zip: str | Path | None = None,
    url: str = BUNDLE_URL,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Install the task files of `source_zip`, else of a download from `url`, into `directory` (default
    `default_dir()`), atomically; a folder that verifies is kept unless `force`. `sha256` replaces BUNDLE_SHA256."""
    directory = Path(directory) if directory is not None else default_dir()
    expected = (sha256 or BUNDLE_SHA256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"--sha256 must be 64 hexadecimal digits, got {expected!r}.")
    ours = (directory / MANIFEST).is_file()
    if ours and not force:
        try:
            verify(directory)
        except (ValueError, OSError) as err:
            echo(f"reinstalling: {err}")
        else:
            echo(f"CORE task files verified in {directory}; nothing downloaded (--force reinstalls)")
            return directory
    if not ours and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and was not made by `parcae core download`; choose another --dir.")
    if source_zip is not None and not Path(source_zip).is_file():
        raise FileNotFoundError(f"{source_zip} is not a file (expected a copy of eval_bundle.zip).")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits next to DIR (same file system), so the final renames are atomic.
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}-", dir=directory.parent) as scratch:
        scratch = Path(scratch)
        if source_zip is not None:
            zip_path, source = Path(source_zip), str(Path(source_zip).resolve())
        else:
            zip_path, source = scratch / "eval_bundle.zip", url
            echo(f"downloading {url}")
            _download(url, zip_path, timeout=timeout, progress=progress)
        actual = sha256_file(zip_path)
        if actual != expected:
            hint = f"a damaged download or a changed bundle; to accept this file, pass --sha256 {actual}"
            raise ValueError(f"{source} has sha256 {actual}, expected {expected}: {hint}.")
        staging = scratch / "core"  # `_extract` makes it
        files = _extract(zip_path, staging)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = dict(source=source, bundle_sha256=actual, pinned=actual == BUNDLE_SHA256, installed=now, files=files)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if directory.exists():
            directory.rename(scratch / "previous")  # removed with the scratch folder
        staging.rename(directory)
    flat = sum(1 for name in files if "/" not in name)
    extra = f"{len(files) - flat} more in {directory / EXTRA_DIR}"
    echo(f"installed {len(files)} verified task files in {directory} ({flat} CORE tasks; {extra})")
    return directory
