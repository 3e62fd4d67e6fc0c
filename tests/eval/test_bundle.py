"""`parcae core`: installing the CORE task files from a (small, locally built) eval bundle, the verified cache,
and `parcae eval --core` finding it. Nothing here touches the network: urlopen is replaced where it could run."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from parcae.cli import build_parser, main
from parcae.eval import bundle
from parcae.eval.core import CORE_TASKS, find_tasks, load_task

SHARED_CORE = Path(__file__).resolve().parents[3] / "shared" / "eval" / "core"
LINES_PER_TASK = 8  # the layout is under test, not the data: small copies keep the zip tiny
# The three CORE tasks outside the shared subset, in their formats (multiple choice, language modeling).
EXTRA_LINES = {
    "hellaswag.jsonl": {"query": "She picks up the ball and", "choices": ["throws it.", "eats it."], "gold": 0},
    "squad.jsonl": {"context": "Paris is the capital of France. Q: What is the capital of France? A:",
                    "continuation": "Paris"},
    "coqa.jsonl": {"context": "Tom has a red car. Q: What colour is the car? A:", "continuation": "red"},
}  # fmt: skip

needs_shared = pytest.mark.skipif(not SHARED_CORE.is_dir(), reason="../shared/eval/core is not present")


def bundle_bytes(*, leave_out: str | None = None, replace: dict[str, bytes] | None = None) -> bytes:
    """A zip with the eval bundle's layout: the shared task files (first lines) + the three extra tasks."""
    replace = replace or {}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")  # other members are ignored
        for _, member, _ in bundle.layout():
            name = Path(member).name
            if name == leave_out:
                continue
            if name in replace:
                data = replace[name]
            elif name in EXTRA_LINES:
                data = "".join(json.dumps(EXTRA_LINES[name]) + "\n" for _ in range(LINES_PER_TASK)).encode()
            else:
                data = b"".join((SHARED_CORE / name).read_bytes().splitlines(keepends=True)[:LINES_PER_TASK])
            archive.writestr(member, data)
    return buffer.getvalue()


