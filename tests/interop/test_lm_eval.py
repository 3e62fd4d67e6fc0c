"""The lm-evaluation-harness adapter: exact scores against a model with known preferences, rolling windows,
batched greedy generation, and an offline end-to-end harness run on tiny local tasks (YAML + jsonl)."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'parcae-looped[lm-eval]')")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from parcae import Parcae, get_preset
from parcae.interop.lm_eval import ParcaeLM
from test_core import TOK, BigramModel, greedy_chain, letter_tables


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def reference_logprob(table: torch.Tensor, ids: list[int], first: int) -> tuple[float, bool]:
    """Σ log p(ids[j] | ids[j−1]) for j ≥ first under a bigram table, and whether every token is the argmax."""
    logp = F.log_softmax(table, dim=-1)
    total = sum(float(logp[ids[j - 1], ids[j]]) for j in range(first, len(ids)))
    greedy = all(int(table[ids[j - 1], : TOK.vocab_size].argmax()) == ids[j] for j in range(first, len(ids)))
    return total, greedy


def test_parcae_is_registered_with_the_harness() -> None:
    assert get_model("parcae") is ParcaeLM


def test_loglikelihood_is_exact_batched_and_at_the_fixed_depth() -> None:
    tables = letter_tables(seed=1)
    chain = greedy_chain(tables[1], "q", 5)  # greedy at depth ≥ 2 after "q"
    pairs = [("abc", " de"), ("", "xyz"), ("hello wor", "ld again"), ("q", chain), ("a" * 80, " tail")]
    expected = []
    for context, continuation in pairs:
        ids = [TOK.bos_id, *TOK.encode(context + continuation)]
        expected.append(reference_logprob(tables[1], ids[-65:], len(ids[-65:]) - len(continuation)))
    for batch_size in (1, 3):
        lm = ParcaeLM(model=BigramModel(tables), tokenizer=TOK, num_steps=4, batch_size=batch_size)
        got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
        assert [g[1] for g in got] == [e[1] for e in expected]
    assert got[3][1] and not got[0][1]
    # num_steps reaches the model: depth 1 uses the other table.
    shallow = ParcaeLM(model=BigramModel(tables), tokenizer=TOK, num_steps=1)
    ids = [TOK.bos_id, *TOK.encode("abc de")]
    assert shallow.loglikelihood(requests("loglikelihood", pairs[:1]), disable_tqdm=True)[0][0] == pytest.approx(
        reference_logprob(tables[0], ids, 4)[0], abs=1e-4
    )


def test_rolling_loglikelihood_scores_every_token_once() -> None:
    tables = letter_tables(seed=2)
    texts = ["the quick brown fox jumps over the lazy dog " * 2, "short", ""]
    lm = ParcaeLM(model=BigramModel(tables), tokenizer=TOK, num_steps=3, max_length=8, batch_size=5)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got, strict=True):
        ids = [TOK.bos_id, *TOK.encode(text)]  # a bigram model needs one token of context: windows lose nothing
        assert value == pytest.approx(reference_logprob(tables[1], ids, 1)[0] if text else 0.0, abs=1e-3)


@torch.no_grad()
def uncached_greedy(model: Parcae, context: str, budget: int, num_steps: int) -> str:
    """The reference: re-run the whole sequence for each token and take the argmax over the tokenizer's ids."""
    ids = [TOK.bos_id, *TOK.encode(context)]
    new: list[int] = []
    for _ in range(budget):
        token = int(model(torch.tensor([ids + new]), num_steps=num_steps).logits[0, -1, : TOK.vocab_size].argmax())
        if token >= 256:  # a special token ends the answer
            break
        new.append(token)
    return TOK.decode(new)


