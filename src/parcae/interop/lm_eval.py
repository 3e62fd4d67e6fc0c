"""The lm-evaluation-harness model `parcae` (registered on import: lm-eval 0.4 reads no entry points) at a fixed depth.
Every sequence starts with `<|bos|>`, as Parcae documents do; generation is greedy, so that scores are reproducible."""

import itertools
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # an optional dependency
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'parcae-looped[lm-eval]'.") from err
from tqdm.auto import tqdm

from ..data.tokenizer import Tokenizer
from ..device import resolve_device
from ..eval.scoring import Row, evaluating, make_row, score_groups
from ..model.parcae import Parcae
from ..train.run import open_run

DEFAULT_BATCH_SIZE = 16
logger = logging.getLogger(__name__)


class ParcaeLM(TemplateLM):
    """lm-eval's `LM` over a Parcae model and its tokenizer; `batch_size` is fixed (no "auto" batch-size search)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        model: Parcae | None = None,
        tokenizer: Tokenizer | None = None,
        num_steps: int | None = None,
        state_seed: int = 0,
        checkpoint: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # lm-eval's "auto" batch search limit; batches here are fixed
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
    ) -> None:
        super().__init__()
        if (path is None) == (model is None) or (model is not None and tokenizer is None):
            raise ValueError("ParcaeLM needs either path=RUN or both model= and tokenizer=.")
        if path is not None:
            if device and device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default: cuda:0
                logger.warning("CUDA is not available; the parcae model runs on the CPU.")
                device = "cpu"
            run = open_run(path, checkpoint=checkpoint, device=resolve_device(device or "auto"))
            model, tokenizer = run.model, run.tokenizer
        self.model, self.tok = model.eval(), tokenizer
        cfg = model.config
        self.num_steps = cfg.mean_recurrence if num_steps is None else num_steps
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
        self.state_seed = int(state_seed)
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH_SIZE if auto else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.max_length = cfg.max_seq_len if max_length is None else int(max_length)
        if not 2 <= self.max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length must lie in [2, {cfg.max_seq_len}] (the model's context), got {max_length}.")
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tok.bos_id  # also lm-eval's `prefix_token_id`

    @property
    def _shared(self) -> dict[str, Any]:
        """The settings of both scoring and generation: depth, h₀ seed, padding and the tokenizer's vocabulary."""
        tok = self.tok
        return dict(num_steps=self.num_steps, state_seed=self.state_seed, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`, with a leading BOS unless `add_special_tokens` is False."""
        return self.tok.encode(string) if add_special_tokens is False else [self.tok.bos_id, *self.tok.encode(string)]

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return dict(model=cfg.name, num_steps=self.num_steps if cfg.is_looped else None, state_seed=self.state_seed)

    def _score(self, rows: Sequence[Row | None], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per row, batched; a None row (nothing to score) gives (0.0, True)."""
        present = [i for i, row in enumerate(rows) if row is not None]
        out = [(0.0, True)] * len(rows)
        with tqdm(total=len(present), desc=desc, disable=disable_tqdm) as bar:
            groups = [[rows[i]] for i in present]
            scores = score_groups(self.model, groups, batch_size=self.batch_size, on_batch=bar.update, **self._shared)
        for i, (score,) in zip(present, scores, strict=True):
            out[i] = (-score.nll, score.greedy)
        return out

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = [make_row(ctx, cont, self.max_length)[0] if cont else None for _, ctx, cont in requests]
        results = self._score(rows, "parcae loglikelihood", disable_tqdm)
        for (pair, _, _), result in zip(requests, results, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        owners, rows = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, windows):
                rows.append(make_row(context, continuation, self.max_length)[0])
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._score(rows, "parcae rolling", disable_tqdm), strict=True):
            totals[r] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("the parcae model only decodes greedily (do_sample=True was requested).")
            budget = int(kwargs["max_gen_toks"])
            if budget < 1:
                raise ValueError(f"max_gen_toks must be a positive integer, got {budget}.")
            fit = min(budget, self.max_length - 1)  # e.g. lm-eval's default 256 in a 256-token context
            if fit < budget:
                logger.warning("max_gen_toks %d does not fit the %d-token context; using %d.", budget, fit + 1, fit)
            jobs.append((self.tok_encode(context)[-(self.max_length - fit) :], fit, [s for s in kwargs["until"] if s]))
        outputs = [""] * len(jobs)
        # Rows of a batch share one budget, so left-padded prompt + budget always fits the context.
        order = sorted(range(len(jobs)), key=lambda j: (jobs[j][1], -len(jobs[j][0])))
        groups = [list(group) for _, group in itertools.groupby(order, key=lambda j: jobs[j][1])]
        batches = [group[k : k + self.batch_size] for group in groups for k in range(0, len(group), self.batch_size)]
        with tqdm(total=len(jobs), desc="parcae generate_until", disable=disable_tqdm) as bar:
            for batch in batches:
                for j, text in zip(batch, self._greedy([jobs[j] for j in batch]), strict=True):
                    outputs[j] = text
                    self.cache_hook.add_partial("generate_until", requests[j].args, text)
                bar.update(len(batch))
        return outputs

    def _greedy(self, jobs: list[tuple[list[int], int, list[str]]]) -> list[str]:
        """Greedy continuations of (context ids, max new tokens, stop strings) sharing one budget, cut at a stop."""
        specials = [self.tok.bos_id, self.tok.eos_id, self.tok.pad_id]
        new: list[list[int]] = [[] for _ in jobs]
        texts, done = [""] * len(jobs), [False] * len(jobs)
        with evaluating(self.model):
            prompts, options = [ids for ids, _, _ in jobs], dict(temperature=0.0, stop=specials, **self._shared)
            for step in self.model.generate(prompts, jobs[0][1], stream=True, **options):
                for i, token in enumerate(step.tokens.tolist()):
                    if done[i] or token in specials:  # a document boundary ends the answer
                        done[i] = True
                        continue
                    new[i].append(token)
                    texts[i] = self.tok.decode(new[i])
                    done[i] = any(s in texts[i] for s in jobs[i][2])
                if all(done):
                    break
        for i, (_, _, stops) in enumerate(jobs):
            cuts = [texts[i].find(s) for s in stops if s in texts[i]]
            texts[i] = texts[i][: min(cuts, default=len(texts[i]))]
        return texts


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m parcae.interop.lm_eval ARGS`: lm-eval's command line with the `parcae` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # run as a script: the package module imported here registers `parcae`, as one class
    from parcae.interop.lm_eval import main as _main

    _main()
else:
    register_model("parcae")(ParcaeLM)
