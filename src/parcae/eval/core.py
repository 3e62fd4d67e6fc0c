"""A CORE-style downstream harness per test-time depth T (formats and prompts: the README's "Evaluation"). Malformed
input stops the run with `file:line`: skipping lines would silently change the scores."""

from __future__ import annotations

import json
import statistics
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..data.tokenizer import Tokenizer
from ..model.parcae import Parcae
from .scoring import Row, check_integers, make_row, score_groups, seed_changes_h0, tokens_fed

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
KIND_LABELS = {MULTIPLE_CHOICE: "MC", SCHEMA: "schema", LANGUAGE_MODELING: "LM"}
FEWSHOT_SEPARATOR = "\n\n"
SUBSET_SEED = 1337  # fixes which examples `max_per_task` keeps
_FORMATS = '"query"/"choices"/"gold", "context_options"/"continuation"/"gold" or "context"/"continuation"'


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the CORE label
    file: str
    kind: str
    shots: int  # few-shot examples in CORE
    baseline: float | None  # random baseline as a fraction; None: the chance rate of the file's choices


# CORE-18: 18 of DCLM CORE's 22 tasks (no HellaSwag 0/10-shot, SQuAD or CoQA), with its shots and baselines.
CORE_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("jeopardy", "jeopardy_all.jsonl", LANGUAGE_MODELING, 10, 0.0),
    TaskSpec("bigbench_qa_wikidata", "bigbench_qa_wikidata.jsonl", LANGUAGE_MODELING, 10, 0.0),
    TaskSpec("arc_easy", "arc_easy.jsonl", MULTIPLE_CHOICE, 10, 0.25),
    TaskSpec("arc_challenge", "arc_challenge.jsonl", MULTIPLE_CHOICE, 10, 0.25),
    TaskSpec("copa", "copa.jsonl", MULTIPLE_CHOICE, 0, 0.50),
    TaskSpec("commonsense_qa", "commonsense_qa.jsonl", MULTIPLE_CHOICE, 10, 0.25),
    TaskSpec("piqa", "piqa.jsonl", MULTIPLE_CHOICE, 10, 0.50),
    TaskSpec("openbook_qa", "openbook_qa.jsonl", MULTIPLE_CHOICE, 0, 0.25),
    TaskSpec("lambada_openai", "lambada_openai.jsonl", LANGUAGE_MODELING, 0, 0.0),
    TaskSpec("winograd", "winograd_wsc.jsonl", SCHEMA, 0, 0.50),
    TaskSpec("winogrande", "winogrande.jsonl", SCHEMA, 0, 0.50),
    TaskSpec("bigbench_dyck_languages", "bigbench_dyck_languages.jsonl", LANGUAGE_MODELING, 10, 0.0),
    TaskSpec("agi_eval_lsat_ar", "agi_eval_lsat_ar.jsonl", MULTIPLE_CHOICE, 3, 0.25),
    TaskSpec("bigbench_cs_algorithms", "bigbench_cs_algorithms.jsonl", LANGUAGE_MODELING, 10, 0.0),
    TaskSpec("bigbench_operators", "bigbench_operators.jsonl", LANGUAGE_MODELING, 10, 0.0),
    TaskSpec("bigbench_repeat_copy_logic", "bigbench_repeat_copy_logic.jsonl", LANGUAGE_MODELING, 10, 0.0),
    # boolq: the majority-class rate (as in DCLM's metadata), so always answering "yes" scores 0, not 0.24.
    TaskSpec("boolq", "boolq.jsonl", MULTIPLE_CHOICE, 10, 0.622),
    TaskSpec("bigbench_language_identification", "bigbench_language_identification.jsonl", MULTIPLE_CHOICE, 10, 0.25),
)


@dataclass(frozen=True)
class Example:
    """One example as options: option i is `contexts[i] ⊕ continuations[i]`; LM examples have one option."""

    line: int  # 1-based line in its file
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int  # the correct option (0 for language modeling)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    shots: int
    baseline: float
    path: Path
    examples: tuple[Example, ...]


def _text(record: dict, key: str, many: bool = False) -> Any:
    """record[key] if it is a string (`many`: a non-empty list of strings), else ValueError."""
    value = record.get(key)
    if not many and not isinstance(value, str):
        raise ValueError(f'"{key}" must be a string.')
    if many and (not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value)):
        raise ValueError(f'"{key}" must be a non-empty list of strings.')
    return value


def _gold(record: dict, n: int) -> int:
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise ValueError(f'"gold" must be an integer in [0, {n}), got {gold!r}.')
    return gold


