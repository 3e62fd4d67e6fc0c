"""Resuming a run, step for step as if never stopped: which checkpoint, the data at any world size, a new budget."""

import dataclasses
from pathlib import Path
from typing import Any

from ..data.packing import BestFitPacker, rank_documents
from .budget import Echo, budget_steps
from .checkpoint import CheckpointError, CheckpointManager
from .config import BUDGETS, RUN_CONFIG, TrainConfig


def checkpoint_to_resume(checkpoints: CheckpointManager, run_dir: Path, checkpoint: str | None) -> Path:
    """The named checkpoint, else the one `latest` names; neither there: an error naming the newest intact one."""
    path = checkpoints.latest() if checkpoint is None else checkpoints.root / checkpoint
    if path is not None and path.is_dir():
        return path  # verified when it is read
    if checkpoint is not None:
        raise CheckpointError(f"no checkpoint {checkpoint} in {checkpoints.root}")
    # No pointer (a crash before the first was written) or one naming nothing (damage): name the newest intact one.
    newest = checkpoints.newest_valid()
    if newest is None:
        why = "it stopped before its first one"
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from ({why}); start it again with --overwrite")
    problem = "has no checkpoint pointer (checkpoints/latest is missing)"
    if path is not None:
        problem = f"has a checkpoint pointer naming {path.name!r}, which does not exist"
    remedy = f"the newest intact checkpoint is {newest.name}: resume from it with --checkpoint {newest.name}"
    raise CheckpointError(f"{run_dir} {problem}; {remedy}")


def restore_data_position(
    packer: BestFitPacker, state: dict[str, Any], config: TrainConfig, echo: Echo
) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """The packer where the run left off; at another world size the global batch too, via grad_accum, if it can."""
    saved = state["packers"] if "packers" in state else [state["packer"]]
    note = restore_packer(packer, saved)
    if note is None:
        return config, []
    before, world_size = len(saved), packer.world_size
    rows = config.grad_accum * before
    if rows % world_size == 0:  # batch_size × grad_accum × world size stays what it was
        new = dataclasses.replace(config, grad_accum=rows // world_size)  # saved once resumed
        batch = f"grad_accum {config.grad_accum} → {new.grad_accum} keeps the global batch"
    else:
        new, now = config, config.batch_size * config.grad_accum * world_size
        batch = f"the global batch changes from {config.batch_size * rows} to {now} rows"
    echo(f"world size {before} → {world_size}: {batch}; {note}")
    event = {"event": "world_size", "step": state["progress"]["step"], "from": before, "to": world_size}
    return new, [{**event, "grad_accum": new.grad_accum, "data": note}]


def restore_packer(packer: BestFitPacker, saved: list[dict[str, Any]]) -> str | None:
    """Put this rank's `packer` where the run left the data (`saved`: every rank's state). At another world size W′
    each pending piece goes once to rank doc % W′, then every rank starts the next epoch of the new partition
    (docs/distributed.md). Returns a one-line note when the stream was re-derived, None when it continued."""
    if len(saved) == packer.world_size:
        packer.load_state_dict(saved[packer.rank])
        return None
    fresh = packer.state_dict()
    for state in saved:
        changed = [k for k in ("num_docs", "seq_len", "seed", "shuffle") if state["config"][k] != fresh["config"][k]]
        if changed:
            detail = ", ".join(f"{k} {state['config'][k]} → {fresh['config'][k]}" for k in changed)
            raise ValueError(f"Packer state was saved for a different stream ({detail}).")
    epoch = max(int(state["epoch"]) for state in saved)
    pending = sorted(tuple(piece) for state in saved for piece in state["buffer"])
    mine = [list(piece) for piece in pending if piece[0] % packer.world_size == packer.rank]
    # A cursor at the end of epoch E's permutation: the packer's next refill starts epoch E + 1.
    end = len(rank_documents(packer.store.num_docs, packer.rank, packer.world_size))
    packer.load_state_dict({**fresh, "epoch": epoch, "cursor": end, "buffer": mine})
    carried = f"{len(pending)} pending document pieces carried over, then epoch {epoch + 1} of the new partition"
    return f"data: resumed {len(saved)} rank(s) as {packer.world_size}: {carried}"


def with_budget(saved: TrainConfig, requested: TrainConfig | None) -> TrainConfig:
    """On resume, a newly given budget replaces the saved one; everything else stays as saved."""
    if requested is None or all(getattr(requested, b) is None for b in BUDGETS):
        return saved
    return dataclasses.replace(saved, steps=requested.steps, tokens=requested.tokens, minutes=requested.minutes)


def budget_change(
    saved: TrainConfig, config: TrainConfig, tokens_per_step: int, step: int, echo: Echo
) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """A new budget on resume keeps the warm-up (as a fraction of the budget it would move) and says what else moves."""
    (old, old_text), (new, new_text) = _budget(saved), _budget(config)
    if old == new:
        return config, []
    parts = [f"budget {old_text} → {new_text}"]
    old_steps, adjusted = budget_steps(saved, tokens_per_step), config
    if config.warmup_steps is not None:
        parts.append(f"warm-up stays {config.warmup_steps:,} steps")
    elif config.warmup > 0 and old_steps is not None:
        kept = max(1, round(config.warmup * old_steps))
        adjusted = dataclasses.replace(config, warmup_steps=kept)
        parts.append(f"warm-up kept at {kept:,} step{'' if kept == 1 else 's'} (warmup_steps={kept} in {RUN_CONFIG})")
    elif config.warmup > 0 and saved.minutes is not None and config.minutes is not None:
        fraction = config.warmup * saved.minutes / config.minutes  # the same seconds of the new budget
        if fraction + config.cooldown <= 1.0:
            adjusted = dataclasses.replace(config, warmup=fraction)
            parts.append(f"warm-up kept at {60 * config.warmup * saved.minutes:,.0f} s (warmup={fraction:.4g})")
        else:
            parts.append(f"warm-up is now {config.warmup:.0%} of the new budget (its old length does not fit)")
    elif config.warmup > 0:
        parts.append(f"warm-up is now {config.warmup:.0%} of the new budget")
    if config.schedule == "trapezoid" and config.cooldown > 0:
        now, was = (_budget_point(c, 1.0 - config.cooldown, tokens_per_step) for c in (config, saved))
        parts.append(f"the cooldown now starts at {now} (was {was})")
    elif config.schedule == "cosine":
        parts.append("the cosine decay now spans the new budget")
    echo("resumed with a new budget: " + "; ".join(parts) + ".")
    event = {"event": "budget", "step": step, "from": old, "to": new}
    return adjusted, [{**event, "warmup": adjusted.warmup, "warmup_steps": adjusted.warmup_steps}]


def _budget(config: TrainConfig) -> tuple[dict[str, float], str]:
    """The budget given (at most one of BUDGETS), and in words."""
    budget = {name: getattr(config, name) for name in BUDGETS if getattr(config, name) is not None}
    units = {"steps": "{:,} steps", "tokens": "{:,} tokens", "minutes": "{:g} min"}
    return budget, next((units[name].format(value) for name, value in budget.items()), "none")


def _budget_point(config: TrainConfig, fraction: float, tokens_per_step: int) -> str:
    steps = budget_steps(config, tokens_per_step)
    return f"{fraction * (config.minutes or 0.0):,.3g} min" if steps is None else f"step {round(fraction * steps):,}"
