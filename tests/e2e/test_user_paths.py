"""End to end through the real command line: the paths a user takes with their own data, asserting outcomes.

Every cell runs `parcae.cli.main([...])` in-process, as a user's shell would, on tiny models (d 64, one layer per
part, μ_rec 2) and synthetic prose: pseudo-words drawn from a fixed Zipf-weighted vocabulary, so no two windows of
a few dozen characters repeat and a model that memorises rows instead of learning shows a gap between its
training and held-out losses. Covered:
- model families (Parcae, additive RDM, concat RDM, fixed-depth Transformer): train → exact resume → eval →
  generate → convert → transformers' AutoModelForCausalLM → generate;
- data kinds (one long .txt, a .jsonl of many short documents, a directory of several files, three tiny
  documents): a non-empty validation split, held out from training, that eval scores;
- the single-document regression: held-out loss close to the training loss, and packed rows never repeated;
- eval --core on a few COPA lines, `sweep plan` + `sweep run`, `lab stability --dry-run`, `tokenizer train`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from parcae.cli import main
from parcae.data.packing import BestFitPacker
from parcae.data.shards import ShardStore
from parcae.data.tokenizer import load_tokenizer
from parcae.train.run import open_run

SHARED_CORE = Path(__file__).resolve().parents[2].parent / "shared" / "eval" / "core"

# ---------------------------------------------------------------------------------------------- synthetic text
_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "va", "shi", "pel", "dan", "ur", "est", "in", "qua", "bri", "fo", "ne")


def _vocabulary() -> tuple[list[str], list[float]]:
    rng = random.Random(0)
    words = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)})
    rng.shuffle(words)
    return words, [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a learnable, realistic skew


_WORDS, _WEIGHTS = _vocabulary()


def prose(n_chars: int, seed: int) -> str:
    """`n_chars` characters of sentences and paragraphs over the fixed vocabulary; `seed` picks the sentences."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        words = rng.choices(_WORDS, _WEIGHTS, k=rng.randint(4, 18))
        sentence = " ".join(words).capitalize() + rng.choice(".....?!;") + rng.choice("    \n")
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:n_chars]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def make_corpora(root: Path) -> dict[str, Path]:
    """The four data kinds of a user's own data, as `--data` specs."""
    root.mkdir(parents=True, exist_ok=True)
    long_txt = root / "book.txt"
    long_txt.write_text(prose(300_000, seed=1), encoding="utf-8")
    sizes = [random.Random(i).randint(200, 1500) for i in range(300)]
    docs = write_jsonl(root / "docs.jsonl", [prose(n, seed=100 + i) for i, n in enumerate(sizes)])
    folder = root / "folder"
    (folder / "part").mkdir(parents=True)
    for i in range(4):
        (folder / f"chapter{i}.txt").write_text(prose(20_000, seed=200 + i), encoding="utf-8")
    write_jsonl(folder / "part" / "notes.jsonl", [prose(3_000, seed=300 + i) for i in range(3)])
    tiny = write_jsonl(root / "tiny.jsonl", [prose(400, seed=400 + i) for i in range(3)])
    return {"long-txt": long_txt, "jsonl-many": docs, "directory": folder, "three-tiny": tiny}


