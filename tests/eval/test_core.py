"""The CORE-style harness: scoring against a model with known preferences, prompts, few-shot draws,
truncation, centered accuracy, bad input, and a real run on every shared task file."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parcae import ParcaeOutput, get_preset
from parcae.data.tokenizer import ByteTokenizer
from parcae.eval.core import (
    CORE_TASKS,
    LANGUAGE_MODELING,
    MULTIPLE_CHOICE,
    CoreResult,
    Example,
    Task,
    TaskSpec,
    centered,
    chance_rate,
    encode_examples,
    evaluate_core,
    fewshot_indices,
    find_tasks,
    join,
    load_task,
    read_examples,
    render_option,
)
from parcae.eval.scoring import Row, pack_groups, score_groups

SHARED_CORE = Path(__file__).resolve().parents[2].parent / "shared" / "eval" / "core"
LETTERS = "abcdefghijklmnopqrstuvwxyz "
TOK = ByteTokenizer()


class BigramModel(nn.Module):
    """A stand-in model with known preferences: logits[b, t] = table[input[b, t]], one table per depth
    (depth 1 uses `tables[0]`, any deeper run `tables[1]`), no recurrent state."""

    def __init__(self, tables: Tensor, max_seq_len: int = 64, **config) -> None:
        super().__init__()
        self.config = get_preset("parcae-micro", max_seq_len=max_seq_len, **config)  # `config`: what h₀ is
        self.register_buffer("tables", tables)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls: list[tuple[int, ...]] = []

    def table(self, num_steps: int | None) -> Tensor:
        return self.tables[0 if num_steps == 1 else 1]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, *, num_steps: int | None = None,
                state_seed: int | None = None, return_logits: bool = True) -> ParcaeOutput:  # fmt: skip
        self.calls.append(tuple(input_ids.shape))
        return ParcaeOutput(logits=self.table(num_steps)[input_ids])


def letter_tables(seed: int = 0, depths: int = 2) -> Tensor:
    """Random bigram preferences over lowercase letters and space; every other id is all but impossible."""
    gen = torch.Generator().manual_seed(seed)
    vocab = get_preset("parcae-micro").vocab_size
    tables = torch.full((depths, vocab, vocab), -30.0)
    allowed = torch.tensor([ord(c) for c in LETTERS])
    tables[:, :, allowed] = 3 * torch.randn(depths, vocab, len(allowed), generator=gen)
    return tables


def bigram_nll(table: Tensor, text_before: str, scored: str) -> list[float]:
    """Per-token NLL of `scored` after BOS + `text_before` under a bigram table (the reference)."""
    ids = [TOK.bos_id, *TOK.encode(text_before + scored)]
    first = len(ids) - len(TOK.encode(scored))
    logp = F.log_softmax(table, dim=-1)
    return [float(-logp[ids[j - 1], ids[j]]) for j in range(first, len(ids))]


def greedy_chain(table: Tensor, start: str, length: int) -> str:
    out, prev = "", start
    for _ in range(length):
        prev = chr(int(table[ord(prev), :256].argmax()))
        out += prev
    return out


def random_word(rng: np.random.Generator, low: int = 1, high: int = 6) -> str:
    return "".join(rng.choice(list(LETTERS[:-1]), size=int(rng.integers(low, high))))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def synthetic_tasks(tmp_path: Path) -> tuple[Path, Tensor]:
    """Three task files (MC, schema, LM) of random letters; LM positives follow the depth-1 greedy chain."""
    tables = letter_tables()
    rng = np.random.default_rng(0)
    mc = [{"query": random_word(rng), "choices": [random_word(rng) for _ in range(int(rng.integers(2, 5)))],
           "gold": 0} for _ in range(12)]  # fmt: skip
    for r in mc:
        r["gold"] = int(rng.integers(len(r["choices"])))
    schema = [{"context_options": [random_word(rng) for _ in range(3)], "continuation": random_word(rng),
               "gold": int(rng.integers(3))} for _ in range(10)]  # fmt: skip
    # A context whose last letter is followed by " " under greedy decoding at depth 1 starts a positive.
    enders = [c for c in LETTERS[:-1] if int(tables[0, ord(c), :256].argmax()) == ord(" ")]
    assert enders, "the random table should send some letter to a space"
    lm = []
    for i in range(10):
        context = random_word(rng) + enders[i % len(enders)]
        continuation = greedy_chain(tables[0], " ", 4)
        if i % 2:  # a negative: the last letter is not the greedy one
            wrong = next(c for c in LETTERS[:-1] if c != continuation[-1])
            continuation = continuation[:-1] + wrong
        lm.append({"context": context, "continuation": continuation})
    write_jsonl(tmp_path / "mc.jsonl", mc)
    write_jsonl(tmp_path / "schema.jsonl", schema)
    write_jsonl(tmp_path / "lm.jsonl", lm)
    return tmp_path, tables


def run_synthetic(directory: Path, tables: Tensor, batch_size: int = 8, depths=(1, 2)) -> tuple:
    model = BigramModel(tables)
    tasks = [load_task(spec, directory) for spec in find_tasks(directory)]
    sink = io.StringIO()
    result = evaluate_core(model, TOK, tasks, list(depths), seeds=[0], batch_size=batch_size, predictions=sink)
    return result, [json.loads(line) for line in sink.getvalue().splitlines()], tasks


def test_scores_follow_the_models_known_preferences(synthetic_tasks) -> None:
    directory, tables = synthetic_tasks
    result, predictions, tasks = run_synthetic(directory, tables)
    assert [t.name for t in tasks] == ["lm", "mc", "schema"]
    assert result.accuracy.shape == (2, 1, 3)  # one entry per depth
    expected = np.zeros((2, 3))
    for record in predictions:
        t = [task.name for task in tasks].index(record["task"])
        example = tasks[t].examples[record["line"] - 1]
        table = tables[0 if record["depth"] == 1 else 1]
        # Reference: mean NLL of " " + continuation after each context, straight from the bigram table.
        nll = [bigram_nll(table, c, " " + k) for c, k in zip(example.contexts, example.continuations, strict=True)]
        means = [sum(x) / len(x) for x in nll]
        assert record["mean_nll"] == pytest.approx(means, abs=1e-4)
        if tasks[t].kind == LANGUAGE_MODELING:
            ids = TOK.encode(example.contexts[0] + " " + example.continuations[0])
            start = len(TOK.encode(example.contexts[0]))
            right = all(int(table[ids[j - 1], :259].argmax()) == ids[j] for j in range(start, len(ids)))
        else:
            right = int(np.argmin(means)) == example.gold
            assert record["pred"] == int(np.argmin(means))
        assert record["correct"] == right
        expected[[1, 2].index(record["depth"]), t] += right / len(tasks[t].examples)
    assert result.accuracy[:, 0, :] == pytest.approx(expected)
    # By construction, half of the LM examples are greedy continuations at depth 1 and none at depth 2 need be.
    assert result.accuracy[0, 0, 0] == pytest.approx(0.5)


def test_mean_not_summed_loss_picks_the_choice(tmp_path: Path) -> None:
    tables = torch.full((2, 320, 320), -30.0)
    tables[:, :, ord("a")] = 5.0  # "a" is almost certain everywhere; " " and "b" much less so
    tables[:, :, ord(" ")] = 0.0
    tables[:, :, ord("b")] = 0.0
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "b", "choices": ["a", "aaaaaaaa"], "gold": 1}])
    result, predictions, _ = run_synthetic(tmp_path, tables, depths=(1,))
    # Summed, " a" costs less than " aaaaaaaa"; per token, the long choice is cheaper.
    assert predictions[0]["pred"] == 1 and result.accuracy[0, 0, 0] == 1.0


def test_batching_does_not_change_scores(synthetic_tasks) -> None:
    directory, tables = synthetic_tasks
    _, one, _ = run_synthetic(directory, tables, batch_size=1)
    _, many, _ = run_synthetic(directory, tables, batch_size=7)
    key = lambda r: (r["task"], r["line"], r["depth"])  # noqa: E731
    assert sorted(one, key=key) == sorted(many, key=key)


def test_a_rows_score_does_not_depend_on_its_batch_neighbours() -> None:
    from parcae import Parcae

    torch.manual_seed(0)
    model = Parcae(get_preset("parcae-micro")).eval()  # random h₀ (like-init): seeded per position by the model
    rng = np.random.default_rng(0)
    groups = [[Row(rng.integers(0, 256, size=n), 3)] for n in (12, 40, 25, 7)]
    common = {"num_steps": 3, "state_seed": 1, "pad_id": TOK.pad_id, "vocab_limit": TOK.vocab_size}
    together = score_groups(model, groups, batch_size=4, **common)
    alone = score_groups(model, groups, batch_size=1, **common)
    assert [g[0].nll for g in together] == pytest.approx([g[0].nll for g in alone], rel=1e-5)


def test_options_of_an_example_share_a_batch_and_batches_hold_many_examples(synthetic_tasks) -> None:
    directory, tables = synthetic_tasks
    model = BigramModel(tables)
    tasks = [load_task(spec, directory) for spec in find_tasks(directory, ["mc"])]
    evaluate_core(model, TOK, tasks, [1], seeds=[0], batch_size=8)
    rows = [shape[0] for shape in model.calls]
    options = sum(len(e.contexts) for e in tasks[0].examples)
    assert sum(rows) == options and max(rows) <= 8 and len(rows) < len(tasks[0].examples)


@pytest.mark.parametrize("config", [{"n_core": 0}, {"state_init": "zero"}])
def test_seeds_that_change_nothing_are_copied_not_scored(synthetic_tasks, config: dict) -> None:
    """Without an h₀ that depends on the seed, a 0-shot task scores the same for every seed: scored once."""
    directory, tables = synthetic_tasks
    tasks = [load_task(spec, directory) for spec in find_tasks(directory)]  # custom files run 0-shot
    once, thrice = BigramModel(tables, **config), BigramModel(tables, **config)
    single = evaluate_core(once, TOK, tasks, [1, 2], seeds=[0], batch_size=8)
    sink = io.StringIO()
    result = evaluate_core(thrice, TOK, tasks, [1, 2], seeds=[0, 1, 2], batch_size=8, predictions=sink)
    assert thrice.calls == once.calls  # seeds 1 and 2 ran no forward
    assert (result.accuracy == single.accuracy).all() and result.accuracy.shape == (2, 3, 3)
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    by_seed = {s: [{**r, "seed": None} for r in records if r["seed"] == s] for s in (0, 1, 2)}
    assert len(by_seed[0]) == 2 * 32 and by_seed[0] == by_seed[1] == by_seed[2]  # every line, each seed
    # With demonstrations the seed changes the prompts: every seed is scored.
    drawn = BigramModel(tables, **config)
    evaluate_core(drawn, TOK, tasks, [1, 2], seeds=[0, 1, 2], fewshot=2, batch_size=8)
    assert len(drawn.calls) > 2 * len(once.calls)


def test_progress_counts_tokens_times_layers(synthetic_tasks, monkeypatch) -> None:
    """The bar's unit is a token through one block: known up front, and it ends exactly at its total."""
    import tqdm.auto

    from parcae.eval.core import layer_passes
    from parcae.eval.scoring import tokens_fed

    bars = []

    class Recorder:
        def __init__(self, total: int, **_) -> None:
            self.total, self.done = total, []
            bars.append(self)

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *_) -> None:
            pass

        def update(self, n: int) -> None:
            self.done.append(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    directory, tables = synthetic_tasks
    model = BigramModel(tables)
    tasks = [load_task(spec, directory) for spec in find_tasks(directory)]
    evaluate_core(model, TOK, tasks, [1, 5], seeds=[0, 1], fewshot=1, batch_size=8, progress=True)
    (bar,) = bars
    assert sum(bar.done) == bar.total
    fed = [tokens_fed(model, [e.rows for t in tasks for e in encode_examples(t, range(len(t.examples)), TOK,
                                                                               seed=s, shots=1, max_len=64)])
           for s in (0, 1)]  # fmt: skip
    cfg = model.config
    assert layer_passes(cfg, 5) == cfg.n_prelude + 5 * cfg.n_core + cfg.n_coda
    assert bar.total == sum(fed) * (layer_passes(cfg, 1) + layer_passes(cfg, 5))


def test_pack_groups_keeps_groups_whole() -> None:
    rows = [Row(np.arange(n), 1) for n in (5, 9, 7, 3, 8)]
    groups = [rows[:2], rows[2:3], rows[3:5], rows[:1]]
    batches = pack_groups(groups, max_rows=3)
    assert sorted(g for b in batches for g in b) == [0, 1, 2, 3]
    assert all(sum(len(groups[g]) for g in b) <= 3 for b in batches)
    assert len(pack_groups([rows], max_rows=2)) == 1  # a group larger than a batch still goes whole


def test_centered_accuracy_and_core_math() -> None:
    assert centered(0.25, 0.25) == pytest.approx(0.0)
    assert centered(1.0, 0.622) == pytest.approx(1.0)
    assert centered(0.625, 0.25) == pytest.approx(0.5)
    tasks = [Task(f"t{i}", MULTIPLE_CHOICE, 0, b, Path(f"t{i}.jsonl"), ()) for i, b in enumerate((0.5, 0.25, 0.0))]
    accuracy = np.array([[[0.5, 0.625, 0.2], [0.75, 0.25, 0.4]]])  # [depth, seed, task]
    result = CoreResult(tasks, [0, 0, 0], [8, 8, 5], [4], [0, 1], accuracy)
    per_seed = [(0.0 + 0.5 + 0.2) / 3, (0.5 + 0.0 + 0.4) / 3]
    assert result.core[0] == pytest.approx(per_seed)
    summary = result.to_dict()["results"][0]["core"]
    assert summary["mean"] == pytest.approx(np.mean(per_seed)) and summary["std"] == pytest.approx(np.std(per_seed))
    assert result.label == "CORE (3 tasks)"


def test_fewshot_draws_exclude_the_item_and_are_deterministic() -> None:
    for index in range(5):
        draw = fewshot_indices(5, index, 10, seed=0, task="t")
        assert sorted(draw) == sorted(set(range(5)) - {index})  # capped at n − 1, never the item itself
    for index in range(0, 500, 37):
        draw = fewshot_indices(500, index, 10, seed=3, task="t")
        assert len(set(draw)) == 10 and index not in draw and all(0 <= j < 500 for j in draw)
        assert draw == fewshot_indices(500, index, 10, seed=3, task="t")
    draws = {tuple(fewshot_indices(500, 7, 10, seed=s, task="t")) for s in range(3)}
    assert len(draws) == 3  # the seed changes the draw
    assert fewshot_indices(500, 7, 10, seed=0, task="t") != fewshot_indices(500, 7, 10, seed=0, task="u")
    assert fewshot_indices(500, 7, 0, seed=0, task="t") == [] and fewshot_indices(1, 0, 5, seed=0, task="t") == []


def test_prompt_rendering() -> None:
    assert join("Question: 2+2?", "4") == ("Question: 2+2?", " 4")
    assert join("Answer: ", "A") == ("Answer:", " A")  # trailing whitespace moves to the scored part
    assert join("Question: x\n", "y") == ("Question: x", "\ny")
    assert join("", "y") == ("", "y")
    demos = [Example(1, ("q1",), ("a1",), 0), Example(2, ("c1", "c2"), ("end", "end"), 1)]
    head, tail = render_option(Example(3, ("q3", "q3"), ("x", "y"), 0), 1, demos)
    assert head + tail == "q1 a1\n\nc2 end\n\nq3 y" and tail == " y"


def test_rows_start_with_bos_and_hold_the_demonstrations(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"context": f"c{i}", "continuation": f"x{i}"} for i in range(6)])
    task = load_task(TaskSpec("t", path.name, LANGUAGE_MODELING, 3, None), tmp_path)
    (encoded,) = encode_examples(task, [4], TOK, seed=1, shots=3, max_len=100)
    row = encoded.rows[0]
    demos = "".join(f"c{j} x{j}\n\n" for j in fewshot_indices(6, 4, 3, seed=1, task="t"))
    assert row.tokens[0] == TOK.bos_id and TOK.decode(row.tokens) == demos + "c4 x4"
    assert TOK.decode(row.tokens[row.start :]) == " x4" and not encoded.truncated
    assert list(encoded.fewshot) == fewshot_indices(6, 4, 3, seed=1, task="t")