def write_zip(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache lives in tmp_path, and any attempt to reach the network fails as it does offline."""
    monkeypatch.setenv("PARCAE_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tmp_path / "cache" / "core"


@needs_shared
def test_from_a_local_zip_installs_core18_flat_and_the_loader_reads_it(tmp_path: Path, cache: Path, capsys) -> None:
    sha = write_zip(tmp_path / "eval_bundle.zip", bundle_bytes())
    assert main(["core", "download", "--from", str(tmp_path / "eval_bundle.zip"), "--sha256", sha]) == 0
    assert bundle.default_dir() == cache
    # The loader works unchanged on the folder: exactly the 18 CORE tasks, in CORE order.
    specs = find_tasks(cache)
    assert [s.name for s in specs] == [s.name for s in CORE_TASKS]
    assert all(len(load_task(spec, cache).examples) == LINES_PER_TASK for spec in specs)
    # HellaSwag, SQuAD and CoQA are installed beside it, readable by the same loader.
    assert sorted(s.file for s in find_tasks(cache / "extra")) == sorted(EXTRA_LINES)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["bundle_sha256"] == sha and manifest["pinned"] is False and len(manifest["files"]) == 21
    arc = hashlib.sha256((cache / "arc_easy.jsonl").read_bytes()).hexdigest()
    assert manifest["files"]["arc_easy.jsonl"] == {"sha256": arc, "bytes": (cache / "arc_easy.jsonl").stat().st_size,
                                                   "examples": LINES_PER_TASK, "format": "multiple_choice"}  # fmt: skip
    capsys.readouterr()
    assert main(["core", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(cache)
    # --dir installs elsewhere; `--core DIR` then verifies that folder too.
    other = tmp_path / "elsewhere"
    assert main(["core", "download", "--from", str(tmp_path / "eval_bundle.zip"), "--sha256", sha,
                 "--dir", str(other)]) == 0  # fmt: skip
    assert bundle.resolve_core_dir(str(other)) == other
    (other / "copa.jsonl").write_text((other / "copa.jsonl").read_text()[:-20])
    with pytest.raises(ValueError, match=r"copa.jsonl changed after it was installed.*--dir"):
        bundle.resolve_core_dir(str(other))


@needs_shared
def test_a_verified_cache_is_reused_and_a_damaged_one_is_reported(tmp_path: Path, cache: Path, capsys) -> None:
    sha = write_zip(tmp_path / "b.zip", bundle_bytes())
    assert main(["core", "download", "--from", str(tmp_path / "b.zip"), "--sha256", sha, "--no-progress"]) == 0
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    # Verified: nothing is downloaded (urlopen would fail) and nothing is rewritten.
    assert main(["core", "download"]) == 0
    assert "nothing downloaded" in capsys.readouterr().out
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp
    # A changed file is an error on use, and `download` wants to fetch it again: offline, one clear line.
    (cache / "boolq.jsonl").write_bytes(b"{}\n")
    assert main(["core", "path"]) == 2
    assert "boolq.jsonl changed after it was installed" in capsys.readouterr().err
    assert main(["core", "download", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot download" in err and "--from eval_bundle.zip" in err
    # --force with a local copy reinstalls.
    assert main(["core", "download", "--force", "--from", str(tmp_path / "b.zip"), "--sha256", sha]) == 0
    assert main(["core", "path"]) == 0


@needs_shared
def test_the_pinned_checksum_is_enforced(tmp_path: Path, cache: Path, capsys) -> None:
    sha = write_zip(tmp_path / "b.zip", bundle_bytes())
    assert main(["core", "download", "--from", str(tmp_path / "b.zip")]) == 2  # not the real bundle's hash
    err = capsys.readouterr().err
    assert f"has sha256 {sha}, expected {bundle.BUNDLE_SHA256}" in err and f"--sha256 {sha}" in err
    assert not cache.exists()  # nothing half-installed
    assert main(["core", "download", "--from", str(tmp_path / "b.zip"), "--sha256", "abc"]) == 2
    assert "64 hexadecimal digits" in capsys.readouterr().err


@needs_shared
def test_a_corrupt_zip_is_one_clear_error(tmp_path: Path, cache: Path, capsys) -> None:
    data = bundle_bytes()
    sha = write_zip(tmp_path / "truncated.zip", data[: len(data) // 2])
    assert main(["core", "download", "--from", str(tmp_path / "truncated.zip"), "--sha256", sha]) == 2
    assert "is not a readable zip file" in capsys.readouterr().err
    # A flipped byte inside a stored member: its CRC-32 no longer matches.
    text = b"".join((SHARED_CORE / "piqa.jsonl").read_bytes().splitlines(keepends=True)[:LINES_PER_TASK])
    at = data.index(text) + len(text) // 2
    sha = write_zip(tmp_path / "flipped.zip", data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    assert main(["core", "download", "--from", str(tmp_path / "flipped.zip"), "--sha256", sha]) == 2
    err = capsys.readouterr().err
    assert "commonsense_reasoning/piqa.jsonl is corrupt" in err and "CRC" in err
    assert not cache.exists()


@needs_shared
def test_a_missing_or_malformed_task_file_is_one_clear_error(tmp_path: Path, cache: Path, capsys) -> None:
    sha = write_zip(tmp_path / "missing.zip", bundle_bytes(leave_out="winogrande.jsonl"))
    assert main(["core", "download", "--from", str(tmp_path / "missing.zip"), "--sha256", sha]) == 2
    assert "has no eval_bundle/eval_data/language_understanding/winogrande.jsonl" in capsys.readouterr().err
    bad = b'{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"], "gold": 3}\n'
    sha = write_zip(tmp_path / "bad.zip", bundle_bytes(replace={"copa.jsonl": bad}))
    assert main(["core", "download", "--from", str(tmp_path / "bad.zip"), "--sha256", sha]) == 2
    assert 'eval_data/commonsense_reasoning/copa.jsonl:2: "gold" must be' in capsys.readouterr().err
    lm = b'{"context": "a", "continuation": "b"}\n'
    sha = write_zip(tmp_path / "kind.zip", bundle_bytes(replace={"hellaswag.jsonl": lm}))
    assert main(["core", "download", "--from", str(tmp_path / "kind.zip"), "--sha256", sha]) == 2
    assert "hellaswag.jsonl holds language_modeling examples, expected multiple_choice" in capsys.readouterr().err
    assert not cache.exists()
    assert main(["core", "download", "--from", str(tmp_path / "nowhere.zip")]) == 2
    assert "is not a file" in capsys.readouterr().err


@needs_shared
def test_eval_core_without_a_value_uses_the_verified_cache(tmp_path: Path, cache: Path, capsys) -> None:
    assert build_parser().parse_args(["eval", "RUN", "--core"]).core == bundle.CACHED
    assert build_parser().parse_args(["eval", "RUN", "--core", "some/dir"]).core == "some/dir"
    missing_run = str(tmp_path / "no-run")
    # No cache yet: the task files are resolved before the model is loaded, so the error says how to get them.
    assert main(["eval", missing_run, "--core", "--tasks", "copa"]) == 2
    assert "parcae core download" in capsys.readouterr().err
    sha = write_zip(tmp_path / "b.zip", bundle_bytes())
    assert main(["core", "download", "--from", str(tmp_path / "b.zip"), "--sha256", sha]) == 0
    capsys.readouterr()
    # With the cache, the tasks resolve and evaluation gets as far as the (missing) run.
    assert main(["eval", missing_run, "--core", "--tasks", "copa"]) == 2
    assert f"{missing_run} is not a directory" in capsys.readouterr().err
    assert main(["eval", missing_run, "--core", "cached", "--tasks", "nonsense"]) == 2
    assert f"the tasks in {cache} are: jeopardy" in capsys.readouterr().err


def test_the_layout_covers_every_core_task() -> None:
    relative = {path for path, _, _ in bundle.layout()}
    assert {spec.file for spec in CORE_TASKS} | {f"extra/{name}" for name in EXTRA_LINES} == relative
    assert len(relative) == 21  # the 22 CORE tasks; HellaSwag 0- and 10-shot share one file