def parse_example(record: Any, line: int) -> tuple[str, Example]:
    """(kind, example) of one decoded jsonl record; ValueError (one sentence) if it fits no format."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object.")
    if "choices" in record or "query" in record:
        query, choices = _text(record, "query"), _text(record, "choices", True)
        return MULTIPLE_CHOICE, Example(line, (query,) * len(choices), tuple(choices), _gold(record, len(choices)))
    if "context_options" in record:
        options, continuation = _text(record, "context_options", True), _text(record, "continuation")
        return SCHEMA, Example(line, tuple(options), (continuation,) * len(options), _gold(record, len(options)))
    if "context" in record and "continuation" in record:
        return LANGUAGE_MODELING, Example(line, (_text(record, "context"),), (_text(record, "continuation"),), 0)
    raise ValueError(f"unknown format: expected {_FORMATS}.")


def _records(path: Path) -> Iterator[tuple[str, Example]]:
    """(kind, example) of every non-blank line, all of one kind; ValueError with file:line, or for an empty file."""
    first = ""  # the file's kind
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                kind, example = parse_example(json.loads(line), number)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}).") from None
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
            if first and kind != first:
                raise ValueError(f"{path}:{number}: a {kind} example in a {first} task file.")
            first = kind
            yield kind, example
    if not first:
        raise ValueError(f"{path} holds no examples (an empty task).")


def read_examples(path: str | Path) -> tuple[str, tuple[Example, ...]]:
    """The kind and examples of a task file (blank lines skipped)."""
    records = list(_records(Path(path)))
    return records[0][0], tuple(example for _, example in records)


def chance_rate(examples: Sequence[Example], kind: str) -> float:
    """The expected accuracy of a uniform random guess (0 for language modeling)."""
    return 0.0 if kind == LANGUAGE_MODELING else statistics.fmean(1.0 / len(e.continuations) for e in examples)


def load_task(spec: TaskSpec, directory: str | Path) -> Task:
    path = Path(directory) / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"task {spec.name}: {path} does not exist.")
    kind, examples = read_examples(path)
    if kind != spec.kind:
        raise ValueError(f"task {spec.name}: {path} holds {kind} examples, expected {spec.kind}.")
    baseline = chance_rate(examples, kind) if spec.baseline is None else spec.baseline
    return Task(name=spec.name, kind=kind, shots=spec.shots, baseline=baseline, path=path, examples=examples)


def find_tasks(directory: str | Path, names: Sequence[str] | None = None) -> list[TaskSpec]:
    """`CORE_TASKS` in `directory` and other *.jsonl (0-shot, chance baseline); `names` (labels or stems) picks some."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of task files.")
    known = {spec.file for spec in CORE_TASKS}
    files = [path for path in sorted(directory.glob("*.jsonl")) if path.name not in known]
    extra = [TaskSpec(path.stem, path.name, next(_records(path))[0], 0, None) for path in files]
    present = [spec for spec in CORE_TASKS if (directory / spec.file).is_file()] + extra
    if names is None:
        if not present:
            raise ValueError(f"{directory} holds no task files (*.jsonl).")
        return present
    by_name = {key: spec for spec in (*CORE_TASKS, *extra) for key in (spec.name, Path(spec.file).stem)}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        available = ", ".join(spec.name for spec in present)
        raise ValueError(f"unknown task {unknown[0]!r}; the tasks in {directory} are: {available}.")
    return [by_name[name] for name in dict.fromkeys(names)]


def fewshot_indices(n: int, index: int, shots: int, seed: int, task: str) -> list[int]:
    """`min(shots, n − 1)` distinct example indices ≠ `index`, seeded by (seed, task, index)."""
    k = min(shots, n - 1)
    if k <= 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8")), index])
    return [int(p) + int(p >= index) for p in rng.choice(n - 1, size=k, replace=False)]  # skip `index` itself


def join(context: str, continuation: str) -> tuple[str, str]:
    """(unscored head, scored tail) of `a + " " + b` (`a + b` when `a` is empty or ends in whitespace). The tail
    holds the whitespace, and is tokenized apart, so the scored tokens are exactly the continuation's (as lm-eval)."""
    head = context.rstrip()
    trailing = context[len(head) :]
    return head, trailing + ("" if trailing or not head else " ") + continuation


def render_option(example: Example, option: int, demos: Sequence[Example]) -> tuple[str, str]:
    """(head, tail) of one option's prompt: the demonstrations' gold options + FEWSHOT_SEPARATOR, then the option."""
    prefix = "".join("".join(join(d.contexts[d.gold], d.continuations[d.gold])) + FEWSHOT_SEPARATOR for d in demos)
    return join(prefix + example.contexts[option], example.continuations[option])


@dataclass(frozen=True)
class EncodedExample:
    rows: tuple[Row, ...]  # one per option
    fewshot: tuple[int, ...]  # indices of the demonstrations in the task's examples
    truncated: bool


