from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae.data.packing import IGNORE_INDEX, BestFitPacker, rank_documents, val_batches
from parcae.data.shards import MemoryStore

PAD = -7  # outside every test token, so padding is unmistakable


def long_tailed_lengths(n: int, seed: int = 0, cap: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.pareto(1.3, n) * 120 + 2, cap).astype(np.int64)


def unique_store(lengths) -> MemoryStore:
    """Documents whose tokens are their global positions (1, 2, 3, ...): every piece is traceable."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return MemoryStore(np.arange(1, offsets[-1] + 1, dtype=np.int64), offsets)


def drain(packer: BestFitPacker) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(packer)


def rows_of(batches) -> list[np.ndarray]:
    """Full rows (seq_len + 1 tokens) back from (inputs, labels)."""
    rows = []
    for x, y in batches:
        full = torch.cat([x, x.new_full((x.shape[0], 1), PAD)], dim=1).numpy()
        full[:, -1] = np.where(y[:, -1].numpy() == IGNORE_INDEX, PAD, y[:, -1].numpy())
        rows.extend(full)
    return rows


def pieces_of(store: MemoryStore, rows) -> list[tuple[int, int, int]]:
    """(doc, start, end) pieces in stream order, splitting rows where the token sequence jumps."""
    out = []
    for row in rows:
        tokens = row[row != PAD]
        positions = tokens - 1
        docs = np.searchsorted(store.offsets, positions, side="right") - 1
        breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(docs) != 0)) + 1
        for run in np.split(np.arange(tokens.size), breaks):
            d = int(docs[run[0]])
            start = int(positions[run[0]] - store.offsets[d])
            out.append((d, start, start + run.size))
    return out


def test_rank_partition_is_exact() -> None:
    for world_size in range(1, 5):
        for num_docs in (0, 1, 7, 100):
            seen = [i for r in range(world_size) for i in rank_documents(num_docs, r, world_size)]
            assert sorted(seen) == list(range(num_docs))
    with pytest.raises(ValueError):
        rank_documents(10, 2, 2)


def test_best_fit_example() -> None:
    store = unique_store([5, 3, 8, 2])
    packer = BestFitPacker(store, 9, 4, shuffle=False, loop=False, pad_id=PAD)
    x, y = packer.next_batch()
    assert x.shape == (2, 9) and x.dtype == torch.int64  # two rows, then the data ran out
    row0 = [*range(9, 17), 17, 18]  # doc 2 (8 tokens) is largest; doc 3 (2 tokens) fills the rest
    row1 = [*range(1, 6), *range(6, 9), PAD, PAD]  # docs 0 and 1, padded
    assert torch.equal(x, torch.tensor([row0[:-1], row1[:-1]]))
    assert torch.equal(y[0], torch.tensor(row0[1:]))
    assert y[1].tolist() == [*range(2, 6), *range(6, 9), IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(StopIteration):
        packer.next_batch()


def test_cut_pieces_carry_over() -> None:
    store = unique_store([25])
    packer = BestFitPacker(store, 9, 1, shuffle=False, loop=False, pad_id=PAD)
    rows = rows_of(drain(packer))
    assert [r.tolist() for r in rows] == [list(range(1, 11)), list(range(11, 21)), [*range(21, 26), *[PAD] * 5]]
    stats = packer.stats()
    assert stats["crops"] == 2 and stats["carried_tokens"] == 15 and stats["padding_tokens"] == 5


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_epoch_uses_every_token_once(world_size: int) -> None:
    lengths = long_tailed_lengths(300, seed=world_size)
    store = unique_store(lengths)
    seq_len, all_tokens = 64, []
    for rank in range(world_size):
        packer = BestFitPacker(
            store, seq_len, 8, buffer_size=50, seed=3, rank=rank, world_size=world_size, loop=False, pad_id=PAD
        )
        batches = drain(packer)
        rows = rows_of(batches)
        for x, y in batches:  # labels are the next inputs, with -100 exactly where the target is padding
            assert torch.equal(torch.where(y == IGNORE_INDEX, PAD, y)[:, :-1], x[:, 1:])
        # Padding only at the very end of the stream: only the last row has any.
        padded = [i for i, r in enumerate(rows) if (r == PAD).any()]
        assert padded in ([], [len(rows) - 1])
        if padded:
            last = rows[-1]
            assert (last[np.argmax(last == PAD) :] == PAD).all()
        tokens = np.concatenate([r[r != PAD] for r in rows])
        mine = np.concatenate([store.doc(i) for i in rank_documents(store.num_docs, rank, world_size)])
        assert np.array_equal(np.sort(tokens), np.sort(mine))  # nothing lost, nothing duplicated
        all_tokens.append(tokens)
        # Pieces of each document appear in order and tile it; the first opens the document (its BOS).
        by_doc = defaultdict(list)
        for d, start, end in pieces_of(store, rows):
            by_doc[d].append((start, end))
        assert set(by_doc) == set(rank_documents(store.num_docs, rank, world_size))
        for d, pieces in by_doc.items():
            assert pieces[0][0] == 0
            assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
            assert pieces[-1][1] == lengths[d]
        assert packer.stats()["epochs"] == 1
        assert packer.stats()["tokens"] == mine.size
    assert np.array_equal(np.sort(np.concatenate(all_tokens)), np.arange(1, store.num_tokens + 1))


def test_first_piece_of_each_document_starts_with_bos() -> None:
    from parcae.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    texts = [f"{i} document " * (i % 13 + 1) for i in range(120)]
    store = MemoryStore.from_documents(texts, tok)
    rows = rows_of(drain(BestFitPacker(store, 48, 4, loop=False, pad_id=PAD, buffer_size=16)))
    assert sum(int((r == tok.bos_id).sum()) for r in rows) == len(texts)
    # Every BOS in a row is followed (as far as the row goes) by the opening bytes of some document.
    openings = {tuple(tok.encode(t)[:k]) for t in texts for k in range(6)}
    for row in rows:
        tokens = row[row != PAD].tolist()
        for i in np.flatnonzero(np.asarray(tokens) == tok.bos_id):
            assert tuple(tokens[i + 1 : i + 6]) in openings


def test_padding_is_rare_on_a_long_tailed_stream() -> None:
    store = unique_store(long_tailed_lengths(2000))
    packer = BestFitPacker(store, 256, 16, loop=False, pad_id=PAD)
    drain(packer)
    stats = packer.stats()
    assert stats["padding_fraction"] < 0.01
    assert stats["tokens"] == store.num_tokens
    assert stats["rows"] * 257 == stats["tokens"] + stats["padding_tokens"]
    looping = BestFitPacker(store, 256, 16, pad_id=PAD)
    for _ in range(50):
        looping.next_batch()
    assert looping.stats()["padding_tokens"] == 0


def test_shuffle_and_seed() -> None:
    store = unique_store(long_tailed_lengths(200))

    def first(**kw) -> torch.Tensor:
        return BestFitPacker(store, 32, 4, buffer_size=8, pad_id=PAD, **kw).next_batch()[0]

    assert torch.equal(first(seed=1), first(seed=1))
    assert not torch.equal(first(seed=1), first(seed=2))
    assert not torch.equal(first(seed=1), first(shuffle=False))


@pytest.mark.parametrize(("loop", "skip"), [(True, 30), (True, 0), (False, 6), (False, 20)])
def test_state_dict_resumes_exactly(loop: bool, skip: int) -> None:
    store = unique_store(long_tailed_lengths(60, seed=5, cap=300))
    kw = {"buffer_size": 20, "seed": 11, "rank": 1, "world_size": 2, "loop": loop, "pad_id": PAD}
    reference = BestFitPacker(store, 40, 6, **kw)
    expected = drain_n(reference, skip + 40)
    packer = BestFitPacker(store, 40, 6, **kw)
    drain_n(packer, skip)
    state = json.loads(json.dumps(packer.state_dict()))  # plain JSON all the way
    assert len(json.dumps(state)) < 2000
    resumed = BestFitPacker(store, 40, 6, **kw)
    resumed.load_state_dict(state)
    got = drain_n(resumed, 40)
    if (loop, skip) == (False, 6):
        assert 0 < len(got) < 40  # resumed mid-stream, then ran out (skip 20: resumed after the end)
    assert len(got) == len(expected) - min(skip, len(expected))
    for (x1, y1), (x2, y2) in zip(got, expected[skip:], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed.stats() == reference.stats()
    if loop:
        assert reference.stats()["epochs"] >= 1  # the stream crossed an epoch boundary


def drain_n(packer: BestFitPacker, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(n):
        try:
            out.append(packer.next_batch())
        except StopIteration:
            break
    return out


def test_state_from_another_stream_is_rejected() -> None:
    store = unique_store([10] * 20)
    state = BestFitPacker(store, 16, 2, pad_id=PAD, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed 1 → 2"):
        BestFitPacker(store, 16, 2, pad_id=PAD, seed=2).load_state_dict(state)


def test_val_batches_are_deterministic() -> None:
    store = unique_store(long_tailed_lengths(100))
    a = list(val_batches(store, 32, 4, max_batches=5, pad_id=PAD))
    b = list(val_batches(store, 32, 4, max_batches=5, pad_id=PAD))
    assert len(a) == 5 and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )
    everything = list(val_batches(store, 32, 4, max_batches=None, pad_id=PAD))
    assert sum(int((y != IGNORE_INDEX).sum()) + x.shape[0] for x, y in everything) == store.num_tokens


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        BestFitPacker(unique_store([0, 5, 0]), 8, 2, rank=0, world_size=2, pad_id=PAD)
    assert list(BestFitPacker(unique_store([0, 5, 0]), 8, 2, rank=0, world_size=2, loop=False, pad_id=PAD)) == []
    assert list(val_batches(MemoryStore.from_token_lists([]), 8, 2, max_batches=None, pad_id=PAD)) == []
    with pytest.raises(ValueError, match="positive"):
        BestFitPacker(unique_store([5]), 0, 2, pad_id=PAD)


# ---------------------------------------------------------------------- every token once per epoch, whatever the corpus
def test_one_long_document_is_not_trained_on_its_prefix_alone() -> None:
    """Regression: with few documents the buffer used to fill with fresh copies of them (the next epochs'),
    and best fit kept cutting the longest copy, i.e. the document's prefix, into every row."""
    seq_len, batch = 128, 16
    store = unique_store([50 * (seq_len + 1)])
    packer = BestFitPacker(store, seq_len, batch, pad_id=PAD)
    rows = rows_of([packer.next_batch() for _ in range(3)])
    assert len({r.tobytes() for r in rows}) == 3 * batch  # 48 distinct rows
    tokens = np.concatenate(rows)
    assert np.unique(tokens).size == tokens.size  # and no token in two of them
    assert np.array_equal(tokens, np.arange(1, tokens.size + 1))  # one document: its text, in order
    assert packer.stats()["epochs"] == 0


@st.composite
def streams(draw: st.DrawFn) -> dict:
    """A corpus (document lengths) and packer settings, the corpus of one of several awkward shapes."""
    seq_len, batch_size = draw(st.integers(1, 24)), draw(st.integers(1, 5))
    width = seq_len + 1
    shape = draw(st.sampled_from(["mixed", "one_long", "smaller_than_a_batch", "many_tiny"]))
    if shape == "one_long":  # one document much longer than a row, maybe with a few others around it
        lengths = [draw(st.integers(3 * width, 30 * width)), *draw(st.lists(st.integers(0, width), max_size=3))]
        lengths = draw(st.permutations(lengths))
    elif shape == "smaller_than_a_batch":
        lengths = draw(st.lists(st.integers(0, seq_len), min_size=1, max_size=batch_size))
    elif shape == "many_tiny":
        lengths = draw(st.lists(st.integers(0, 3), min_size=20, max_size=300))
    else:  # empty documents mixed in with short and long ones
        lengths = draw(st.lists(st.integers(0, 3 * width), min_size=1, max_size=40))
    world_size = draw(st.integers(1, 3))
    rank = draw(st.integers(0, world_size - 1))
    lengths = list(lengths) + [0] * max(0, world_size - len(lengths))
    if sum(lengths[rank::world_size]) == 0:  # a rank with no tokens cannot loop (its own test checks the error)
        lengths[rank] = 1
    kwargs = {
        "buffer_size": draw(st.integers(1, 8)),
        "seed": draw(st.integers(0, 3)),
        "rank": rank,
        "world_size": world_size,
        "shuffle": draw(st.booleans()),
        "pad_id": PAD,
    }
    return {"lengths": lengths, "seq_len": seq_len, "batch_size": batch_size, "kwargs": kwargs}


def rank_tokens(store: MemoryStore, rank: int, world_size: int) -> np.ndarray:
    return np.concatenate([store.doc(i) for i in rank_documents(store.num_docs, rank, world_size)])


def assert_tiles_each_document(store: MemoryStore, tokens: np.ndarray, docs: range) -> None:
    """`tokens` (one epoch of the stream) holds every document of `docs` exactly once, each in pieces that
    follow one another in order from its start (its BOS) to its end."""
    by_doc = defaultdict(list)
    for d, start, end in pieces_of(store, [tokens]):
        by_doc[d].append((start, end))
    assert set(by_doc) == {d for d in docs if store.doc_lengths[d]}
    for d, pieces in by_doc.items():
        assert pieces[0][0] == 0 and pieces[-1][1] == store.doc_lengths[d]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))


