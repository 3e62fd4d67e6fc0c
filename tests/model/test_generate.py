"""Generation: cached greedy decoding equals recomputation, batching, sampling options, streaming, exit, CLI."""

from pathlib import Path

import pytest
import torch

from parcae import Parcae
from parcae.cli import main
from parcae.data.tokenizer import ByteTokenizer
from parcae.model.generate import GenerationOutput, GenerationStream, generate
from test_model import ids, randomise, small


@pytest.fixture(scope="module")
def model() -> Parcae:
    torch.manual_seed(0)
    return randomise(Parcae(small(max_seq_len=48))).eval()


def greedy_without_cache(model: Parcae, prompt: list[int], new: int, steps: int | None = None) -> list[int]:
    tokens = torch.tensor([prompt])
    for _ in range(new):
        nxt = model(tokens, num_steps=steps).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens[0, len(prompt) :].tolist()


@pytest.mark.parametrize("steps", [2, 5])
def test_greedy_generation_equals_recomputing_the_context(model: Parcae, steps: int) -> None:
    prompt = ids(1, 6)[0].tolist()
    out = model.generate([prompt], 12, num_steps=steps, temperature=0)
    assert out.new_tokens[0] == greedy_without_cache(model, prompt, 12, steps)
    assert out.tokens[0].tolist() == prompt + out.new_tokens[0]
    assert out.iterations == [[steps] * 12] and out.num_steps == steps
    assert out.prompt_iterations.tolist() == [[steps] * 6]
    assert out.decode_steps == 11 and out.coda_passes == 12 and out.cache_bytes > 0
    assert model.generate([prompt], 12, num_steps=steps, temperature=0).new_tokens == out.new_tokens
    nothing = model.generate([prompt], 0)
    assert nothing.tokens[0].tolist() == prompt and nothing.new_tokens == [[]]


def test_batched_generation_with_left_padding_equals_each_prompt_alone(model: Parcae) -> None:
    prompts = [ids(1, n)[0].tolist() for n in (2, 7, 4)]
    batched = model.generate(prompts, 8, temperature=0)
    for i, prompt in enumerate(prompts):
        assert batched.new_tokens[i] == model.generate([prompt], 8, temperature=0).new_tokens[0]
    padded = batched.tokens[:, :7]
    mask = (torch.arange(7)[None, :] >= torch.tensor([[5], [0], [3]])).long()
    again = model.generate(padded, 8, attention_mask=mask, temperature=0)
    assert again.new_tokens == batched.new_tokens and again.prompt_tokens == 13


def test_exit_in_a_batch_equals_each_row_alone(model: Parcae) -> None:
    prompts = [ids(1, n)[0].tolist() for n in (3, 6)]
    batched = model.generate(prompts, 6, num_steps=8, exit="latent:0.1", temperature=0)
    for i, prompt in enumerate(prompts):
        alone = model.generate([prompt], 6, num_steps=8, exit="latent:0.1", temperature=0)
        assert alone.new_tokens[0] == batched.new_tokens[i] and alone.iterations[0] == batched.iterations[i]
    used = [c for row in batched.iterations for c in row]
    assert min(used) >= 1 and max(used) <= 8 and batched.mean_iterations < 8 and batched.exit == "latent:0.1"


def test_sampling_is_reproducible_and_respects_its_limits(model: Parcae) -> None:
    prompt = [ids(1, 4)[0].tolist()]
    first = model.generate(prompt, 16, temperature=2.0, seed=3)
    assert first.new_tokens == model.generate(prompt, 16, temperature=2.0, seed=3).new_tokens
    assert first.new_tokens != model.generate(prompt, 16, temperature=2.0, seed=4).new_tokens
    limited = model.generate(prompt, 30, temperature=5.0, seed=1, vocab_limit=10)
    assert max(limited.new_tokens[0]) < 10
    greedy = model.generate(prompt, 10, temperature=0).new_tokens
    assert model.generate(prompt, 10, temperature=1.0, top_k=1, seed=0).new_tokens == greedy
    assert model.generate(prompt, 10, temperature=1.0, top_p=1e-6, seed=0).new_tokens == greedy


