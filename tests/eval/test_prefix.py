"""Prompt sharing in the scorer: copying KV-cache rows, and shared-prompt scores equal to one-pass scores for
multiple-choice, schema and language-modeling rows, looped and fixed-depth models, on random and real prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parcae import Parcae, get_preset
from parcae.data.tokenizer import ByteTokenizer
from parcae.eval.core import encode_examples, find_tasks, load_task
from parcae.eval.scoring import (
    Row,
    SharedPrompt,
    evaluating,
    pack_prompts,
    score_groups,
    score_rows,
    score_shared,
    share_prompts,
    tokens_fed,
)
from test_model import ids, randomise, small

SHARED_CORE = Path(__file__).resolve().parents[2].parent / "shared" / "eval" / "core"
TOK = ByteTokenizer()
MODELS = {"looped": {}, "transformer": {"n_core": 0, "n_prelude": 2, "n_coda": 1}}
COMMON = {"state_seed": 1, "pad_id": TOK.pad_id, "vocab_limit": TOK.vocab_size}


def micro(max_seq_len: int = 128, **overrides) -> Parcae:
    torch.manual_seed(0)
    return randomise(Parcae(get_preset("parcae-micro", max_seq_len=max_seq_len, **overrides))).eval()


def greedy_tokens(model: Parcae, context: list[int], n: int, steps: int) -> list[int]:
    """n tokens of greedy decoding (below the tokenizer's vocabulary) by full forwards, the reference."""
    tokens = list(context)
    for _ in range(n):
        logits = model(torch.tensor([tokens]), num_steps=steps if model.config.is_looped else None).logits
        tokens.append(int(logits[0, -1, : TOK.vocab_size].argmax()))
    return tokens[len(context) :]


def task_groups(model: Parcae, steps: int) -> list[list[Row]]:
    """MC examples (a shared context; options of 1–9 tokens, one the greedy one), schema examples (contexts of
    their own, one continuation) and LM examples, with contexts of 1–60 tokens."""
    rng = np.random.default_rng(0)
    word = lambda low, high: rng.integers(0, 256, size=int(rng.integers(low, high))).tolist()  # noqa: E731
    groups = []
    for _ in range(5):  # multiple choice
        context = [TOK.bos_id, *word(0, 60)]
        options = [word(1, 10) for _ in range(int(rng.integers(2, 5)))] + [greedy_tokens(model, context, 3, steps)]
        groups.append([Row(np.array(context + option), len(context)) for option in options])
    for _ in range(3):  # schema
        continuation = word(1, 6)
        contexts = [[TOK.bos_id, *word(0, 40)] for _ in range(3)]
        groups.append([Row(np.array(context + continuation), len(context)) for context in contexts])
    for _ in range(3):  # language modeling
        context = [TOK.bos_id, *word(0, 50)]
        groups.append([Row(np.array(context + greedy_tokens(model, context, 4, steps)), len(context))])
    groups.append([Row(np.array([TOK.bos_id, 7, 8, 9]), 1)])  # BOS alone as the context
    return groups


def assert_same_scores(got: list[list], expected: list[list]) -> None:
    assert [len(g) for g in got] == [len(g) for g in expected]
    pairs = [(a, b) for g, h in zip(got, expected, strict=True) for a, b in zip(g, h, strict=True)]
    assert [a.nll for a, _ in pairs] == pytest.approx([b.nll for _, b in pairs], rel=1e-5, abs=1e-5)
    assert [(a.count, a.greedy) for a, _ in pairs] == [(b.count, b.greedy) for _, b in pairs]


def fed_tokens(model: Parcae) -> list[int]:
    """Tokens embedded by every forward of `model` from now on (a running list)."""
    counts: list[int] = []
    model.embed.register_forward_hook(lambda module, inputs, output: counts.append(inputs[0].numel()))
    return counts


def real_tokens(model: Parcae, pad_id: int) -> list[int]:
    """Tokens other than `pad_id` embedded by every forward of `model` from now on (a running list)."""
    counts: list[int] = []
    model.embed.register_forward_hook(lambda _, inputs, __: counts.append(int((inputs[0] != pad_id).sum())))
    return counts


# ---------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("variant", list(MODELS))
def test_selected_cache_rows_continue_like_each_row_alone(variant: str) -> None:
    torch.manual_seed(0)
    model = randomise(Parcae(small(**MODELS[variant]))).eval()
    prompts = [ids(1, n)[0].tolist() for n in (6, 2)]
    padded = torch.tensor([[0] * (6 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (6 - len(p)) + [1] * len(p) for p in prompts])
    cache = model.new_cache(2, 6 + 5, max_steps=3)
    model.forward_cached(padded, cache, attention_mask=mask, num_steps=3)
    before = (cache.outer.clone(), cache.core.clone())
    index = [1, 0, 1]
    copy = cache.select_rows(index)
    assert (copy.batch_size, copy.capacity, copy.length, copy.padding.tolist()) == (3, 11, 6, [4, 0, 4])
    follow = ids(3, 5)
    logits = model.forward_cached(follow, copy, num_steps=3).logits
    for r, source in enumerate(index):
        alone = torch.tensor([prompts[source] + follow[r].tolist()])
        expected = model(alone, num_steps=3 if model.config.is_looped else None).logits[0, -5:]
        torch.testing.assert_close(logits[r], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close((cache.outer, cache.core), before, atol=0, rtol=0)  # the source is untouched


def test_selecting_rows_without_padding_keeps_the_plain_causal_path() -> None:
    model = randomise(Parcae(small())).eval()
    cache = model.new_cache(2, 8)
    model.forward_cached(ids(2, 4), cache, attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    assert cache.padding is not None
    assert cache.select_rows([0, 0]).padding is None and cache.select_rows([1, 0]).padding.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("index", "message"), [([], "non-empty"), ([[0]], "non-empty"), ([2], r"\[0, 2\)"), ([-1], r"\[0, 2\)")]
)
def test_bad_row_selection_is_one_clear_error(index, message: str) -> None:
    model = Parcae(small()).eval()
    cache = model.new_cache(2, 8)
    model.forward_cached(ids(2, 4), cache)
    with pytest.raises(ValueError, match=message):
        cache.select_rows(index)


def test_rows_cannot_be_copied_in_the_middle_of_a_forward() -> None:
    cache = Parcae(small()).new_cache(1, 8)
    cache.begin(2)
    with pytest.raises(RuntimeError, match="commit"):
        cache.select_rows([0])


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("variant", list(MODELS))
def test_shared_prompts_score_like_one_pass(variant: str) -> None:
    model = micro(**MODELS[variant])
    groups = task_groups(model, steps=3)
    unused = model.config.vocab_size - 1  # as padding: greedy continuations may hold the tokenizer's pad id
    counts, real, progress, fed = fed_tokens(model), real_tokens(model, unused), [], []
    shared = score_groups(model, groups, batch_size=6, num_steps=3, on_batch=progress.append, on_tokens=fed.append,
                          **{**COMMON, "pad_id": unused})  # fmt: skip
    shared_tokens = sum(counts)
    assert sum(progress) == sum(len(g) for g in groups) and max(progress) <= 6
    # The progress in tokens is what the model was fed (padding aside), and known before scoring.
    assert sum(fed) == tokens_fed(model, groups) == sum(real)
    counts.clear()
    fed.clear()
    one_pass = score_groups(model, groups, batch_size=6, num_steps=3, share=False, on_tokens=fed.append, **COMMON)
    assert sum(fed) == tokens_fed(model, groups, share=False) > tokens_fed(model, groups)
    assert_same_scores(shared, one_pass)
    assert any(row.greedy for group in one_pass for row in group)  # the greedy flags are compared, not all False
    assert shared_tokens < 0.75 * sum(counts)  # the MC contexts were fed once, not once per option
    alone = [[score_rows(model, [row], num_steps=3, **COMMON)[0] for row in group] for group in groups]
    assert_same_scores(shared, alone)


@pytest.mark.parametrize("variant", list(MODELS))
def test_score_shared_with_one_continuation_per_context(variant: str) -> None:
    """The shared path itself is exact for rows of their own (schema, LM) and for one-token continuations."""
    model = micro(**MODELS[variant])
    rows = [row for group in task_groups(model, steps=2) for row in group]
    rows += [Row(np.array([TOK.bos_id, 5, 6, 7]), 3), Row(np.array([TOK.bos_id, 9]), 1)]
    prompts = [SharedPrompt(row.tokens[: row.start], (row.tokens[row.start :],), (i,)) for i, row in enumerate(rows)]
    with evaluating(model):
        got = score_shared(model, prompts, num_steps=2, **COMMON)
        one_token = score_shared(model, prompts[-2:], num_steps=2, **COMMON)  # no continuation forward at all
        expected = score_rows(model, rows, num_steps=2, **COMMON)
    assert_same_scores(got, [[score] for score in expected])
    assert_same_scores(one_token, [[score] for score in expected[-2:]])


def test_share_prompts_groups_rows_by_their_exact_context_tokens() -> None:
    rows = [Row(np.array([1, 2, 3, 4]), 2), Row(np.array([1, 2, 5]), 2), Row(np.array([1, 2, 3, 4]), 3),
            Row(np.array([1, 2, 6, 6, 6]), 2)]  # fmt: skip
    prompts = share_prompts(rows)
    assert [p.rows for p in prompts] == [(0, 1, 3), (2,)]
    assert prompts[0].context.tolist() == [1, 2] and [c.tolist() for c in prompts[0].continuations] == [
        [3, 4], [5], [6, 6, 6]]  # fmt: skip
    assert prompts[0].columns == 2 + 3 - 1 and prompts[1].columns == 3


def test_prompt_batches_respect_rows_columns_and_cache_bytes() -> None:
    def prompt(context: int, *continuations: int) -> SharedPrompt:
        return SharedPrompt(np.zeros(context, np.int64), tuple(np.zeros(c, np.int64) for c in continuations), ())

    prompts = [prompt(30, 2, 2), prompt(5, 20, 3), prompt(10, 2, 2, 2), prompt(28, 1, 3)]
    batches = pack_prompts(prompts, max_rows=5, max_columns=32, bytes_per_token=1)
    assert sorted(p for b in batches for p in b) == [0, 1, 2, 3]
    for batch in batches:
        assert sum(len(prompts[p].continuations) for p in batch) <= 5
        width = max(len(prompts[p].context) for p in batch)
        assert width + max(prompts[p].columns - len(prompts[p].context) for p in batch) <= 32
    assert batches[0] == [0, 3]  # longest contexts first
    assert len(pack_prompts(prompts, max_rows=100, max_columns=100, bytes_per_token=2**31)) == len(prompts)


def test_long_contexts_and_long_continuations_never_share_a_batch_beyond_the_context() -> None:
    model = micro(max_seq_len=32)
    rng = np.random.default_rng(1)
    long_context = [TOK.bos_id, *rng.integers(0, 256, 29).tolist()]
    short_context = [TOK.bos_id, *rng.integers(0, 256, 4).tolist()]
    groups = [
        [Row(np.array([*long_context, 1, 2]), 30), Row(np.array([*long_context, 3]), 30)],
        [Row(np.array([*short_context, *range(27)]), 5), Row(np.array([*short_context, 4, 5]), 5)],
    ]
    shared = score_groups(model, groups, batch_size=8, num_steps=2, **COMMON)  # 30 + 26 columns would not fit
    assert_same_scores(shared, score_groups(model, groups, batch_size=8, num_steps=2, share=False, **COMMON))


@pytest.mark.skipif(not SHARED_CORE.is_dir(), reason="the shared CORE task files are not present")
def test_real_core_prompts_score_the_same_shared_or_not() -> None:
    """Few-shot prompts of every shared task file, truncated to a 128-token context, as the harness builds them."""
    model = micro(max_seq_len=128)
    groups = []
    for spec in find_tasks(SHARED_CORE):
        task = load_task(spec, SHARED_CORE)
        groups += [e.rows for e in encode_examples(task, [0], TOK, seed=0, shots=spec.shots, max_len=128)]
    shared = score_groups(model, groups, batch_size=16, num_steps=2, **COMMON)
    assert_same_scores(shared, score_groups(model, groups, batch_size=16, num_steps=2, share=False, **COMMON))