def test_over_long_prompts_are_truncated_on_the_left(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "q" * 40 + "END", "choices": ["yes", "no"], "gold": 0},
                                              {"query": "short", "choices": ["c" * 30, "d"], "gold": 0}])  # fmt: skip
    task = load_task(TaskSpec("t", path.name, MULTIPLE_CHOICE, 0, None), tmp_path)
    long, short = encode_examples(task, [0, 1], TOK, seed=0, shots=0, max_len=16)
    full = [TOK.bos_id, *TOK.encode("q" * 40 + "END yes")]
    assert long.truncated and long.rows[0].tokens.tolist() == full[-17:]  # the model sees max_len tokens
    assert TOK.decode(long.rows[0].tokens[long.rows[0].start :]) == " yes"
    assert long.rows[1].scored == 3 and len(long.rows[1].tokens) == 16  # the same context as the first option
    assert long.rows[1].tokens[: long.rows[1].start].tolist() == long.rows[0].tokens[: long.rows[0].start].tolist()
    assert short.truncated and short.rows[0].scored == 16  # a continuation longer than the window keeps its end
    assert TOK.decode(short.rows[1].tokens) == "t d" and short.rows[1].scored == 2  # one context token, as option 0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"query": "q", "choices": ["a"], "gold": 0}', "{not json"], r"t\.jsonl:2: not valid JSON"),
        (['{"query": "q", "choices": ["a", "b"], "gold": 2}'], r"t\.jsonl:1: \"gold\" must be an integer in \[0, 2\)"),
        (['{"question": "q"}'], r"t\.jsonl:1: unknown format"),
        (
            ['{"context": "a", "continuation": "b"}', '{"query": "q", "choices": ["a"], "gold": 0}'],
            r"t\.jsonl:2: a multiple_choice example in a language_modeling task file",
        ),
        (["", "  "], r"holds no examples"),
        (['{"context_options": [], "continuation": "x", "gold": 0}'], r"non-empty list of strings"),
    ],
)
def test_malformed_task_files_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_examples(tmp_path / "t.jsonl")