# ---------------------------------------------------------------------------------------------- CLI helpers
def cli(*argv: str | Path) -> tuple[str, str]:
    """`parcae ARGV` in-process; must succeed. Returns (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    assert code == 0, f"parcae {' '.join(map(str, argv))} exited {code}: {err.getvalue().strip()[-2000:]}"
    return out.getvalue(), err.getvalue()


# Shrinks every family to the same tiny width; a looped model keeps one layer per part and μ_rec 2.
_NARROW = ("--set", "d_model=64", "--set", "d_mlp=128")
_LOOPED = (*_NARROW, "--set", "n_prelude=1", "--set", "n_core=1", "--set", "n_coda=1", "--set", "mean_recurrence=2")
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "parcae": ("parcae-tiny", _LOOPED),
    "rdm-additive": ("rdm-add-tiny", _LOOPED),
    "rdm-concat": ("rdm-linear-tiny", _LOOPED),
    "transformer": ("gpt-tiny", (*_NARROW, "--set", "n_prelude=2")),
}
SEQ_LEN, BATCH = 64, 8
FAMILY_STEPS = 6  # each family's run; the resume test stops at half of it
LONG_STEPS = 36  # the single-document regression: a few dozen steps, enough to memorise a repeated prefix
# The user's recipe for small data: AdamW at 3e-3. A constant schedule, because a resume that extends the budget
# (`--resume RUN --steps N`) re-plans a trapezoid's cooldown, so only a flat schedule can equal the one-go run.
_RECIPE = ("--seq-len", SEQ_LEN, "--batch-size", BATCH, "--set", "optimizer=adamw", "--set", "lr=3e-3", "--set",
           "schedule=constant", "--set", "log_every=1", "--set", "eval_batches=2", "--no-progress")  # fmt: skip


def train(preset: str, overrides: tuple[str, ...], data: Path, out: Path, steps: int) -> Path:
    cli("train", "--preset", preset, *overrides, *_RECIPE, "--data", data, "--steps", steps, "--out", out)
    return out


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in metrics(run) if "loss" in e and "event" not in e}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "model.safetensors")


def loss_results(run: Path) -> list[dict[str, Any]]:
    """Every loss-by-depth payload under RUN/eval (however eval names its files), oldest first."""
    found = []
    for path in sorted((run / "eval").rglob("*.json"), key=lambda p: p.stat().st_mtime_ns):
        payload = json.loads(path.read_text())
        rows = payload.get("results") if isinstance(payload, dict) else None
        if rows and all("loss" in r and "depth" in r for r in rows):
            found.append(payload)
    return found


def core_results(run: Path) -> tuple[dict[str, Any], list[str]]:
    """The newest CORE payload under RUN/eval and the lines of its predictions file."""
    newest = max(
        (p for p in (run / "eval").glob("*.json") if "tasks" in json.loads(p.read_text())),
        key=lambda p: p.stat().st_mtime_ns,
    )
    predictions = [newest.with_suffix(".predictions.jsonl"), newest.parent / "core_predictions.jsonl"]
    lines = next(p for p in predictions if p.is_file()).read_text().splitlines()
    return json.loads(newest.read_text()), lines


def assert_finite_figures(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        assert row["tokens"] > 0, row
        for key in ("loss", "bpb", "perplexity"):
            assert row.get(key) is not None and math.isfinite(row[key]), (key, row)


def split_text(data_dir: Path, split: str) -> tuple[int, str]:
    """(tokens, decoded text) of one split of a prepared directory."""
    store, tokenizer = ShardStore.open(data_dir, split), load_tokenizer(data_dir)
    return store.num_tokens, "".join(tokenizer.decode(store.doc(i).tolist()) for i in range(store.num_docs))


class Runs:
    """Training runs shared by the module's tests, each trained once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corpora = make_corpora(root / "corpora")
        self._done: dict[str, Path] = {}
        self._failed: dict[str, str] = {}

    def get(self, key: str, make: Callable[[Path], Path]) -> Path:
        if key in self._failed:  # report the first failure again instead of retrying into the same directory
            pytest.fail(f"training {key} failed earlier: {self._failed[key]}")
        if key not in self._done:
            try:
                self._done[key] = make(self.root / "runs" / key)
            except AssertionError as err:
                self._failed[key] = str(err).splitlines()[0]
                raise
        return self._done[key]

    def family(self, name: str) -> Path:
        preset, overrides = FAMILIES[name]
        data = self.corpora["jsonl-many"]
        return self.get(f"family-{name}", lambda out: train(preset, overrides, data, out, FAMILY_STEPS))

    def data(self, kind: str) -> Path:
        steps = LONG_STEPS if kind == "long-txt" else 8  # the others: a smoke run
        return self.get(f"data-{kind}", lambda out: train("parcae-tiny", _LOOPED, self.corpora[kind], out, steps))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("e2e"))