def encode_examples(
    task: Task, indices: Sequence[int], tokenizer: Tokenizer, *, seed: int, shots: int, max_len: int
) -> list[EncodedExample]:
    """The rows (BOS, then the prompt) of the examples at `indices`; over-long rows are cut on the left."""
    examples = task.examples
    draws = [fewshot_indices(len(examples), i, shots, seed, task.name) for i in indices]
    texts: list[str] = []
    for i, draw in zip(indices, draws, strict=True):
        for option in range(len(examples[i].contexts)):
            texts.extend(render_option(examples[i], option, [examples[j] for j in draw]))
    tokens = iter(tokenizer.encode_batch(texts))
    encoded = []
    for i, draw in zip(indices, draws, strict=True):
        pieces = [(next(tokens), next(tokens)) for _ in examples[i].contexts]
        if not all(tail for _, tail in pieces):
            raise ValueError(f"{task.path}:{examples[i].line}: the continuation is empty.")
        # Every option keeps as many context tokens, so that the longest fits the window.
        keep = max(1, max_len + 1 - max(len(tail) for _, tail in pieces))
        rows, truncated = [], False
        for head, tail in pieces:
            context = [tokenizer.bos_id, *head]
            row, cut = make_row(context[-keep:], tail, max_len)
            rows.append(row)
            truncated |= cut or keep < len(context)
        encoded.append(EncodedExample(rows=tuple(rows), fewshot=tuple(draw), truncated=truncated))
    return encoded


def subset(n: int, max_per_task: int | None) -> list[int]:
    """All indices, or `max_per_task` of them from a fixed permutation (in file order), the same for every seed."""
    if max_per_task is None or max_per_task >= n:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(SUBSET_SEED).permutation(n)[:max_per_task])


def centered(accuracy: np.ndarray | float, baseline: np.ndarray | float) -> np.ndarray:
    """(acc − b)/(1 − b): 0 at the random baseline, 1 when every answer is right."""
    return (np.asarray(accuracy) - np.asarray(baseline)) / (1.0 - np.asarray(baseline))


@dataclass
class CoreResult:
    tasks: list[Task]
    shots: list[int]  # few-shot examples used per task
    examples: list[int]  # examples evaluated per task
    depths: list[int]
    seeds: list[int]
    accuracy: np.ndarray  # [depth, seed, task]

    @property
    def centered(self) -> np.ndarray:
        return centered(self.accuracy, np.array([t.baseline for t in self.tasks]))

    @property
    def core(self) -> np.ndarray:
        """[depth, seed]: mean centered accuracy over the tasks."""
        return self.centered.mean(axis=-1)

    @property
    def label(self) -> str:
        full = {t.name for t in self.tasks} == {s.name for s in CORE_TASKS} and len(self.tasks) == len(CORE_TASKS)
        return "CORE-18" if full else f"CORE ({len(self.tasks)} tasks)"

    def to_dict(self) -> dict[str, Any]:
        def mean_std(values: np.ndarray) -> dict[str, float]:
            return {"mean": float(values.mean()), "std": float(values.std())}  # population std over seeds

        per_depth = []
        for d, depth in enumerate(self.depths):
            acc, cen, core = self.accuracy[d], self.centered[d], self.core[d]
            tasks = {
                t.name: dict(accuracy=mean_std(acc[:, i]), centered=mean_std(cen[:, i]), per_seed=acc[:, i].tolist())
                for i, t in enumerate(self.tasks)
            }
            per_depth.append(dict(depth=depth, core=mean_std(core), core_per_seed=core.tolist(), tasks=tasks))
        tasks = [
            dict(name=t.name, file=t.path.name, kind=t.kind, shots=s, baseline=t.baseline, examples=n)
            for t, s, n in zip(self.tasks, self.shots, self.examples, strict=True)
        ]
        return {"label": self.label, "seeds": self.seeds, "depths": self.depths, "tasks": tasks, "results": per_depth}

    def format_table(self) -> str:
        """Accuracy (%) per task and depth (mean over seeds), then the CORE row (centered × 100, ± std)."""
        cols = "".join(f"{'T=' + str(d):>14}" for d in self.depths)
        lines = [f"{'task':<33}{'kind':>7}{'shots':>6}{'n':>6}{'base%':>7}{cols}"]
        for i, t in enumerate(self.tasks):
            accs = "".join(f"{100 * self.accuracy[d, :, i].mean():>14.1f}" for d in range(len(self.depths)))
            row = f"{t.name:<33}{KIND_LABELS[t.kind]:>7}{self.shots[i]:>6}{self.examples[i]:>6}"
            lines.append(f"{row}{100 * t.baseline:>7.1f}{accs}")
        several = len(self.seeds) > 1
        cells = [f"{100 * c.mean():.2f}" + (f" ± {100 * c.std():.2f}" if several else "") for c in self.core]
        label = f"{self.label} (centered ×100{', mean ± std over seeds' if several else ''})"
        lines.append(f"{label:<59}" + "".join(f"{cell:>14}" for cell in cells))
        return "\n".join(lines)


