"""`parcae generate`: stream a continuation of a prompt from a model, with a KV cache and optional adaptive exit."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .args import positive_int


def register(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="sample text from a model",
        description=(
            "Stream a continuation of a prompt (statistics on stderr).\n"
            '  parcae generate runs/tiny --prompt "def fib(" --steps 8\n'
            '  parcae generate runs/tiny --prompt "def fib(" --steps 16 --exit kl:5e-4 --min-steps 2\n'
            '  parcae generate runs/tiny --prompt "def fib(" --kv-policy last'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=positive_int, help="test-time depth T; the maximum with --exit (default μ_rec)")
    gen.add_argument("--kv-policy", default="full", metavar="POLICY", help="full | budget:K | last (default full)")
    gen.add_argument("--exit", metavar="SPEC", help="adaptive exit per token: kl:EPS | latent:EPS | argmax:K")
    gen.add_argument("--min-steps", type=positive_int, help="iterations before --exit may stop a token (default 1)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=positive_int, default=50)
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", metavar="NAME")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..model.cache import KVPolicy
    from ..model.exit import ExitCriterion
    from ..model.generate import generate
    from ..train.run import open_run

    # Check the specs before loading anything.
    policy = KVPolicy.parse(args.kv_policy)
    criterion = ExitCriterion.parse(args.exit) if args.exit else None
    if args.min_steps is not None:
        if criterion is None:
            raise ValueError("--min-steps needs --exit.")
        criterion = dataclasses.replace(criterion, min_steps=args.min_steps)

    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    tok = run.tokenizer
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    stream = generate(
        run.model, [prompt], args.max_new_tokens, num_steps=args.steps, kv_policy=policy, exit=criterion,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=[tok.bos_id, tok.eos_id],
        seed=args.seed, stream=True, vocab_limit=tok.vocab_size, pad_id=tok.pad_id,
    )  # fmt: skip
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = ""
    for step in stream:
        token = int(step.tokens[0])
        if token in (tok.bos_id, tok.eos_id):
            break
        new.append(token)
        text = tok.decode(new)
        # Hold back a trailing incomplete UTF-8 sequence (decoded as U+FFFD) until its next bytes arrive.
        if not text.endswith("\ufffd") and text.startswith(shown):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    text = tok.decode(new)
    print(text[len(shown) :] if text.startswith(shown) else "", flush=True)
    for _ in stream:  # run to the end for the statistics (a stop token ends the stream right away)
        pass
    if stream.output is not None:
        print(f"[{stream.output.summary()}]", file=sys.stderr)
    return 0