def test_unknown_or_missing_tasks_are_clear_errors(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mine.jsonl", [{"context": "a", "continuation": "b"}])
    assert [s.name for s in find_tasks(tmp_path)] == ["mine"]
    with pytest.raises(ValueError, match=r"unknown task 'nope'; the tasks in .* are: mine"):
        find_tasks(tmp_path, ["nope"])
    with pytest.raises(FileNotFoundError, match=r"copa\.jsonl does not exist"):
        load_task(find_tasks(tmp_path, ["copa"])[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_tasks(tmp_path / "absent")
    with pytest.raises(ValueError, match="depths must be positive"):
        evaluate_core(BigramModel(letter_tables()), TOK, [load_task(find_tasks(tmp_path)[0], tmp_path)], [0])


# ---------------------------------------------------------------------------------------------- shared files
needs_shared = pytest.mark.skipif(not SHARED_CORE.is_dir(), reason=f"shared CORE task files absent ({SHARED_CORE})")


@pytest.fixture(scope="module")
def shared_tasks() -> list[Task]:
    return [load_task(spec, SHARED_CORE) for spec in find_tasks(SHARED_CORE)]


@needs_shared
def test_task_table_matches_the_shared_files(shared_tasks: list[Task]) -> None:
    assert [t.path.name for t in shared_tasks] == [s.file for s in CORE_TASKS]
    for spec, task in zip(CORE_TASKS, shared_tasks, strict=True):
        if spec.name != "boolq":  # boolq uses its majority-class rate (documented)
            assert spec.baseline == pytest.approx(chance_rate(task.examples, task.kind)), spec.name


@pytest.fixture(scope="module")
def trained_micro(tmp_path_factory) -> Path:
    """parcae-micro trained for a few steps on a few standard-library modules (no download)."""
    import sysconfig

    from parcae.train.config import TrainConfig
    from parcae.train.trainer import Trainer

    root = tmp_path_factory.mktemp("corpus")
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:4]:
        (root / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8", errors="replace"))
    run = tmp_path_factory.mktemp("run") / "micro"
    train = TrainConfig(data=str(root), batch_size=4, seq_len=64, steps=4, eval_batches=0, checkpoint_every=100,
                        log_every=100, val_fraction=0.2, optimizer="adamw", lr=3e-3)  # fmt: skip
    Trainer(get_preset("parcae-micro", max_seq_len=64), train, run, progress_bar=False, echo=lambda _: None).train()
    return run


@needs_shared
def test_real_run_on_every_shared_task_file(trained_micro: Path, shared_tasks: list[Task]) -> None:
    from parcae.train.run import open_run

    run = open_run(trained_micro)
    sink = io.StringIO()
    result = evaluate_core(run.model, run.tokenizer, shared_tasks, [1, 2], seeds=[0], max_per_task=2, batch_size=16,
                           predictions=sink)  # fmt: skip
    assert result.label == "CORE-18" and result.accuracy.shape == (2, 1, 18)
    assert ((result.accuracy >= 0) & (result.accuracy <= 1)).all() and np.isfinite(result.core).all()
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(records) == 18 * 2 * 2
    shots = {spec.name: spec.shots for spec in CORE_TASKS}
    for r in records:
        assert len(r["fewshot_lines"]) == shots[r["task"]] and r["line"] not in r["fewshot_lines"]
        assert all(math.isfinite(x) for x in r["mean_nll"])
    assert any(r["truncated"] for r in records)  # 10-shot prompts exceed a 64-token context


def test_cli_core_on_custom_task_files(synthetic_tasks, tmp_path: Path, capsys) -> None:
    from parcae import Parcae
    from parcae.cli import main

    directory, _ = synthetic_tasks
    model_dir = tmp_path / "model"
    Parcae(get_preset("parcae-micro")).save_pretrained(model_dir)
    TOK.save(model_dir)
    argv = ["eval", str(model_dir), "--core", str(directory), "--tasks", "mc,lm", "--max-per-task", "3",
            "--seeds", "2", "--depths", "1,3", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "loss is skipped" in out and "CORE (2 tasks)" in out and "T=3" in out
    (path,) = (model_dir / "eval").glob("core-*.json")
    payload = json.loads(path.read_text())
    assert [r["depth"] for r in payload["results"]] == [1, 3] and payload["seeds"] == [0, 1]
    assert [t["name"] for t in payload["tasks"]] == ["mc", "lm"] and payload["tasks"][0]["examples"] == 3
    lines = path.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 * 2 * 2  # tasks × examples × depths × seeds
    before = path.read_text()
    assert main([*argv[:7], "2", "--depths", "1", "--no-progress"]) == 0  # other settings: other files
    assert len(list((model_dir / "eval").glob("core-*.json"))) == 2 and path.read_text() == before
    assert len(list((model_dir / "eval").glob("core-*.predictions.jsonl"))) == 2
    assert not list((model_dir / "eval").glob("*.partial"))
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--core", str(directory), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_cli_core_on_a_fixed_depth_model_uses_one_seed(synthetic_tasks, tmp_path: Path, capsys) -> None:
    from parcae import Parcae
    from parcae.cli import main

    directory, _ = synthetic_tasks
    model_dir = tmp_path / "gpt"
    Parcae(get_preset("parcae-micro", n_core=0)).save_pretrained(model_dir)
    TOK.save(model_dir)
    argv = ["eval", str(model_dir), "--core", str(directory), "--tasks", "mc", "--max-per-task", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seeds 0 (few-shot draw; this model's h₀ does not depend on it)" in out
    (path,) = (model_dir / "eval").glob("core-*.json")
    payload = json.loads(path.read_text())
    assert payload["seeds"] == [0] and payload["depths"] == [1]  # one depth, one seed