def layer_passes(config: Any, depth: int) -> int:
    """Blocks a token runs through at depth `depth` (prelude, `depth` × core, coda): its cost, the progress unit."""
    return config.n_prelude + config.n_coda + (depth * config.n_core if config.is_looped else 0)


def evaluate_core(
    model: Parcae,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    depths: Sequence[int],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    max_per_task: int | None = None,
    fewshot: int | None = None,
    batch_size: int = 32,
    max_len: int | None = None,
    predictions: TextIO | None = None,
    progress: bool = False,
) -> CoreResult:
    """Accuracy [depth, seed, task]; a seed sets the few-shot draw and h₀ (one that changes neither copies seed 0's
    results). `fewshot` overrides all shots, `batch_size` counts rows, `predictions` gets a JSON line per result."""
    from tqdm.auto import tqdm

    depths, seeds = check_integers(depths, "depths"), check_integers(seeds, "seeds", least=0)
    if not tasks:
        raise ValueError("no tasks to evaluate.")
    if fewshot is not None and fewshot < 0:
        raise ValueError(f"fewshot must be ≥ 0, got {fewshot}.")
    max_len = max_len or model.config.max_seq_len
    shots = [t.shots if fewshot is None else fewshot for t in tasks]
    chosen = [subset(len(t.examples), max_per_task) for t in tasks]
    h0 = seed_changes_h0(model.config)
    repeating = [t for t, task in enumerate(tasks) if not h0 and min(shots[t], len(task.examples) - 1) <= 0]
    plans: list[tuple[list[tuple[int, int]], list[EncodedExample]]] = []  # per seed: (task, example) pairs, groups
    for s, seed in enumerate(seeds):
        scored = [t for t in range(len(tasks)) if s == 0 or t not in repeating]
        groups: list[EncodedExample] = []
        for t in scored:
            groups += encode_examples(tasks[t], chosen[t], tokenizer, seed=seed, shots=shots[t], max_len=max_len)
        plans.append(([(t, i) for t in scored for i in chosen[t]], groups))
    accuracy = np.zeros((len(depths), len(seeds), len(tasks)))
    # (depth, task): the first seed's records, which the later seeds of a repeating task copy
    first: dict[tuple[int, int], list[dict]] = {(d, t): [] for d in range(len(depths)) for t in repeating}
    passes = [layer_passes(model.config, depth) for depth in depths]
    total = sum(tokens_fed(model, [g.rows for g in groups]) for _, groups in plans) * sum(passes)
    common = {"batch_size": batch_size, "pad_id": tokenizer.pad_id, "vocab_limit": tokenizer.vocab_size}
    # smoothing=0: the ETA uses the mean rate since the start, not the last few batches' (which swings with load).
    bar = tqdm(total=total, desc="CORE", unit=" token-layers", unit_scale=True, smoothing=0, disable=not progress)
    with bar:
        for s, (seed, (owners, groups)) in enumerate(zip(seeds, plans, strict=True)):
            for d, depth in enumerate(depths):

                def advance(fed: int, n: int = passes[d]) -> None:
                    bar.update(fed * n)

                rows = [g.rows for g in groups]
                scores = score_groups(model, rows, num_steps=depth, state_seed=seed, on_tokens=advance, **common)
                for (t, i), group, row_scores in zip(owners, groups, scores, strict=True):
                    task, example = tasks[t], tasks[t].examples[i]
                    losses = [r.mean_nll for r in row_scores]
                    pred = None if task.kind == LANGUAGE_MODELING else int(np.argmin(losses))  # ties: the first
                    correct = row_scores[0].greedy if pred is None else pred == example.gold
                    accuracy[d, s, t] += correct
                    fewshot_lines = [task.examples[j].line for j in group.fewshot]
                    record = {"task": task.name, "line": example.line, "depth": depth, "seed": seed}
                    record.update(correct=bool(correct), mean_nll=[round(x, 6) for x in losses])
                    record.update(fewshot_lines=fewshot_lines, truncated=group.truncated)
                    if pred is not None:
                        record.update(gold=example.gold, pred=pred)
                    if s == 0 and t in repeating:
                        first[d, t].append(record)
                    if predictions is not None:
                        predictions.write(json.dumps(record) + "\n")
                for t in repeating if s > 0 else ():  # the first seed's prompts and h₀, so its results, copied
                    accuracy[d, s, t] = accuracy[d, 0, t]
                    if predictions is not None:
                        predictions.writelines(json.dumps({**r, "seed": seed}) + "\n" for r in first[d, t])
    examples = [len(idx) for idx in chosen]
    accuracy /= np.array(examples, dtype=float)
    return CoreResult(tasks=list(tasks), shots=shots, examples=examples, depths=depths, seeds=seeds, accuracy=accuracy)