def test_stop_ids_end_a_row_and_are_kept(model: Parcae) -> None:
    prompts = [ids(1, 3)[0].tolist(), ids(1, 5)[0].tolist()]
    free = model.generate(prompts, 10, temperature=0, pad_id=0)
    stop = free.new_tokens[0][2]
    out = model.generate(prompts, 10, temperature=0, stop=stop, pad_id=0)
    cut = free.new_tokens[0].index(stop) + 1
    assert out.new_tokens[0] == free.new_tokens[0][:cut]
    assert len(out.iterations[0]) == cut
    if stop in free.new_tokens[1]:
        assert out.new_tokens[1] == free.new_tokens[1][: free.new_tokens[1].index(stop) + 1]
    else:
        assert out.new_tokens[1] == free.new_tokens[1]
    assert (out.tokens[0, 5 + cut :] == 0).all()  # after the (left-padded, 5-column) prompt and the stop


def test_streaming_yields_each_token_then_the_output(model: Parcae) -> None:
    prompt = [ids(1, 4)[0].tolist()]
    stream = generate(model, prompt, 7, temperature=0, stream=True, kv_policy="last", exit="argmax:2")
    assert isinstance(stream, GenerationStream) and stream.output is None
    steps = list(stream)
    assert [s.index for s in steps] == list(range(7))
    assert isinstance(stream.output, GenerationOutput)
    assert [int(s.tokens[0]) for s in steps] == stream.output.new_tokens[0]
    assert [int(s.iterations[0]) for s in steps] == stream.output.iterations[0]
    assert stream.output.kv_policy == "last" and stream.output.coda_passes > 7


def test_fixed_depth_transformer_generates_without_a_loop() -> None:
    torch.manual_seed(0)
    gpt = randomise(Parcae(small(n_core=0, n_prelude=2, n_coda=1))).eval()
    prompt = ids(1, 5)[0].tolist()
    out = gpt.generate([prompt], 6, temperature=0)
    assert out.new_tokens[0] == greedy_without_cache(gpt, prompt, 6)
    assert out.num_steps == 0 and out.iterations == [[0] * 6]
    with pytest.raises(ValueError, match="looped model"):
        gpt.generate([prompt], 2, exit="kl:1e-3")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(input_ids=[list(range(49))]), "longer than the context"),
        (dict(max_new_tokens=45), "at most 44 tokens"),
        (dict(input_ids=[[1], []]), "at least one token"),
        (dict(input_ids=[[1, 200]], stream=True), "token ids must lie"),
        (dict(kv_policy="budget:0"), "positive slot count"),
        (dict(kv_policy="window"), "unknown KV policy"),
        (dict(exit="halt:3"), "unknown exit spec"),
        (dict(exit="kl:1e-3,min=9"), "exceed the depth"),
        (dict(exit="kl:1e-3,max=6", num_steps=4), "disagree"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_input_is_one_clear_error(model: Parcae, kwargs: dict, message: str) -> None:
    args = {"input_ids": [[1, 2, 3, 4]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("input_ids"), args.pop("max_new_tokens"), **args)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("saved")
    randomise(Parcae(small(vocab_size=320, max_seq_len=64))).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def test_cli_streams_text_and_reports_statistics(saved: Path, capsys) -> None:
    argv = ["generate", str(saved), "--prompt", "def ", "--max-new-tokens", "12", "--steps", "3"]
    assert main([*argv, "--exit", "latent:0.05", "--min-steps", "2", "--kv-policy", "budget:2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "KV budget:2" in err and "latent:0.05,min=2" in err
    assert main([*argv, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*argv, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-policy", "budget:0"], "positive slot count"),
        (["--exit", "kl"], "unknown exit spec"),
        (["--min-steps", "2"], "--min-steps needs --exit"),
        (["--max-new-tokens", "100"], "exceed the context"),
    ],
)
def test_cli_bad_input_is_one_line(saved: Path, capsys, extra: list[str], message: str) -> None:
    assert main(["generate", str(saved), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
