"""Atomic, verifiable checkpoints (docs/reliability.md): `step-XXXXXXXX/` holds a `save_pretrained` directory, the
optimiser (safetensors + JSON) and `trainer_state.json` with every file's SHA-256. Nothing is unpickled."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.optim import Optimizer

from ..data.shards import sha256_file
from ..model.parcae import Parcae

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, …); earlier checkpoints are untouched."""


def _state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of the trainer state's canonical JSON (what `verify` recomputes); floats round-trip exactly."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Snapshot:
    """A checkpoint in memory: trainer state, weights as saved (the tied head once), optimiser state dict."""

    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 3) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def save(self, step: int, model: Parcae, optimizer: Optimizer | dict[str, Any], state: dict[str, Any]) -> Path:
        """Write `step` hidden, fsync, rename, move `latest`: a crash (even SIGKILL) or an OSError loses only it."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{_PREFIX}{step:08d}"
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        try:
            self._write(tmp, final, step, model, optimizer, state)
        except (OSError, SafetensorError) as err:  # safetensors reports I/O errors (ENOSPC, EFBIG) as its own type
            shutil.rmtree(tmp, ignore_errors=True)
            latest = self.latest()
            kept = f"{latest.name} is intact and still the latest" if latest else "no earlier checkpoint exists"
            where = f"{final.name} in {self.root}: {getattr(err, 'strerror', None) or err}"
            raise CheckpointWriteError(f"could not write checkpoint {where}; {kept}") from err
        self._prune()
        return final

    def _write(self, tmp: Path, dest: Path, step: int, model: Parcae, optimizer: Optimizer | dict, state: dict) -> None:
        """Every file into `tmp`, fsynced (manifest and state digest last), then `tmp` renamed to `dest` → `latest`."""
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier failed write of this process
        tmp.mkdir()
        model.save_pretrained(tmp)
        # The optimiser state's tensors go to safetensors, the rest (param groups, scalars) to JSON.
        saved = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in saved["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": saved["param_groups"], "scalars": scalars}))
        payload = {**state, "step": step, "manifest": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}}
        with (tmp / STATE_FILE).open("w") as handle:
            json.dump({**payload, "state_sha256": _state_digest(payload)}, handle, indent=1)
        for path in tmp.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if dest.exists():  # a re-save of a step, after resuming from an earlier checkpoint: replace it whole
            if self.latest() == dest:
                # Never leave `latest` naming a directory being replaced: point it at an older intact one meanwhile.
                older = self.newest_valid(before=dest)
                if older is not None:
                    write_atomic(self.root / LATEST, older.name + "\n")
            self._discard(dest)
        os.replace(tmp, dest)
        _fsync_dir(self.root)
        write_atomic(self.root / LATEST, dest.name + "\n")

    def _discard(self, path: Path) -> None:
        """Delete a checkpoint directory: renamed to a hidden name first, so no half-deleted `step-*` remains."""
        trash = path.with_name(f".{path.name}.trash-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        for stale in self.root.glob(f".{_PREFIX}*"):  # left by a crash: partial writes and half-deleted trash
            shutil.rmtree(stale, ignore_errors=True)
        latest = self.latest()
        for path in self.list()[: -self.keep]:
            if path != latest:
                with contextlib.suppress(OSError):
                    self._discard(path)

    def list(self) -> list[Path]:
        """Checkpoint directories by step (each complete when written; `verify` checks it still is)."""
        return sorted(p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir())

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()  # a damaged pointer names nothing real
        return self.root / name if name else None

    def verify(self, path: Path) -> dict[str, Any]:
        """The trainer state of a complete, intact checkpoint, else CheckpointError saying what is wrong."""
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete ({STATE_FILE} missing)")
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("manifest", {}), dict):
            raise CheckpointError(f"checkpoint {path} has a corrupt {STATE_FILE}")
        own = state.pop("state_sha256", None)  # absent in checkpoints written before it was added
        if own is not None and own != _state_digest(state):
            raise CheckpointError(f"checkpoint {path} is corrupt ({STATE_FILE} fails its SHA-256 check)")
        for name, digest in state.get("manifest", {}).items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint {path} is missing {name}")
            if sha256_file(file) != digest:
                raise CheckpointError(f"checkpoint {path} is corrupt ({name} fails its SHA-256 check)")
        return state

    def newest_valid(self, before: Path | None = None) -> Path | None:
        for path in reversed(self.list()):
            if before is None or path.name < before.name:
                with contextlib.suppress(CheckpointError):
                    self.verify(path)
                    return path
        return None

    def read(self, path: Path, device: str | torch.device = "cpu") -> Snapshot:
        """Verify, then read a checkpoint's files into memory (tensors on `device`)."""
        try:
            state = self.verify(path)
        except CheckpointError as err:
            fallback = self.newest_valid(before=path)
            if fallback is None:
                raise
            hint = f"the previous checkpoint {fallback} is intact: resume from it with --checkpoint {fallback.name}"
            raise CheckpointError(f"{err}; {hint}") from None
        weights = load_file(str(path / "model.safetensors"), device=str(device))
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer: dict[int, dict[str, Any]] = {}
        for name, tensor in load_file(str(path / "optimizer.safetensors"), device=str(device)).items():
            index, key = name.split(".", 1)
            optimizer.setdefault(int(index), {})[key] = tensor
        for index, entries in meta.get("scalars", {}).items():
            optimizer.setdefault(int(index), {}).update(entries)
        return Snapshot(state, weights, {"state": optimizer, "param_groups": meta["param_groups"]})

    def load(self, path: Path, model: Parcae, optimizer: Optimizer) -> dict[str, Any]:
        """Verify, then restore model and optimiser in place; returns the trainer state."""
        snapshot = self.read(path, device=next(model.parameters()).device)
        model.load_weights(snapshot.weights)
        try:
            optimizer.load_state_dict(snapshot.optimizer)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} does not match this optimizer: {err}") from None
        return snapshot.state
