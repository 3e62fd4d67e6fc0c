"""Distributed training on the CPU (gloo, 2 processes started as torchrun would, through RANK/WORLD_SIZE/…):
2-rank DDP reproduces one process with the same global batch, FSDP2 matches DDP, ranks partition the data,
all ranks skip a non-finite step together, and runs resume exactly at the same world size and across sizes.

One spawn of two worker processes runs every multi-process scenario (starting Python and torch dominates the
cost); the tests then check their run directories against single-process runs made here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from parcae import Parcae, get_preset
from parcae.cli import main
from parcae.data.packing import BestFitPacker
from parcae.data.shards import MemoryStore, prepare
from parcae.data.tokenizer import get_tokenizer
from parcae.train.config import TrainConfig
from parcae.train.distributed import InterleavedPacker
from parcae.train.resume import restore_packer
from parcae.train.trainer import Trainer

WORLD = 2
STEPS = 4
# Fixed depths and a zero h₀: nothing depends on the rank or micro-step, so a 2-rank run and one process that
# sees the same micro-batches must agree to rounding.
EXACT = ["--set", "depth_sampling=fixed", "--set", "state_init=zero"]
TRAIN = ["--seq-len", "32", "--batch-size", "2", "--no-progress"]
for _setting in ("eval_every=2", "eval_batches=3", "eval_depths=[1, 4]", "log_every=1", "lr=3e-3", "muon_lr=3e-3"):
    TRAIN += ["--set", _setting]
WORDS = ["the", "loop", "state", "decays", "while", "a", "prelude", "injects", "each", "token", "and", "the", "coda"]


def train_config(data: Path, **fields) -> TrainConfig:
    base = dict(data=str(data), seq_len=32, batch_size=2, eval_every=2, eval_batches=3, eval_depths=(1, 4),
                log_every=1, lr=3e-3, muon_lr=3e-3)  # fmt: skip
    return TrainConfig(**{**base, **fields})


def exact_model():
    return get_preset("parcae-micro", depth_sampling="fixed", state_init="zero")


def cli(*argv: str) -> None:
    assert main(["--debug", "train", *argv]) == 0


def entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in entries(run) if "loss" in e and "event" not in e}


def val_losses(run: Path) -> dict[int, dict[str, float]]:
    return {e["step"]: e["val_loss"] for e in entries(run) if e.get("event") == "val"}


def digest(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for tensor in model.state_dict().values():
        hasher.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


# ---------------------------------------------------------------------- the two worker processes
def _worker(rank: int, root: str, ports: list[int]) -> None:
    """Rank `rank` of every 2-process scenario, each a fresh process group on its own port (as torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    run, data, port = Path(root), str(Path(root) / "data"), iter(ports)

    def launch() -> None:
        os.environ["MASTER_PORT"] = str(next(port))

    common = ["--preset", "parcae-micro", "--data", data, *TRAIN]
    launch()
    cli(*common, *EXACT, "--steps", str(STEPS), "--parallel", "ddp", "--out", str(run / "ddp"))
    launch()
    cli(*common, *EXACT, "--steps", str(STEPS), "--parallel", "fsdp", "--out", str(run / "fsdp"))

    def stop_on_rank_1(step: int, _model: torch.nn.Module) -> None:
        if step == 1 and rank == 1:  # like a SIGTERM that reaches one rank: both must stop after step 2
            split.request_stop()

    launch()
    split = Trainer(exact_model(), train_config(Path(data), steps=STEPS), run / "split", progress_bar=False,
                    echo=lambda _: None, on_backward=stop_on_rank_1)  # fmt: skip
    assert split.train()["steps"] == 2
    launch()
    cli("--resume", str(run / "split"), "--no-progress")
    launch()  # a single-process run (grad_accum 2) continued by two FSDP ranks
    cli("--resume", str(run / "single"), "--steps", "5", "--parallel", "fsdp", "--no-progress")

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 1 and rank == 1:  # only one rank sees a non-finite gradient
            model.embed.weight.grad.fill_(float("nan"))

    launch()
    trainer = Trainer(get_preset("parcae-micro"), train_config(Path(data), steps=3, lockstep=True), run / "poison",
                      progress_bar=False, echo=lambda _: None, on_backward=poison)  # fmt: skip
    sampler = trainer.model.depth_sampler
    depths = sampler.sample(8, 32, step=7).total.tolist()
    summary = trainer.train()
    report = {"skipped": summary["skipped_steps"], "digest": digest(trainer.model), "depths": depths,
              "sampler_rank": sampler.rank}  # fmt: skip
    (run / "poison" / f"rank{rank}.json").write_text(json.dumps(report))


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny text corpus, prepared once; a single-process run for the workers to resume; then the workers."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        words = rng.choice(WORDS, size=int(rng.integers(20, 120)))
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + " ".join(words) + ".\n")
    prepare(str(corpus), get_tokenizer("byte"), root / "data", val_fraction=0.15, progress=False)
    Trainer(exact_model(), train_config(root / "data", steps=3, grad_accum=2), root / "single", progress_bar=False,
            echo=lambda _: None).train()  # fmt: skip

    ports = _free_ports(6)
    context = mp.start_processes(_worker, args=(str(root), ports), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300  # about a minute normally: a stuck collective must not hang the suite
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish within 5 minutes (a collective is stuck?)")
    return root


# ---------------------------------------------------------------------- the tests
def test_two_rank_ddp_reproduces_one_process_with_the_same_global_batch(root: Path, tmp_path: Path) -> None:
    """One process, grad_accum 2, fed rank 0's then rank 1's micro-batch, takes the steps of the 2-rank run."""
    trainer = Trainer(exact_model(), train_config(root / "data", steps=STEPS, grad_accum=WORLD), tmp_path / "one",
                      progress_bar=False, echo=lambda _: None)  # fmt: skip
    trainer.packer = InterleavedPacker([trainer.rank_packer(r, WORLD) for r in range(WORLD)])
    trainer.train()
    one, two = losses(tmp_path / "one"), losses(root / "ddp")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-5, (one, two)
    assert one[STEPS] < one[1] - 0.5  # it learns: the comparison is not between two constant curves
    val_one, val_two = val_losses(tmp_path / "one"), val_losses(root / "ddp")
    assert sorted(val_one) == sorted(val_two) == [2, 4]
    assert all(abs(val_one[s][d] - val_two[s][d]) <= 1e-5 for s in val_one for d in val_one[s])
    start = next(e for e in entries(root / "ddp") if e.get("event") == "start")
    assert start["world_size"] == WORLD and start["tokens_per_step"] == 2 * 32 * WORLD


def test_fsdp_matches_ddp_and_writes_the_same_checkpoint_format(root: Path) -> None:
    ddp, fsdp = losses(root / "ddp"), losses(root / "fsdp")
    assert sorted(ddp) == sorted(fsdp) and max(abs(ddp[s] - fsdp[s]) for s in ddp) <= 1e-5, (ddp, fsdp)
    step = f"checkpoints/step-{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(root / "ddp" / step / name), load_file(root / "fsdp" / step / name)
        assert sorted(a) == sorted(b)
        # Reduction order differs between DDP and FSDP; Muon's orthogonalisation can amplify that float noise
        # to ~1e-5 in an element (seen with the current data stream), far below any real divergence.
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a), name
    assert json.loads((root / "ddp" / step / "optimizer.json").read_text()) == json.loads(
        (root / "fsdp" / step / "optimizer.json").read_text()
    )
    Parcae.from_pretrained(root / "fsdp" / step)  # a plain save_pretrained directory


