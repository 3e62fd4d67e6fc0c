"""transformers integration: Auto classes, save/load, generate, tokenizers, on trained and converted models."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from parcae import Parcae, get_preset  # noqa: E402
from parcae.cli import main  # noqa: E402
from parcae.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe  # noqa: E402
from parcae.interop.hf import ParcaeForCausalLM, ParcaeHFConfig, hf_tokenizer  # noqa: E402
from parcae.train.config import TrainConfig  # noqa: E402
from parcae.train.run import open_run  # noqa: E402
from parcae.train.trainer import Trainer  # noqa: E402
from test_official import VARIANTS, official_checkpoint, official_forward  # noqa: E402

_STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["def fib(n):\n    return n", "héllo wörld ✓ 🙂", "a\tb\r\nc", "<|bos|> is text here", ""]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real (tiny) training run: three steps of parcae-micro on a few stdlib modules."""
    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(_STDLIB.glob("*.py"))[:6]:
        (corpus / (path.stem + ".txt")).write_text(path.read_text(encoding="utf-8", errors="replace"))
    train = TrainConfig(data=str(corpus), batch_size=2, seq_len=32, steps=3, eval_every=3, eval_batches=1,
                        checkpoint_every=100, log_every=1, val_fraction=0.2)  # fmt: skip
    model = get_preset("parcae-micro", max_seq_len=64)
    Trainer(model, train, root / "run", progress_bar=False, echo=lambda _: None).train()
    return root / "run"


def perturbed(preset: str, **overrides) -> Parcae:
    """A model with non-trivial weights everywhere (the paper's init zeroes the output projections)."""
    model = Parcae(get_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_trained_run_converts_and_loads_with_the_auto_classes(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["convert", "--from", "run", str(trained_run), str(out)]) == 0
    run = open_run(trained_run)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, ParcaeForCausalLM) and not model.training
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.bos_token_id == run.tokenizer.bos_id
    prompt = "def fib(n):"
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]])
    assert ids[0, 1:].tolist() == run.tokenizer.encode(prompt)
    for steps in (None, 2):
        torch.testing.assert_close(model(ids, num_steps=steps).logits, run.model(ids, num_steps=steps).logits)
    # generation_config.json: documents start with BOS, so BOS ends a sample; the padded rows are never sampled.
    assert model.generation_config.eos_token_id == run.tokenizer.bos_id
    assert model.generation_config.vocab_limit == run.tokenizer.vocab_size < run.model.config.vocab_size
    greedy = model.generate(ids, max_new_tokens=6, num_steps=2)
    native = run.model.generate(ids, 6, num_steps=2, temperature=0.0, stop=run.tokenizer.bos_id,
                                vocab_limit=run.tokenizer.vocab_size, pad_id=run.tokenizer.pad_id).tokens  # fmt: skip
    assert torch.equal(greedy, native)
    sampled = model.generate(ids, max_new_tokens=24, do_sample=True, temperature=2.0, seed=0)
    assert int(sampled.max()) < run.tokenizer.vocab_size
    # The same directory serves our own loaders.
    assert Parcae.from_pretrained(out).config == run.model.config
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith("converted")