@settings(max_examples=80, deadline=None)
@given(streams())
def test_each_epoch_places_every_token_exactly_once(case: dict) -> None:
    store, kw = unique_store(case["lengths"]), case["kwargs"]
    packer = BestFitPacker(store, case["seq_len"], case["batch_size"], **kw)
    mine = rank_tokens(store, kw["rank"], kw["world_size"])
    width = case["seq_len"] + 1
    rows_needed = -(-(2 * mine.size + 1) // width)  # past the end of the second epoch
    batches, placed = [], 0
    for _ in range(-(-rows_needed // case["batch_size"])):
        batches.append(packer.next_batch())
        placed += batches[-1][0].numel() + batches[-1][0].shape[0]
        assert packer.stats()["epochs"] == placed // mine.size  # an epoch counts once its last token is placed
    x, y = batches[-1]
    assert torch.equal(y[:, :-1], x[:, 1:])
    stream = np.concatenate(rows_of(batches))
    assert (stream != PAD).all()  # a looping stream never pads: rows run on across epoch boundaries
    docs = rank_documents(store.num_docs, kw["rank"], kw["world_size"])
    for epoch in range(2):
        assert_tiles_each_document(store, stream[epoch * mine.size : (epoch + 1) * mine.size], docs)


@settings(max_examples=60, deadline=None)
@given(streams())
def test_without_looping_every_token_comes_once(case: dict) -> None:
    store, kw = unique_store(case["lengths"]), case["kwargs"]
    packer = BestFitPacker(store, case["seq_len"], case["batch_size"], loop=False, **kw)
    batches = drain(packer)
    rows = rows_of(batches)
    assert all(x.shape[0] == case["batch_size"] for x, _ in batches[:-1])
    assert not any((r == PAD).any() for r in rows[:-1]) and (rows[-1] != PAD).any()
    stream = np.concatenate(rows)
    stream = stream[stream != PAD]
    assert_tiles_each_document(store, stream, rank_documents(store.num_docs, kw["rank"], kw["world_size"]))
    assert stream.size == packer.stats()["tokens"]
    assert packer.stats()["epochs"] == 1
    with pytest.raises(StopIteration):
        packer.next_batch()


@settings(max_examples=60, deadline=None)
@given(streams(), st.integers(0, 12), st.booleans())
def test_resume_mid_epoch_reproduces_the_stream(case: dict, skip: int, loop: bool) -> None:
    store, kw = unique_store(case["lengths"]), {**case["kwargs"], "loop": loop}
    args = (store, case["seq_len"], case["batch_size"])
    reference = BestFitPacker(*args, **kw)
    expected = drain_n(reference, skip + 12)
    packer = BestFitPacker(*args, **kw)
    drain_n(packer, skip)
    resumed = BestFitPacker(*args, **kw)
    resumed.load_state_dict(json.loads(json.dumps(packer.state_dict())))
    got = drain_n(resumed, 12)
    assert len(got) == len(expected[skip:])
    for (x1, y1), (x2, y2) in zip(got, expected[skip:], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resumed.stats() == reference.stats()


def test_many_short_documents_one_epoch() -> None:
    lengths = np.random.default_rng(0).integers(0, 6, 100_000)
    store = unique_store(lengths)
    packer = BestFitPacker(store, 64, 32, seed=2, pad_id=PAD)
    rows_per_epoch, rows = store.num_tokens // 65, []
    while len(rows) <= rows_per_epoch:
        rows += rows_of([packer.next_batch()])
    stream = np.concatenate(rows)
    assert np.array_equal(np.sort(stream[: store.num_tokens]), np.arange(1, store.num_tokens + 1))
    assert packer.stats()["epochs"] == 1