def test_generate_until_matches_uncached_greedy_decoding() -> None:
    torch.manual_seed(0)
    model = Parcae(get_preset("parcae-micro", state_init="zero")).eval()  # h₀ = 0: rows do not depend on the batch
    jobs = [
        ("abc", {"until": ["\n"], "max_gen_toks": 12}),
        ("a much longer context here", {"max_gen_toks": 12}),
        ("z", {"until": ["e", "a"], "max_gen_toks": 12, "do_sample": False}),
        ("q", {"max_gen_toks": 5}),
    ]
    for batch_size in (1, 3):
        lm = ParcaeLM(model=model, tokenizer=TOK, num_steps=2, batch_size=batch_size)
        got = lm.generate_until(requests("generate_until", jobs), disable_tqdm=True)
        for (context, kwargs), text in zip(jobs, got, strict=True):
            reference = uncached_greedy(model, context, kwargs["max_gen_toks"], num_steps=2)
            for stop in kwargs.get("until", []):
                reference = reference.split(stop)[0]
            assert text == reference
    with pytest.raises(ValueError, match="only decodes greedily"):
        lm.generate_until(requests("generate_until", [("abc", {"do_sample": True, "temperature": 1.0})]))


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either path=RUN or both"):
        ParcaeLM()
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        ParcaeLM(model=BigramModel(letter_tables()), tokenizer=TOK, num_steps=0)
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        ParcaeLM(path=str(tmp_path), device="cpu")


TASKS = """\
task: parcae_tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/mc.jsonl}}, cache_dir: {dir}/hf}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list: [{{metric: acc}}]
"""
ROLLING = """\
task: parcae_tiny_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/docs.jsonl}}, cache_dir: {dir}/hf}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: bits_per_byte}}]
"""
GENERATE = """\
task: parcae_tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/qa.jsonl}}, cache_dir: {dir}/hf}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def test_offline_end_to_end_with_the_harness(tmp_path: Path, monkeypatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = {"mc": [{"question": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0},
                   {"question": "def f(x): return", "choices": [" x", " banana"], "gold": 0}],
            "docs": [{"text": "import os\nprint(os.getcwd())\n" * 6}, {"text": "naïve café ✓"}],
            "qa": [{"question": "x = ", "answer": "1"}, {"question": "def ", "answer": "f"}]}  # fmt: skip
    for name, records in rows.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for name, text in (("mc", TASKS), ("rolling", ROLLING), ("gen", GENERATE)):
        (tasks / f"{name}.yaml").write_text(text.format(dir=tasks), encoding="utf-8")
    model_dir = tmp_path / "model"
    Parcae(get_preset("parcae-micro")).save_pretrained(model_dir)
    TOK.save(model_dir)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The harness's environment report runs `collect_env` subprocesses (seconds); it has nothing to do with us.
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # no index of lm-eval's own tasks
    out = simple_evaluate(model="parcae", model_args=f"path={model_dir},num_steps=2,max_length=64",
                          tasks=["parcae_tiny_mc", "parcae_tiny_rolling", "parcae_tiny_gen"], device="cpu",
                          batch_size=4, task_manager=manager)  # fmt: skip
    results = out["results"]
    assert 0.0 <= results["parcae_tiny_mc"]["acc,none"] <= 1.0
    assert math.isfinite(results["parcae_tiny_rolling"]["bits_per_byte,none"])
    assert results["parcae_tiny_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert out["config"]["num_steps"] == 2  # from get_model_info: the fixed depth is recorded


@pytest.mark.filterwarnings("ignore:'parcae.interop.lm_eval' found in sys.modules:RuntimeWarning")
def test_module_runs_as_lm_evals_command_line(monkeypatch, capsys) -> None:
    # `python -m parcae.interop.lm_eval …` executes this file as __main__; the model must stay registered once.
    monkeypatch.setattr(sys, "argv", ["parcae.interop.lm_eval", "run", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("parcae.interop.lm_eval", run_name="__main__")
    assert exit_info.value.code == 0 and "--model_args" in capsys.readouterr().out
    assert get_model("parcae") is ParcaeLM
