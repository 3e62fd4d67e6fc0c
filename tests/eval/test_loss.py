"""Loss, perplexity and bits per byte across test-time depths and h₀ seeds; `parcae eval` on the loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from parcae import Parcae, get_preset
from parcae.cli import main
from parcae.data.tokenizer import ByteTokenizer, train_bpe
from parcae.eval.loss import format_table, loss_by_depth

TEXT = "naïve café — 日本語のテキスト ✓ 🙂 and plain ASCII too"
TOK = ByteTokenizer()


def batch_of(texts: list[str], tok=TOK) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `BOS text` (right-padded) as (inputs, labels); the BOS opening each row is a context, never a target."""
    rows = [[tok.bos_id, *tok.encode(t)] for t in texts]
    width = max(map(len, rows))
    inputs = torch.full((len(rows), width - 1), tok.pad_id)
    labels = torch.full((len(rows), width - 1), -100)
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        labels[i, : len(row) - 1] = torch.tensor(row[1:])
    return inputs, labels


@pytest.fixture(scope="module")
def micro() -> Parcae:
    torch.manual_seed(0)
    return Parcae(get_preset("parcae-micro")).eval()


def test_bits_per_byte_counts_utf8_bytes_of_multibyte_text(micro: Parcae) -> None:
    texts = [TEXT, "x = 1\n", "ü" * 9]
    inputs, labels = batch_of(texts)
    (result,) = loss_by_depth(micro, [(inputs, labels)], [3], token_bytes=TOK.token_bytes())
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.bytes == nbytes and nbytes > sum(len(t) for t in texts)  # bytes, not characters
    with torch.no_grad():
        logits = micro(inputs, num_steps=3).logits
    nats = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert result.bpb == pytest.approx(float(nats) / (math.log(2) * nbytes), rel=1e-5)
    assert result.loss == pytest.approx(float(nats) / result.tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_special_targets_carry_no_bytes_and_no_bits(micro: Parcae) -> None:
    # A packed row: document 1, then the BOS of document 2 as a target, then document 2.
    row = [TOK.bos_id, *TOK.encode("héllo"), TOK.bos_id, *TOK.encode("wörld")]
    inputs, labels = torch.tensor([row[:-1]]), torch.tensor([row[1:]])
    (result,) = loss_by_depth(micro, [(inputs, labels)], [2], token_bytes=TOK.token_bytes())
    with torch.no_grad():
        nll = F.cross_entropy(micro(inputs, num_steps=2).logits[0], labels[0], reduction="none")
    text = labels[0] != TOK.bos_id
    assert result.bytes == len("héllowörld".encode())
    assert result.bpb == pytest.approx(float(nll[text].sum()) / (math.log(2) * result.bytes), rel=1e-5)
    assert result.loss == pytest.approx(float(nll.mean()), rel=1e-5)  # the loss keeps every target


def test_bpe_token_bytes_are_raw_bytes_even_mid_character() -> None:
    corpus = ["日本語のテキストです。" * 20, "naïve café déjà vu " * 20, "plain words here " * 20]
    tok = train_bpe(corpus, vocab_size=300)
    sizes = tok.token_bytes()
    ids = tok.encode(TEXT)
    assert int(sizes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert any("\ufffd" in tok.decode([i]) for i in ids), "this corpus should give tokens ending inside a character"
    # Counting decoded characters instead (the official way) miscounts those tokens.
    assert sum(len(tok.decode([i]).encode("utf-8")) for i in ids) != len(TEXT.encode("utf-8"))
    assert sizes[tok.bos_id] == sizes[tok.eos_id] == sizes[tok.pad_id] == 0


def test_depth_sweep_gives_one_entry_per_depth_and_seed_statistics(micro: Parcae) -> None:
    batches = [batch_of([TEXT, "def f(x):\n    return x"])]
    depths = [1, 2, 5]
    swept = loss_by_depth(micro, batches, depths, state_seed=[0, 1, 2], token_bytes=TOK.token_bytes())
    assert [r.depth for r in swept] == depths and all(r.seeds == (0, 1, 2) for r in swept)
    for r in swept:
        singles = [loss_by_depth(micro, batches, [r.depth], state_seed=s, token_bytes=TOK.token_bytes())[0]
                   for s in (0, 1, 2)]  # fmt: skip
        losses = [s.loss for s in singles]
        assert r.loss == pytest.approx(sum(losses) / 3, rel=1e-6)
        assert r.loss_std == pytest.approx(float(np.std(losses)), abs=1e-9)
        assert r.state_norm is not None and r.residual is not None
    assert swept[0].loss_std > 0  # like-init h₀: the seed matters
    # Without token_bytes the memory-saving path (no logits) gives the same loss.
    plain = loss_by_depth(micro, batches, depths, state_seed=[0, 1, 2])
    assert [p.loss for p in plain] == pytest.approx([r.loss for r in swept], rel=1e-5)
    assert plain[0].bpb is None
    table = format_table(swept)
    assert len(table.splitlines()) == 1 + len(depths) and "bpb" in table and "±" in table


def test_fixed_depth_model_and_bad_input(micro: Parcae) -> None:
    gpt = Parcae(get_preset("parcae-micro", n_core=0)).eval()
    batches = [batch_of([TEXT])]
    a, b = loss_by_depth(gpt, batches, [1, 8])
    assert a.loss == b.loss and a.state_norm is None
    with pytest.raises(ValueError, match="depths must be positive"):
        loss_by_depth(micro, batches, [0])
    with pytest.raises(ValueError, match="no validation batches"):
        loss_by_depth(micro, [], [1])


def saved(directory: Path, kind: str) -> list[Path]:
    """The result files of one kind (`loss` or `core`) under directory/eval, by name."""
    return sorted((directory / "eval").glob(f"{kind}-*.json"))


def test_cli_loss_with_bpb_on_a_data_file(tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    Parcae(get_preset("parcae-micro")).save_pretrained(model_dir)
    TOK.save(model_dir)
    docs = [TEXT, "ünïcödé " * 2, "ascii only"]  # one packed row: no token is cut off
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    argv = ["eval", str(model_dir), "--data", str(tmp_path / "docs.jsonl"), "--depths", "1,2", "--seeds", "2",
            "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bpb" in out and "h₀ seeds 0,1" in out
    (path,) = saved(model_dir, "loss")
    payload = json.loads(path.read_text())
    assert [r["depth"] for r in payload["results"]] == [1, 2] and payload["seeds"] == [0, 1]
    assert payload["results"][0]["bytes"] == sum(len(t.encode("utf-8")) for t in docs)  # every document, all bytes
    assert path.with_suffix(".png").is_file()


def test_cli_saved_model_names_the_data_folder_it_holds(tmp_path: Path, capsys) -> None:
    """A save_pretrained directory with a prepared `data/` (no training config) scores that folder's held-out split
    and says which folder it was."""
    from parcae.data.shards import prepare

    model_dir = tmp_path / "model"
    Parcae(get_preset("parcae-micro")).save_pretrained(model_dir)
    TOK.save(model_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{TEXT} {i}"}) + "\n" for i in range(60)), encoding="utf-8")
    prepare(str(docs), TOK, model_dir / "data", val_fraction=0.2)
    assert main(["eval", str(model_dir), "--depths", "1", "--seeds", "1", "--batches", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"held-out validation split of the run's data ({model_dir / 'data'})" in out and "(None)" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{empty}"], "is neither a training run"),
        (["eval", "{missing}"], "is not a directory"),
        (["eval", "{model}"], "has no validation data; pass --data"),
        (["eval", "{model}", "--tasks", "copa"], "need --core DIR"),
        (["eval", "{model}", "--core", "{empty}"], "holds no task files"),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    Parcae(get_preset("parcae-micro")).save_pretrained(tmp_path / "model")
    TOK.save(tmp_path / "model")
    paths = {"{empty}": tmp_path / "empty", "{missing}": tmp_path / "missing", "{model}": tmp_path / "model"}
    assert main([str(paths.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parcae: error:") and message in err and "\n" not in err


def test_cli_rejects_non_positive_depths(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "somewhere", "--depths", "0,2"])
    assert exit_info.value.code == 2 and "positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("with_bytes", [False, True])
def test_one_loop_run_for_all_depths_equals_one_forward_per_depth(micro: Parcae, monkeypatch, with_bytes) -> None:
    """`loss_by_depth` runs the loop once for every depth; the per-depth forwards (the FSDP path) must agree on
    loss, bits per byte and the loop metrics."""
    import parcae.eval.loss as loss_module

    batches = [batch_of([TEXT, "def f(x):\n    return x"]), batch_of(["short", "x = [i for i in range(3)]"])]
    options = {"state_seed": [0, 3], "token_bytes": TOK.token_bytes() if with_bytes else None}
    one_pass = loss_by_depth(micro, batches, [4, 1, 2], **options)
    monkeypatch.setattr(loss_module, "_is_fsdp", lambda model: True)
    per_depth = loss_by_depth(micro, batches, [4, 1, 2], **options)
    for ours, expected in zip(one_pass, per_depth, strict=True):
        assert ours.depth == expected.depth
        assert ours.loss == pytest.approx(expected.loss, rel=1e-5)
        assert ours.state_norm == pytest.approx(expected.state_norm, rel=1e-5)
        assert ours.residual == pytest.approx(expected.residual, rel=1e-5)
        if with_bytes:
            assert ours.bpb == pytest.approx(expected.bpb, rel=1e-5)


# ---------------------------------------------------------------------------------------------- what was scored
def saved_model(directory: Path, **overrides) -> Path:
    Parcae(get_preset("parcae-micro", **overrides)).save_pretrained(directory)
    TOK.save(directory)
    return directory


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.mark.parametrize(("overrides", "reason"), [({"n_core": 0}, "a fixed-depth model has no h₀"),
                                                   ({"state_init": "zero"}, "h₀ = 0 (state_init zero)")])  # fmt: skip
def test_cli_scores_a_seedless_model_once(overrides: dict, reason: str, tmp_path: Path, capsys, monkeypatch) -> None:
    import parcae.eval.loss as loss_module

    model_dir = saved_model(tmp_path / "model", **overrides)
    docs = write_docs(tmp_path / "docs.jsonl", [TEXT, "x = 1\n" * 5])
    forwards = []
    original = loss_module._scores_by_depth
    monkeypatch.setattr(loss_module, "_scores_by_depth", lambda *a: forwards.append(a[4]) or original(*a))
    assert main(["eval", str(model_dir), "--data", str(docs), "--seeds", "3", "--depths", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"one pass: {reason}" in out and "--seeds 3 would repeat it" in out and "h₀ seeds" not in out
    assert forwards == [0]  # one batch, one seed
    (path,) = saved(model_dir, "loss")
    assert json.loads(path.read_text())["seeds"] == [0]


def test_cli_keeps_every_evaluation_and_replaces_only_its_own(tmp_path: Path, capsys) -> None:
    model_dir = saved_model(tmp_path / "model")
    docs = write_docs(tmp_path / "docs.jsonl", [TEXT * 3, "def f(x):\n    return x\n" * 4, "ascii only " * 9])
    base = ["eval", str(model_dir), "--data", str(docs), "--seeds", "1", "--no-progress"]
    assert main([*base, "--depths", "1,2,3"]) == 0
    (first,) = saved(model_dir, "loss")
    before, curve = first.read_text(), first.with_suffix(".png").read_bytes()
    assert main([*base, "--depths", "1"]) == 0
    assert len(saved(model_dir, "loss")) == 2  # the 3-point curve is still there, untouched
    assert first.read_text() == before and first.with_suffix(".png").read_bytes() == curve
    assert main([*base, "--depths", "1"]) == 0
    assert len(saved(model_dir, "loss")) == 2  # the same settings again: their own file, replaced


def test_cli_header_and_json_state_what_was_scored(tmp_path: Path, capsys) -> None:
    model_dir = saved_model(tmp_path / "model", max_seq_len=16)
    docs = write_docs(tmp_path / "docs.jsonl", [TEXT * 4, "def f(x):\n    return x\n" * 6])
    argv = ["eval", str(model_dir), "--data", str(docs), "--depths", "1", "--seeds", "2", "--no-progress"]
    assert main([*argv, "--batches", "2", "--batch-size", "3"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"all of {docs}: 2 batches × 3 rows × 16 tokens, 96 target tokens" in header, header
    assert "h₀ seeds 0,1 (mean ± std)" in header
    (path,) = saved(model_dir, "loss")
    payload = json.loads(path.read_text())
    assert payload["data"] == f"all of {docs}" and payload["split"] == "val"
    assert (payload["batches"], payload["batch_size"], payload["seq_len"], payload["tokens"]) == (2, 3, 16, 96)
    assert payload["seeds"] == [0, 1] and payload["settings"]["batches"] == 2
    assert main([*argv, "--batches", "50", "--batch-size", "3"]) == 0  # more than the data holds: say so
    header = capsys.readouterr().out.splitlines()[0]
    assert "batches (all the split holds; --batches 50) × 3 rows × 16 tokens" in header, header


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """Two parcae-micro runs of one step: `many` on several documents (a held-out split), `single` on one short
    document (nothing can be held out)."""
    from parcae.train.config import TrainConfig
    from parcae.train.trainer import Trainer

    root = tmp_path_factory.mktemp("tiny-runs")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    many = root / "many"
    many.mkdir()
    for i in range(24):
        (many / f"doc{i:02d}.txt").write_text(" ".join(words[(i + j) % 8] for j in range(40 + i)), encoding="utf-8")
    (root / "single").mkdir()
    (root / "single" / "only.txt").write_text("one short document, nothing to hold out", encoding="utf-8")
    runs = {}
    for name in ("many", "single"):
        train = TrainConfig(data=str(root / name), batch_size=2, seq_len=32, steps=1, eval_batches=0,
                            checkpoint_every=100, log_every=100, val_fraction=0.25, optimizer="adamw")  # fmt: skip
        runs[name] = root / f"run-{name}"
        Trainer(get_preset("parcae-micro", max_seq_len=32), train, runs[name], progress_bar=False,
                echo=lambda _: None).train()  # fmt: skip
    return {**runs, "corpus": many}


def loss_payload(run: Path, capsys) -> tuple[str, dict]:
    """The output of the last eval and its newest loss file."""
    newest = max(saved(run, "loss"), key=lambda p: p.stat().st_mtime_ns)
    return capsys.readouterr().out, json.loads(newest.read_text())


EVAL = ["--depths", "1", "--seeds", "1", "--batches", "2", "--batch-size", "2", "--no-progress"]


def test_cli_empty_validation_split_fails_with_the_way_out(tiny_runs: dict[str, Path], capsys) -> None:
    from parcae.data.shards import val_split_note

    run = tiny_runs["single"]
    assert main(["eval", str(run), *EVAL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parcae: error:") and "\n" not in err
    assert val_split_note(run / "data") in err and "--data SPEC" in err and "--split train" in err
    assert main(["eval", str(run), "--split", "train", *EVAL]) == 0
    out, payload = loss_payload(run, capsys)
    assert "loss on the training split of the run's data" in out and "training data, not held out)" in out
    assert payload["split"] == "train" and "training data, not held out" in payload["data"]
    assert payload["data_path"] == str(run / "data" / "train")


def test_cli_data_naming_the_runs_own_corpus_scores_its_held_out_split(tiny_runs: dict[str, Path], capsys,
                                                                       monkeypatch) -> None:  # fmt: skip
    run, corpus = tiny_runs["many"], tiny_runs["corpus"]
    assert main(["eval", str(run), *EVAL]) == 0
    _, default = loss_payload(run, capsys)
    assert default["data_path"] == str(run / "data" / "val")
    assert default["data"] == f"the held-out validation split of the run's data ({corpus})"
    monkeypatch.chdir(corpus.parent)
    for spec in (str(corpus), f"./{corpus.name}/"):  # the same spec string, and the same directory spelt otherwise
        assert main(["eval", str(run), "--data", spec, *EVAL]) == 0
        out, payload = loss_payload(run, capsys)
        assert f"note: {spec} is the run's training data: scoring its held-out validation split" in out
        assert payload["data_path"] == default["data_path"] and payload["tokens"] == default["tokens"]
    other = write_docs(corpus.parent / "other.jsonl", [TEXT, "def g():\n    pass\n" * 3])
    assert main(["eval", str(run), "--data", str(other), *EVAL]) == 0
    out, payload = loss_payload(run, capsys)
    assert f"all of {other} (not the run's split)" in out and payload["data"] == f"all of {other} (not the run's split)"
    assert main(["eval", str(run), "--data", str(other), "--split", "train", *EVAL]) == 2
    assert "is not the run's data" in capsys.readouterr().err