# ---------------------------------------------------------------------------------------------- model families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_lowers_the_held_out_loss(runs: Runs, family: str) -> None:
    run = runs.family(family)
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, FAMILY_STEPS + 1)) and all(map(math.isfinite, losses.values()))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == FAMILY_STEPS and not summary["interrupted"] and summary["skipped_steps"] == 0
    held_out = summary["final_val_loss"]
    assert held_out and all(math.isfinite(v) for v in held_out.values()), summary
    # The validation loss of the trained model is below the untrained model's loss at step 1.
    assert max(held_out.values()) < losses[1] - 1.0, (held_out, losses[1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_reproduces_the_uninterrupted_run(runs: Runs, family: str, tmp_path: Path) -> None:
    full = runs.family(family)
    preset, overrides = FAMILIES[family]
    split = train(preset, overrides, runs.corpora["jsonl-many"], tmp_path / "split", steps=FAMILY_STEPS // 2)
    cli("train", "--resume", split, "--steps", FAMILY_STEPS, "--no-progress")
    assert step_losses(split) == step_losses(full)  # step for step, bit for bit
    resumed, uninterrupted = final_weights(split), final_weights(full)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_writes_finite_figures_per_depth(runs: Runs, family: str) -> None:
    run = runs.family(family)
    cli("eval", run, "--depths", "1,2,4", "--batches", 2, "--batch-size", 4, "--seeds", 2, "--no-progress")
    payload = loss_results(run)[-1]
    rows = payload["results"]
    assert_finite_figures(rows)
    looped = family != "transformer"
    assert [r["depth"] for r in rows] == ([1, 2, 4] if looped else [rows[0]["depth"]])
    if not looped:  # no loop state: h₀ seeds cannot change anything, so one is evaluated
        assert len(payload["seeds"]) == 1, payload["seeds"]
    first_step = step_losses(run)[1]
    assert min(r["loss"] for r in rows) < first_step - 1.0, (rows, first_step)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_convert_and_load_with_transformers(runs: Runs, family: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import parcae.interop.hf  # noqa: F401  (registers model_type "parcae" with the Auto classes, as documented)

    run, prompt = runs.family(family), "Kalo mi"
    out, _ = cli("generate", run, "--prompt", prompt, "--max-new-tokens", 24, "--temperature", 0, "--seed", 0)
    assert out.startswith(prompt) and len(out.strip()) > len(prompt), out

    hf_dir = tmp_path / "hf"
    cli("convert", "--from", "run", run, hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]])
    native = open_run(run).model
    torch.testing.assert_close(model(ids).logits, native(ids).logits)  # the same model behind both loaders
    generated = model.generate(ids, max_new_tokens=24, do_sample=True, top_k=20, seed=0)
    text = tok.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert generated.shape[1] > ids.shape[1] and text.strip(), generated


def test_a_second_eval_keeps_the_first_results(runs: Runs) -> None:
    run = runs.family("parcae")
    cli("eval", run, "--depths", "1,2", "--batches", 1, "--batch-size", 4, "--seeds", 1, "--no-progress")
    other = runs.corpora["directory"] / "chapter0.txt"
    out, _ = cli("eval", run, "--data", other, "--depths", "1,2", "--batches", 1, "--batch-size", 4, "--seeds", 1,
                 "--no-progress")  # fmt: skip
    data = {p["data"] for p in loss_results(run)}
    assert len(data) >= 2, f"eval --data replaced the validation results: {data}"
    assert "validation loss" not in out, out  # --data is not the run's validation split


# ---------------------------------------------------------------------------------------------- data kinds
DATA_KINDS = ["long-txt", "jsonl-many", "directory", "three-tiny"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_every_data_kind_gets_a_held_out_split_that_eval_scores(runs: Runs, kind: str) -> None:
    run = runs.data(kind)
    val_tokens, val_text = split_text(run / "data", "val")
    _, train_text = split_text(run / "data", "train")
    assert val_tokens > 0, f"{kind}: empty validation split"
    # Held out: no window of the validation text occurs in the training text.
    windows = [val_text[i : i + 48] for i in range(0, max(1, len(val_text) - 48), max(1, len(val_text) // 8))]
    assert not [w for w in windows if w in train_text], f"{kind}: validation text also trained on"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_loss"], f"{kind}: the trainer never validated"
    cli("eval", run, "--depths", "1,2", "--batches", 2, "--batch-size", 4, "--seeds", 1, "--no-progress")
    rows = loss_results(run)[-1]["results"]
    assert_finite_figures(rows)
    assert max(r["loss"] for r in rows) < step_losses(run)[1] - 1.0, rows


def test_a_single_document_is_learned_not_memorised(runs: Runs, tmp_path: Path) -> None:
    """The user's case: one long .txt. Training must see fresh text every row, so after a few dozen steps the
    loss on unseen text of the same kind sits close to the training loss (a memorised prefix gives train ≈ 0
    and unseen text far above). The unseen text is a separate file, so this holds whatever the split does."""
    run = runs.data("long-txt")
    losses = step_losses(run)
    final_train = sum(losses[s] for s in range(LONG_STEPS - 3, LONG_STEPS + 1)) / 4
    unseen = tmp_path / "unseen.txt"
    unseen.write_text(prose(20_000, seed=2), encoding="utf-8")
    cli("eval", run, "--data", unseen, "--depths", 2, "--batches", 4, "--batch-size", 8, "--seeds", 1, "--no-progress")
    held_out = next(p for p in reversed(loss_results(run)) if [r["depth"] for r in p["results"]] == [2])
    val = held_out["results"][0]["loss"]  # at μ_rec
    assert abs(val - final_train) <= 0.25 * final_train, (val, final_train)
    assert final_train < losses[1] - 1.0, losses  # and it did learn


def test_the_packer_never_repeats_rows_of_a_single_document(runs: Runs) -> None:
    run = runs.data("long-txt")
    store, tokenizer = ShardStore.open(run / "data", "train"), load_tokenizer(run / "data")
    packer = BestFitPacker(store, SEQ_LEN, BATCH, seed=0, pad_id=tokenizer.pad_id)  # as the trainer builds it
    rows = [tuple(row.tolist()) for _ in range(4) for row in packer.next_batch()[0]]
    assert len(set(rows)) == len(rows), f"{len(rows) - len(set(rows))} of the first {len(rows)} rows repeat"


def test_tokenizer_training_reads_a_long_document_to_its_end(tmp_path: Path) -> None:
    """A word that occurs only past the first 50k characters of a single document still shapes the merges."""
    book = tmp_path / "book.txt"
    book.write_text(prose(50_000, seed=7) + " zyxwv plugh" * 3000, encoding="utf-8")
    cli("tokenizer", "train", "--data", book, "--vocab-size", 400, "--out", tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert len(tokenizer.encode(" zyxwv plugh")) <= 4, tokenizer.encode(" zyxwv plugh")


# ---------------------------------------------------------------------------------------------- other commands
@pytest.mark.skipif(not (SHARED_CORE / "copa.jsonl").is_file(), reason=f"no CORE task files in {SHARED_CORE}")
def test_eval_core_on_a_tiny_task_file(runs: Runs, tmp_path: Path) -> None:
    run = runs.family("parcae")
    core = tmp_path / "core"
    core.mkdir()
    lines = (SHARED_CORE / "copa.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    (core / "copa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli("eval", run, "--core", core, "--max-per-task", 4, "--depths", "1,2", "--seeds", 1, "--batch-size", 4,
        "--no-progress")  # fmt: skip
    result, predictions = core_results(run)
    assert result["depths"] == [1, 2] and [t["name"] for t in result["tasks"]] == ["copa"]
    for depth in result["results"]:
        accuracy = depth["tasks"]["copa"]["accuracy"]["mean"]
        assert 0.0 <= accuracy <= 1.0 and math.isfinite(depth["core"]["mean"]), depth
    assert len(predictions) == 4 * 2  # examples × depths × seeds


def test_sweep_plan_and_run_train_and_evaluate_two_runs(runs: Runs, tmp_path: Path) -> None:
    plan = tmp_path / "sweep.json"
    cli("sweep", "plan", "--preset", "parcae-micro", "--data", runs.corpora["long-txt"], "--set", "max_seq_len=32",
        "--set", "optimizer=adamw", "--set", "lr=3e-3", "--batch-size", 4, "--budgets", "1e9",
        "--recurrences", "1,2", "--eval-depths", "1,2", "--eval-batches", 2, "--out", plan)  # fmt: skip
    assert len(json.loads(plan.read_text())["runs"]) == 2
    cli("sweep", "run", plan)
    with (tmp_path / "sweep" / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    names = {r["run"] for r in rows}
    assert len(names) == 2 and len(rows) == 4, rows  # 2 runs × depths {1, 2}
    for name in names:
        summary = json.loads((tmp_path / "sweep" / name / "summary.json").read_text())
        first = step_losses(tmp_path / "sweep" / name)[1]
        mine = [r for r in rows if r["run"] == name]
        assert {int(r["tokens"]) for r in mine} == {summary["tokens"]} and summary["tokens"] > 0
        assert all(math.isfinite(float(r["val_loss"])) and float(r["val_loss"]) < first for r in mine), (mine, first)


def test_lab_stability_dry_run_lists_the_grid_and_writes_nothing(runs: Runs, tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    out, _ = cli("lab", "stability", "--preset", "parcae-micro", "--data", runs.corpora["long-txt"], "--out", lab,
                 "--injections", "diagonal,add,linear", "--lrs", "1e-3,1e-2", "--steps", 5, "--warmup-steps", 1,
                 "--ablations", "none", "--dry-run")  # fmt: skip
    listed = [line.split()[0] for line in out.splitlines() if line.endswith("grid")]
    expected = {f"{inj}-lr{lr}-mu4-s0" for inj in ("diagonal", "add", "linear") for lr in ("0.001", "0.01")}
    assert set(listed) == expected and len(listed) == 6, out
    assert "6 runs × 5 steps = 30 optimizer steps" in out, out
    assert not lab.exists()