def test_official_checkpoint_converts_and_matches_the_reference(tmp_path: Path, capsys) -> None:
    shape = {**VARIANTS["gqa-ve-quirk"], "vocab_size": 320, "padded_vocab_size": 320}
    state, cfg = official_checkpoint(seed=3, **shape)
    src = tmp_path / "official"
    src.mkdir()
    torch.save(state, src / "model.pt")
    (src / "config.json").write_text(json.dumps(cfg))
    bpe = train_bpe([p.read_text(errors="replace") for p in sorted(_STDLIB.glob("*.py"))[:3]], 300)
    bpe.save(src)
    assert main(["convert", "--from", "parcae-lm", "--state-init", "zero", str(src), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "dropped value_embeds.0.weight" in printed and "dropped freqs_cis" in printed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ids = torch.tensor([[bpe.bos_id, *tok.encode("def main():", add_special_tokens=False)]])
    assert ids[0, 1:].tolist() == bpe.encode("def main():")
    for steps in (1, 4, 8):
        expected = official_forward(state, cfg, ids, steps)
        assert (model(ids, num_steps=steps).logits - expected).abs().max() <= 1e-4
    assert model.generation_config.eos_token_id is None  # the official models have no end-of-text convention
    direct = ParcaeForCausalLM.from_pretrained(src, state_init="zero")  # an official directory, converted on load
    assert torch.equal(direct(ids, num_steps=4).logits, model(ids, num_steps=4).logits)
    assert model.generate(ids, max_new_tokens=5, num_steps=3).shape == (1, ids.shape[1] + 5)


def test_save_pretrained_round_trip_with_tied_and_untied_heads(tmp_path: Path) -> None:
    for preset in ("parcae-micro", "gpt-tiny"):
        model = perturbed(preset)
        ParcaeForCausalLM.from_parcae(model).save_pretrained(tmp_path / preset)
        config = json.loads((tmp_path / preset / "config.json").read_text())
        assert config["model_type"] == "parcae" and config["architectures"] == ["ParcaeForCausalLM"]
        with safe_open(str(tmp_path / preset / "model.safetensors"), "pt") as weights:
            stored = set(weights.keys())  # safe_open has no __contains__
        assert ("lm_head.weight" in stored) == (not model.config.tie_embeddings)
        hf_config = AutoConfig.from_pretrained(tmp_path / preset)
        assert isinstance(hf_config, ParcaeHFConfig) and hf_config.hidden_size == model.config.d_model
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / preset)
        tied = loaded.model.lm_head.weight.data_ptr() == loaded.model.embed.weight.data_ptr()
        assert tied == model.config.tie_embeddings
        ids = torch.randint(0, 259, (2, 7))
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_forward_follows_the_hf_label_convention_and_takes_num_steps() -> None:
    model = ParcaeForCausalLM.from_parcae(perturbed("parcae-micro"))
    ids = torch.randint(0, 320, (2, 9))
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert not torch.allclose(model(ids, num_steps=1).logits, model(ids, num_steps=6).logits)
    loss, logits = model(ids, labels=ids, return_dict=False)
    assert torch.equal(logits, out.logits) and torch.equal(loss, out.loss)
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=torch.tensor([[0] + [1] * 8, [1] * 9]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(2, 9, 64))


def test_generate_honours_hf_options_and_rejects_the_rest() -> None:
    model = ParcaeForCausalLM.from_parcae(perturbed("parcae-micro"))
    ids = torch.randint(0, 256, (2, 5))
    greedy = model.generate(ids, max_new_tokens=4, num_steps=3)
    manual = ids
    for _ in range(4):  # greedy = argmax of a full forward at every step
        manual = torch.cat([manual, model(manual, num_steps=3).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, manual)
    assert model.generate(ids, max_length=8, num_steps=3).shape == (2, 8)
    # eos: the first greedy token of row 0 ends row 0; its later positions are pad_token_id.
    stop = int(greedy[0, 5])
    stopped = model.generate(ids, max_new_tokens=4, num_steps=3, eos_token_id=stop, pad_token_id=300)
    assert stopped[0, 5] == stop and (stopped[0, 6:] == 300).all()
    a = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(a, model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=7))
    # Left padding: the short prompt's continuation equals generating it alone.
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:1, :3]], dim=1)
    batch = torch.cat([padded, ids[1:]], dim=0)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=3, num_steps=2)
    assert torch.equal(together[0, 5:], model.generate(ids[:1, :3], max_new_tokens=3, num_steps=2)[0, 3:])
    for bad, message in [({"num_beams": 2}, "num_beams=2"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
                         ({"not_an_option": 1}, "does not take not_an_option")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            model.generate(ids, max_new_tokens=2, **bad)


def test_byte_tokenizer_exports_with_identical_ids(tmp_path: Path) -> None:
    byte = ByteTokenizer()
    fast = hf_tokenizer(byte)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (256, 257, 258)
    for text in TEXTS:
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == byte.encode(text)
        assert fast.decode(ids) == text
    from parcae.interop.hf_directory import save_hf_tokenizer

    save_hf_tokenizer(byte, tmp_path, model_max_length=64)
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert all(ours.encode(t) == auto.encode(t, add_special_tokens=False) == byte.encode(t) for t in TEXTS)


def test_loading_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        ParcaeForCausalLM.from_pretrained(tmp_path / "nowhere")
    model = perturbed("parcae-micro")
    ParcaeForCausalLM.from_parcae(model).save_pretrained(tmp_path / "m")
    other = ParcaeHFConfig.from_parcae_config(get_preset("parcae-tiny"))
    with pytest.raises(ValueError, match="does not match"):
        ParcaeForCausalLM.from_pretrained(tmp_path / "m", config=other)
    with pytest.raises(ValueError, match="quantization_config"):
        ParcaeForCausalLM.from_pretrained(tmp_path / "m", quantization_config={"bits": 4})
    with pytest.raises(ValueError, match="safetensors only"):
        ParcaeForCausalLM.from_parcae(model).save_pretrained(tmp_path / "n", safe_serialization=False)
