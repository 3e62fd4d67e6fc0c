"""`parcae core`: the CORE task files from the public DCLM eval bundle, downloaded once, verified and cached.

`parcae core download` fetches `eval_bundle.zip` (BUNDLE_URL: the bundle of llm-foundry eval data that nanochat
and DCLM-style CORE evaluations use), or installs a local copy (`--from FILE.zip`, for offline machines), and
writes the task files our CORE loader (`parcae.eval.core`) reads into a cache folder; `parcae eval RUN --core`
(no value) evaluates on that folder.

What is verified, and when:
- The zip's sha256, against BUNDLE_SHA256 or `--sha256 HEX`, before anything is extracted. We had no network
  to hash the bundle ourselves: BUNDLE_SHA256 is the value that several independent public projects record for
  BUNDLE_URL. A mismatch stops the install (a damaged download, or a bundle changed upstream) and prints the
  file's hash, which `--sha256` accepts for a copy you trust.
- Each task file is present at its bundle path, its CRC-32 is checked as it is read from the zip, and every
  line parses in the format the loader expects for it (`core.read_examples`: multiple choice, schema or
  language modeling; a malformed line stops the install with file:line).
- The sha256, size and example count of every installed file go to DIR/manifest.json, written last. Every
  later use (`parcae eval --core`, `parcae core path`, `parcae core download` without --force) checks the
  files against it, so a changed or truncated file is an error, never a silent change of the scores; a
  verified folder is never downloaded again.
Not verified: that the bundle's tasks are byte-identical to any other copy (e.g. a shared offline subset).

Layout of DIR (`--dir`, default $PARCAE_CACHE/core, else $XDG_CACHE_HOME/parcae/core, else ~/.cache/parcae/core):
  DIR/*.jsonl         the 18 tasks of `core.CORE_TASKS` (CORE-18), flat, named as `core.find_tasks` expects
  DIR/extra/*.jsonl   hellaswag, squad, coqa: the CORE tasks outside CORE-18 (HellaSwag 0- and 10-shot share
                      one file). The loader reads their formats, but `CORE_TASKS` has no few-shot counts or
                      baselines for them, so they stay out of DIR (which keeps `--core` at CORE-18);
                      `--core DIR/extra` runs them 0-shot with chance baselines.
  DIR/manifest.json   source, bundle sha256, per-file sha256 / bytes / examples / format
The install is atomic: the zip is a temporary file next to DIR, the task files are extracted into a temporary
folder there and verified, and that folder is renamed to DIR; a failure leaves DIR as it was.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..data.shards import sha256_file

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
MANIFEST = "manifest.json"
EXTRA_DIR = "extra"
CACHED = "cached"  # `parcae eval --core` with no value (or this word): the verified cache
_DATA_PREFIX = "eval_bundle/eval_data"
_CHUNK = 1 << 20
# Where each task file lies in the bundle: eval_bundle/eval_data/<category>/<stem>.jsonl (the bundle's core.yaml).
BUNDLE_CATEGORIES: dict[str, str] = {
    "world_knowledge": "jeopardy_all bigbench_qa_wikidata arc_easy arc_challenge",
    "commonsense_reasoning": "copa commonsense_qa piqa openbook_qa",
    "language_understanding": "lambada_openai hellaswag winograd_wsc winogrande bigbench_language_identification",
    "symbolic_problem_solving": "bigbench_dyck_languages agi_eval_lsat_ar bigbench_cs_algorithms bigbench_operators "
    "bigbench_repeat_copy_logic",
    "reading_comprehension": "squad coqa boolq",
}
# The formats (core's kind names) of the bundle's CORE tasks that `core.CORE_TASKS` does not list.
EXTRA_KINDS = {"hellaswag.jsonl": "multiple_choice", "squad.jsonl": "language_modeling",
               "coqa.jsonl": "language_modeling"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- locations
def default_dir() -> Path:
    """The cache folder: $PARCAE_CACHE/core, else $XDG_CACHE_HOME/parcae/core, else ~/.cache/parcae/core."""
    if os.environ.get("PARCAE_CACHE"):
        return Path(os.environ["PARCAE_CACHE"]).expanduser() / "core"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "parcae" / "core"


def layout() -> Iterator[tuple[str, str, str]]:
    """(path in DIR, path in the zip, format) of every task file installed."""
    from .core import CORE_TASKS

    kinds = {spec.file: spec.kind for spec in CORE_TASKS}
    for category, stems in BUNDLE_CATEGORIES.items():
        for file in (f"{stem}.jsonl" for stem in stems.split()):
            relative = file if file in kinds else f"{EXTRA_DIR}/{file}"
            yield relative, f"{_DATA_PREFIX}/{category}/{file}", kinds.get(file) or EXTRA_KINDS[file]


def _redo(directory: Path) -> str:
    """The command that reinstalls `directory`."""
    where = "" if directory == default_dir() else f" --dir {directory}"
    return f"`parcae core download --force{where}`"


# ---------------------------------------------------------------------------------------------- verification
def verify(directory: str | Path) -> dict[str, Any]:
    """The manifest of an installed folder, after checking every file it lists (size and sha256)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no CORE task files in {directory}: run `parcae core download` (offline: "
                                f"`parcae core download --from eval_bundle.zip`) or pass --core DIR.")  # fmt: skip
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a CORE manifest ({err}); run {_redo(directory)}.") from None
    if set(files) != {relative for relative, _, _ in layout()}:
        raise ValueError(f"{directory} holds another set of task files than this version installs; "
                         f"run {_redo(directory)}.")  # fmt: skip
    for name, (size, sha256) in files.items():
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the installed CORE tasks; run {_redo(directory)}.")
        if file.stat().st_size != size or sha256_file(file) != sha256:
            raise ValueError(f"{file} changed after it was installed (sha256 mismatch); run {_redo(directory)}.")
    return manifest


