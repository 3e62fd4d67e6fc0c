"""Synthetic multi-step reasoning tasks (README § Reasoning lab): difficulty = sequential steps the answer needs.

A tiny alphabet, so the byte tokenizer (or any other) reads them directly; answers are scored by exact match.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ANSWER_END = "\n"  # every answer ends with a newline, so exact match also checks where it stops


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # including ANSWER_END
    difficulty: int

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[int, random.Random], tuple[str, str]]  # (prompt, answer without ANSWER_END)
    max_difficulty: int

    def example(self, difficulty: int, rng: random.Random) -> Example:
        if not 1 <= difficulty <= self.max_difficulty:
            raise ValueError(f"task {self.name!r} takes difficulties 1–{self.max_difficulty}, got {difficulty}.")
        prompt, answer = self.make(difficulty, rng)
        return Example(prompt, answer + ANSWER_END, difficulty)


def _chain(difficulty: int, rng: random.Random) -> tuple[str, str]:
    names = string.ascii_lowercase
    value = rng.randrange(10)
    parts = [f"a={value}"]
    for i in range(1, difficulty + 1):
        op, const = rng.choice("+-*"), rng.randrange(1, 10)
        value = {"+": value + const, "-": value - const, "*": value * const}[op] % 10
        parts.append(f"{names[i]}={names[i - 1]}{op}{const}")
    return ";".join(parts) + f";?{names[difficulty]}=", str(value)


def _addition(difficulty: int, rng: random.Random) -> tuple[str, str]:
    low = 10 ** (difficulty - 1) if difficulty > 1 else 0
    a, b = rng.randrange(low, 10**difficulty), rng.randrange(low, 10**difficulty)
    return f"{a}+{b}=", str(a + b)


def _parity(difficulty: int, rng: random.Random) -> tuple[str, str]:
    bits = [rng.randrange(2) for _ in range(2 * difficulty + 2)]
    return "".join(map(str, bits)) + "?", str(sum(bits) % 2)


def _pointer(difficulty: int, rng: random.Random) -> tuple[str, str]:
    nodes = list(range(10))
    targets = nodes[:]
    rng.shuffle(targets)  # a random function node → node, listed in shuffled order
    edges = [f"{n}>{targets[n]}" for n in nodes]
    rng.shuffle(edges)
    start = rng.randrange(10)
    node = start
    for _ in range(difficulty):
        node = targets[node]
    return ",".join(edges) + f";{start}@{difficulty}=", str(node)


TASKS: dict[str, Task] = {
    "chain": Task("chain", _chain, 25),  # k-hop variable chain, arithmetic mod 10
    "addition": Task("addition", _addition, 12),  # sum of two d-digit numbers
    "parity": Task("parity", _parity, 30),  # parity of 2d + 2 bits
    "pointer": Task("pointer", _pointer, 30),  # follow d pointers in a shuffled 10-node function graph
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]


def parse_difficulties(text: str, task: Task) -> list[int]:
    """'1-6' or '1,2,8' → sorted difficulties, each within the task's range."""
    values: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"difficulties must look like '1-6' or '1,2,8', got {text!r}.") from None
        if last < first:
            raise ValueError(f"difficulty range {part.strip()!r} is inverted.")
        values.update(range(first, last + 1))
    if not values:
        raise ValueError(f"no difficulties in {text!r}.")
    bad = [d for d in values if not 1 <= d <= task.max_difficulty]
    if bad:
        raise ValueError(f"task {task.name!r} takes difficulties 1–{task.max_difficulty}, got {min(bad)}.")
    return sorted(values)


def generate(task: Task, difficulty: int, count: int, seed: int, split: str) -> Iterator[Example]:
    """`count` examples of one difficulty from the split's own deterministic stream."""
    digest = hashlib.blake2b(f"{seed}/{split}/{difficulty}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    for _ in range(count):
        yield task.example(difficulty, rng)


# One instance in TEST_SHARE belongs to the test split, decided by a hash of its prompt: small instance spaces
# (chain at difficulty 1 has 270 prompts) keep test instances that training can never draw.
TEST_SHARE = 10
# Draws per wanted example before giving up on a small instance space (its distinct test prompts are exhausted).
MAX_DRAWS_PER_EXAMPLE = 20


def is_test_instance(prompt: str, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}/{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % TEST_SHARE == 0


def make_splits(
    task: Task, train: list[int], test: list[int], train_per_difficulty: int, test_per_difficulty: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Train and test examples that never share a prompt (each belongs to one split by its hash). Train examples
    repeat, as a data stream; test ones are distinct, fewer where the held-out instance space is smaller."""
    train_examples = []
    for d in train:
        draws = generate(task, d, train_per_difficulty * MAX_DRAWS_PER_EXAMPLE, seed, "train")
        kept = (ex for ex in draws if not is_test_instance(ex.prompt, seed))
        train_examples.extend(itertools.islice(kept, train_per_difficulty))
    test_examples = []
    for d in test:
        seen: set[str] = set()
        for ex in generate(task, d, test_per_difficulty * MAX_DRAWS_PER_EXAMPLE, seed, "test"):
            if ex.prompt not in seen and is_test_instance(ex.prompt, seed):
                seen.add(ex.prompt)
                test_examples.append(ex)
                if len(seen) == test_per_difficulty:
                    break
    return train_examples, test_examples
