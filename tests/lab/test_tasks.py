"""Reasoning-task generators: deterministic, correct (checked by an independent solver), disjoint splits."""

from __future__ import annotations

import re

import pytest

from parcae.lab.tasks import ANSWER_END, TASKS, generate, get_task, make_splits, parse_difficulties


def solve(task: str, prompt: str) -> str:
    """An independent solver that reads only the prompt text."""
    if task == "chain":
        env: dict[str, int] = {}
        *assignments, query = prompt.split(";")
        for assignment in assignments:
            name, expr = assignment.split("=")
            match = re.fullmatch(r"([a-z])([+\-*])(\d)", expr)
            if match is None:
                env[name] = int(expr)
            else:
                left, op, right = env[match[1]], match[2], int(match[3])
                env[name] = (left + right if op == "+" else left - right if op == "-" else left * right) % 10
        return str(env[query.strip("?=")])
    if task == "addition":
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b))
    if task == "parity":
        return str(prompt.rstrip("?").count("1") % 2)
    if task == "pointer":
        edges, query = prompt.split(";")
        step = dict(tuple(map(int, edge.split(">"))) for edge in edges.split(","))
        start, hops = map(int, query.rstrip("=").split("@"))
        for _ in range(hops):
            start = step[start]
        return str(start)
    raise AssertionError(task)


@pytest.mark.parametrize("name", list(TASKS))
def test_answers_are_correct_and_deterministic(name: str) -> None:
    task = get_task(name)
    for difficulty in (1, 2, 5, task.max_difficulty):
        examples = list(generate(task, difficulty, 50, seed=3, split="train"))
        assert examples == list(generate(task, difficulty, 50, seed=3, split="train"))
        assert examples != list(generate(task, difficulty, 50, seed=4, split="train"))
        for example in examples:
            assert example.answer.endswith(ANSWER_END) and example.difficulty == difficulty
            assert example.answer[: -len(ANSWER_END)] == solve(name, example.prompt)
            assert example.text.isascii()


def test_difficulty_scales_the_work() -> None:
    chain = get_task("chain")
    short = next(generate(chain, 2, 1, seed=0, split="train"))
    long = next(generate(chain, 9, 1, seed=0, split="train"))
    assert short.prompt.count(";") == 3 and long.prompt.count(";") == 10


def test_splits_never_share_instances() -> None:
    task = get_task("chain")
    train, test = make_splits(task, [1, 2, 3], [1, 2, 3, 8], 400, 200, seed=0)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    by_difficulty = {d: sum(ex.difficulty == d for ex in test) for d in (1, 2, 3, 8)}
    assert by_difficulty[8] == 200  # a large instance space fills the quota
    # Difficulty 1 has 270 distinct prompts: about a tenth of them are held out, each tested once.
    assert 10 <= by_difficulty[1] < 60
    assert len({ex.prompt for ex in test}) == len(test)
    assert sum(ex.difficulty == 1 for ex in train) == 400  # training draws repeat, from its own part only


def test_parse_difficulties_and_bad_input() -> None:
    task = get_task("pointer")
    assert parse_difficulties("1-3,7", task) == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="inverted"):
        parse_difficulties("6-1", task)
    with pytest.raises(ValueError, match="look like"):
        parse_difficulties("a-b", task)
    with pytest.raises(ValueError, match="1–30"):
        parse_difficulties("0-4", task)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="difficulties 1–12"):
        get_task("addition").example(13, __import__("random").Random(0))


def test_reasoning_lab_quick_run(tmp_path) -> None:
    from parcae.lab.reasoning import encode, fixed_depth_configs, run_reasoning_lab
    from parcae.lab.tasks import Example

    results = run_reasoning_lab(
        "chain", [1, 2], [1, 2, 4], tmp_path, steps=3, batch_size=8, train_per_difficulty=40,
        test_per_difficulty=10, preset="parcae-micro", echo=lambda _: None,
    )  # fmt: skip
    models = results["models"]
    assert set(models) == {"parcae", "gpt-params", "gpt-flops"}
    assert set(models["parcae"]["accuracy_by_depth"]) == {str(t) for t in range(1, 13)}
    assert set(models["gpt-params"]["accuracy"]) == {1, 2, 4}
    used = models["parcae"]["adaptive_exit"]["iterations"]
    assert set(used) == {1, 2, 4} and all(1 <= v <= 12 for v in used.values())
    assert (tmp_path / "parcae_heatmap.png").is_file() and (tmp_path / "accuracy_by_difficulty.png").is_file()
    assert "gpt-flops" in (tmp_path / "report.md").read_text()
    from parcae import count_params, get_preset

    looped = get_preset("parcae-tiny")
    by_params, by_flops = fixed_depth_configs(looped)
    assert abs(count_params(by_params) - count_params(looped)) / count_params(looped) < 0.02
    assert by_flops.n_layers == 20  # 2 + 2 + 2 · E[T] with μ_rec 8
    # Labels cover exactly the answer tokens.
    from parcae.data.tokenizer import ByteTokenizer

    encoded = encode([Example("a=1;?a=", "1\n", 1)], ByteTokenizer())
    targets = encoded.labels[encoded.labels != -100].tolist()
    assert bytes(targets) == b"1\n"