def resolve_core_dir(value: str) -> Path:
    """The task folder of `parcae eval --core [DIR]`: the verified cache for no value (or 'cached'), else DIR,
    verified too when `parcae core download --dir DIR` installed it (it holds a manifest.json)."""
    if value == CACHED:
        directory = default_dir()
        verify(directory)
        return directory
    directory = Path(value)
    if (directory / MANIFEST).is_file():
        verify(directory)
    return directory


# ---------------------------------------------------------------------------------------------- installing
def _download(url: str, target: Path, *, timeout: float, progress: bool) -> None:
    """Stream `url` into the new file `target` (tqdm progress); any network failure is one OSError line."""
    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name or "download",
                      disable=not progress) as bar:  # fmt: skip
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError and timeouts are OSErrors
        reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        raise OSError(f"cannot download {url}: {reason}. Offline? Copy eval_bundle.zip from a machine that has it "
                      f"and run `parcae core download --from eval_bundle.zip`.") from None  # fmt: skip


def _extract(zip_path: Path, staging: Path) -> dict[str, dict[str, Any]]:
    """Copy every task file of the bundle into `staging`, checking CRC-32 and format; its manifest entries."""
    from .core import read_examples

    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{zip_path} is not a readable zip file ({err}); download the bundle again.") from None
    files: dict[str, dict[str, Any]] = {}
    with archive:
        members = set(archive.namelist())
        for relative, member, kind in layout():
            if member not in members:
                raise ValueError(f"{zip_path} has no {member}: not the CORE eval bundle, or an incomplete copy.")
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            try:
                with archive.open(member) as source, target.open("wb") as out:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
                raise ValueError(f"{zip_path}: {member} is corrupt ({err}); download the bundle again.") from None
            try:
                found, examples = read_examples(target)
            except (ValueError, UnicodeDecodeError) as err:  # name the member, not the temporary copy
                raise ValueError(f"{zip_path}: {str(err).replace(str(target), member)}") from None
            if found != kind:
                raise ValueError(f"{zip_path}: {member} holds {found} examples, expected {kind}.")
            files[relative] = {"sha256": digest.hexdigest(), "bytes": target.stat().st_size,
                               "examples": len(examples), "format": kind}  # fmt: skip
    return files


def _check_hex(sha256: str) -> str:
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}.")
    return sha256


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
    """Install the bundle's task files into `directory` (default `default_dir()`) and return it: from
    `source_zip` when given, else downloaded from `url`. A folder that verifies is kept as it is (no network)
    unless `force`. `sha256` replaces the pinned BUNDLE_SHA256."""
    directory = Path(directory) if directory is not None else default_dir()
    expected = _check_hex(sha256 or BUNDLE_SHA256)
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
            raise ValueError(f"{source} has sha256 {actual}, expected {expected}: a damaged download or a changed "
                             f"bundle; to accept this file, pass --sha256 {actual}.")  # fmt: skip
        staging = scratch / "core"
        staging.mkdir()
        files = _extract(zip_path, staging)
        manifest = {"source": source, "bundle_sha256": actual, "pinned": actual == BUNDLE_SHA256,
                    "installed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}  # fmt: skip
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if directory.exists():
            directory.rename(scratch / "previous")  # removed with the scratch folder
        staging.rename(directory)
    flat = sum(1 for name in files if "/" not in name)
    echo(f"installed {len(files)} verified task files in {directory} ({flat} CORE tasks; "
         f"{len(files) - flat} more in {directory / EXTRA_DIR})")  # fmt: skip
    return directory