def test_ranks_partition_the_documents(root: Path) -> None:
    state = json.loads((root / "ddp" / f"checkpoints/step-{STEPS:08d}" / "trainer_state.json").read_text())
    packers = state["packers"]
    assert [(p["config"]["rank"], p["config"]["world_size"]) for p in packers] == [(0, 2), (1, 2)]
    for rank, packer in enumerate(packers):  # every pending piece is of a document the rank owns
        assert packer["buffer"] and all(doc % WORLD == rank for doc, _, _ in packer["buffer"])


def test_all_ranks_skip_a_non_finite_step_together(root: Path) -> None:
    reports = [json.loads((root / "poison" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["skipped"] for r in reports] == [1, 1]
    assert reports[0]["digest"] == reports[1]["digest"]  # the replicas never diverged
    assert [r["sampler_rank"] for r in reports] == [0, 1]  # seeded per rank …
    assert reports[0]["depths"] == reports[1]["depths"]  # … but lockstep: the same sampled depths on every rank
    assert len(set(reports[0]["depths"])) > 1  # … which are really sampled
    assert [e["step"] for e in entries(root / "poison") if e.get("event") == "skip"] == [2]


def test_a_stop_on_one_rank_stops_all_and_resumes_exactly(root: Path) -> None:
    assert [e["step"] for e in entries(root / "split") if e.get("event") == "resume"] == [2]
    assert losses(root / "split") == losses(root / "ddp")  # bit for bit, data position of every rank included


def test_one_process_run_resumes_on_two_fsdp_ranks(root: Path) -> None:
    run = root / "single"
    event = next(e for e in entries(run) if e.get("event") == "world_size")
    assert (event["from"], event["to"], event["grad_accum"]) == (1, 2, 1)  # the global batch is kept
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["tokens"] == 5 * 2 * 32 * 2
    saved = json.loads((run / "run_config.json").read_text())["train"]
    assert (saved["grad_accum"], saved["parallel"]) == (1, "fsdp")


def test_fsdp_run_resumes_in_one_process(root: Path, tmp_path: Path) -> None:
    run = shutil.copytree(root / "fsdp", tmp_path / "fsdp")
    checkpoint = run / f"checkpoints/step-{STEPS:08d}"
    trainer = Trainer(None, TrainConfig(steps=STEPS + 2), run, resume=True, progress_bar=False, echo=lambda _: None)
    saved = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in saved.items())
    assert trainer.config.grad_accum == WORLD  # 2 ranks × 1 micro-batch → 1 rank × 2
    summary = trainer.train()
    assert summary["steps"] == STEPS + 2 and all(np.isfinite(list(losses(run).values())))


# ---------------------------------------------------------------------- the data position across world sizes
def unique_store(num_docs: int = 90, seed: int = 0) -> MemoryStore:
    """Documents whose tokens are all distinct, so a token identifies its document and position."""
    lengths = np.random.default_rng(seed).integers(3, 40, num_docs)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return MemoryStore.from_token_lists([range(starts[i] + 1, starts[i + 1] + 1) for i in range(num_docs)])


def packers(store: MemoryStore, world_size: int, **kwargs) -> list[BestFitPacker]:
    return [BestFitPacker(store, 16, 2, buffer_size=6, seed=1, rank=r, world_size=world_size, pad_id=0, **kwargs)
            for r in range(world_size)]  # fmt: skip


def tokens_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The real tokens placed in these batches (inputs plus each row's last target; padding is id 0)."""
    out = []
    for inputs, labels in batches:
        rows = torch.cat([inputs, labels[:, -1:].clamp(min=0)], dim=1)
        out += [t for t in rows.flatten().tolist() if t]
    return out


def test_same_world_size_continues_the_stream_exactly() -> None:
    store = unique_store()
    old = packers(store, 2)
    for packer in old:
        for _ in range(5):
            packer.next_batch()
    saved = [p.state_dict() for p in old]
    new = packers(store, 2)
    assert all(restore_packer(p, saved) is None for p in new)
    for a, b in zip(old, new, strict=True):
        for _ in range(4):
            assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch(), strict=True))


