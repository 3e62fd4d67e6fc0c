from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parcae.cli import main
from parcae.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    train_bpe,
)

WORDS = ["the", "cat", "sat", "on", "a", "mat", "def", "return", "import", "self", "élan", "naïve", "日本", "😀"]
SAMPLES = [
    "hello world",
    "def f(x):\n    return x ** 2  # 12345\n",
    "naïve café — 日本語 😀\t\r\n",
    "",
    "  leading and trailing  ",
    "<|bos|> is just text here",
]
VALID_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)
# Every str, lone surrogates included (hypothesis' default text() leaves them out).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()) | st.characters(categories=("Cs",)))


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 15))]
        out.append(" ".join(words) + f" {rng.randint(0, 99999)}" + rng.choice([".", "!\n", ":\n    ", ""]))
    return out


def prose(n_chars: int, seed: int = 0) -> str:
    """One long document of made-up words (3,000 distinct ones), enough for ~1,000 BPE merges."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vu", "do", "sel", "pri", "on", "ar", "bel", "cu", "fi", "gor"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    lines, n = [], 0
    while n < n_chars:
        lines.append(" ".join(rng.choices(words, k=rng.randint(5, 16))) + ".\n")
        n += len(lines[-1])
    return "".join(lines)[:n_chars]


BPE = train_bpe(synthetic_corpus(), 360)


@pytest.fixture()
def bpe() -> BPETokenizer:
    return BPE


# ---------------------------------------------------------------------------------------------- byte
@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_byte_round_trip_is_exact_for_any_str(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials_and_decoding() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert isinstance(tok, Tokenizer)
    assert tok.decode([tok.bos_id, 72, 105, tok.eos_id, tok.pad_id]) == "Hi"
    assert tok.decode([0xFF, 65]) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
    assert tok.encode_batch(["ab", ""]) == [[97, 98], []]
    with pytest.raises(ValueError, match="Token ids"):
        tok.decode([259])


def test_byte_token_bytes_count_utf8_bytes() -> None:
    tok = ByteTokenizer()
    tb = tok.token_bytes()
    assert tb.shape == (259,) and tb[256:].sum() == 0
    for text in SAMPLES:
        assert tb[tok.encode(text)].sum() == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- BPE
def test_bpe_vocabulary_and_specials(bpe: BPETokenizer) -> None:
    assert 259 < bpe.vocab_size <= 360
    ids = {bpe.hf.token_to_id(s) for s in (BOS, EOS, PAD)}
    assert ids == {bpe.bos_id, bpe.eos_id, bpe.pad_id} == set(range(bpe.vocab_size - 3, bpe.vocab_size))
    for text in SAMPLES:
        assert not ids & set(bpe.encode(text))  # encode never emits a special, even for literal "<|bos|>"
    assert bpe.decode([bpe.bos_id, *bpe.encode("cat"), bpe.eos_id]) == "cat"


def test_bpe_merges_compress(bpe: BPETokenizer) -> None:
    text = "the cat sat on a mat"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(VALID_TEXT)
def test_bpe_round_trip(text: str) -> None:
    assert BPE.decode(BPE.encode(text)) == text


def test_bpe_encode_batch_matches_encode(bpe: BPETokenizer) -> None:
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]


def test_bpe_token_bytes_sum_to_utf8_length(bpe: BPETokenizer) -> None:
    tb = bpe.token_bytes()
    assert tb.shape == (bpe.vocab_size,)
    assert tb[[bpe.bos_id, bpe.eos_id, bpe.pad_id]].sum() == 0
    assert np.all(tb[: bpe.vocab_size - 3] >= 1)
    for text in [*SAMPLES, *synthetic_corpus(20, seed=3)]:
        assert tb[bpe.encode(text)].sum() == len(text.encode("utf-8"))


def test_train_bpe_caps(capsys) -> None:
    corpus = synthetic_corpus(50)
    assert train_bpe(corpus, 400, max_chars=0).vocab_size == 259  # bytes + specials only
    assert "max_chars: the tokenizer was trained on the first 0 characters" in capsys.readouterr().err
    train_bpe(corpus, 400, max_chars=100)
    assert "first 100 characters; the rest was not read" in capsys.readouterr().err
    train_bpe(corpus, 300, max_chars=sum(map(len, corpus)))  # the cap reached exactly: nothing left unread
    assert "max_chars" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe(["abc"], 200)


def test_too_large_vocabulary_warns_with_both_sizes(capsys) -> None:
    tok = train_bpe(["abc abc abc"], 1024)
    assert tok.vocab_size < 1024
    err = capsys.readouterr().err
    assert f"supports a vocabulary of {tok.vocab_size:,} tokens, not the 1,024 asked for" in err


def test_tokenizer_cli_reads_a_long_document_whole(tmp_path, capsys) -> None:
    text = prose(200_000)
    assert train_bpe([text[:10_000]], 1024).vocab_size < 1024  # a per-document cap would fall short
    capsys.readouterr()
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    argv = ["tokenizer", "train", "--data", str(tmp_path / "one.txt"), "--vocab-size", "1024"]
    assert main([*argv, "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr()
    assert "saved a 1024-token BPE tokenizer" in out.out and "warning" not in out.err
    assert load_tokenizer(tmp_path / "tok").vocab_size == 1024


# ---------------------------------------------------------------------------------------------- save/load
def test_save_and_load_both_kinds(tmp_path, bpe: BPETokenizer) -> None:
    byte_file = ByteTokenizer().save(tmp_path / "byte")
    assert json.loads(byte_file.read_text())["kind"] == "byte"
    for path in (tmp_path / "byte", byte_file):
        assert isinstance(load_tokenizer(path), ByteTokenizer)
    bpe_file = bpe.save(tmp_path / "bpe")
    assert "model" in json.loads(bpe_file.read_text())
    for path in (tmp_path / "bpe", bpe_file, str(bpe_file)):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.bos_id, loaded.pad_id) == (bpe.vocab_size, bpe.bos_id, bpe.pad_id)
        assert loaded.encode(SAMPLES[5]) == bpe.encode(SAMPLES[5])
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    assert isinstance(get_tokenizer(tmp_path / "bpe"), BPETokenizer)


def test_bad_tokenizer_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="No tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        get_tokenizer(tmp_path / "nope")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)
    bad.write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "nonsense"}}))
    with pytest.raises(ValueError, match="not a valid Hugging Face"):
        load_tokenizer(bad)


def test_tokenizer_json_without_specials_is_rejected(tmp_path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(synthetic_corpus(30), trainers.BpeTrainer(vocab_size=280, show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) <\|bos\|>, <\|eos\|>, <\|pad\|>"):
        load_tokenizer(tmp_path)


def test_bpe_lone_surrogate_becomes_replacement_character(bpe: BPETokenizer) -> None:
    assert bpe.decode(bpe.encode("a\ud800b")) == "a\ufffdb"
    assert bpe.encode_batch(["a\ud800b", "cat"]) == [bpe.encode("a\ufffdb"), bpe.encode("cat")]


def test_non_byte_level_tokenizer_is_rejected(tmp_path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    hf = HFTokenizer(models.WordLevel({"日本": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.add_special_tokens([BOS, EOS, PAD])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        load_tokenizer(tmp_path)