@pytest.mark.parametrize("new_world", [1, 3])
def test_other_world_size_finishes_every_started_document_once(new_world: int) -> None:
    store = unique_store()
    old = packers(store, 2)
    consumed = [t for p in old for t in tokens_of([p.next_batch() for _ in range(6)])]
    saved = [p.state_dict() for p in old]
    assert max(s["epoch"] for s in saved) == 0  # the save point is mid-epoch
    # loop=False: the restored stream is exactly the carried pieces (the next epoch never starts).
    new = packers(store, new_world, loop=False)
    for p in new:
        assert restore_packer(p, saved) is not None
        assert all(doc % new_world == p.rank for doc, _, _ in p.state_dict()["buffer"])
    carried = [t for p in new for t in tokens_of(list(p))]
    counts = Counter(consumed + carried)
    assert max(counts.values()) == 1  # no token twice
    started = {int(np.searchsorted(np.cumsum(store.doc_lengths), t - 1, side="right")) for t in counts}
    expected = {int(t) for d in started for t in store.doc(d)}
    assert set(counts) == expected  # every started document finished: no token lost
    # With loop=True the next refill starts epoch 1 of the new partition.
    looping = packers(store, new_world)
    for p in looping:
        restore_packer(p, saved)
        while p.state_dict()["epoch"] == 0:
            p.next_batch()
        assert p.state_dict()["epoch"] == 1


def test_resume_rejects_a_different_stream() -> None:
    saved = [p.state_dict() for p in packers(unique_store(), 2)]
    other = BestFitPacker(unique_store(num_docs=50), 16, 2, seed=1, pad_id=0)
    with pytest.raises(ValueError, match="different stream"):
        restore_packer(other, saved)


def test_cli_resume_takes_parallel_but_not_run_settings(tmp_path: Path, capsys) -> None:
    code = main(["train", "--resume", str(tmp_path), "--lockstep"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "only a new budget and --parallel" in err and "\n" not in err
    # Settings a resumed run would not use are refused by name, never silently ignored.
    code = main(["train", "--resume", str(tmp_path), "--lr", "0.1", "--batch-size", "4", "--device", "cpu"])
    assert code == 2 and "not --batch-size, --lr, --device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown parallel mode 'mpi'"):
        TrainConfig(parallel="mpi")
