"""`parcae generate`: stream a continuation of a prompt from a model, with a KV cache and optional adaptive exit."""

import argparse
import dataclasses
import sys

from .args import Commands, command, positive_int

DESCRIPTION = """\
Stream a continuation of a prompt (statistics on stderr).
  parcae generate runs/tiny --prompt "def fib(" --steps 8
  parcae generate runs/tiny --prompt "def fib(" --steps 16 --exit kl:5e-4 --min-steps 2
  parcae generate runs/tiny --prompt "def fib(" --kv-policy last"""


def register(commands: Commands) -> None:
    add = command(commands, "generate", "sample text from a model", DESCRIPTION, handler=cmd_generate).add_argument
    add("run", metavar="RUN", help="run directory or save_pretrained directory")
    add("--prompt", required=True)
    add("--steps", type=positive_int, help="test-time depth T; the maximum with --exit (default μ_rec)")
    add("--kv-policy", default="full", metavar="POLICY", help="full | budget:K | last (default full)")
    add("--exit", metavar="SPEC", help="adaptive exit per token: kl:EPS | latent:EPS | argmax:K")
    add("--min-steps", type=positive_int, help="iterations before --exit may stop a token (default 1)")
    add("--max-new-tokens", type=positive_int, default=200)
    add("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    add("--top-k", type=positive_int, default=50)
    add("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    add("--seed", type=int, default=0)
    add("--checkpoint", metavar="NAME")
    add("--device", default="auto")


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
    stop = [tok.bos_id, tok.eos_id]
    stream = generate(run.model, [[tok.bos_id, *tok.encode(args.prompt)]], args.max_new_tokens, num_steps=args.steps,
                      kv_policy=policy, exit=criterion, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, stop=stop, seed=args.seed, stream=True, vocab_limit=tok.vocab_size,
                      pad_id=tok.pad_id)  # fmt: skip
    print(args.prompt, end="", flush=True)
    new: list[int] = []
    shown = text = ""
    for step in stream:
        token = int(step.tokens[0])
        if token in stop:
            break
        new.append(token)
        text = tok.decode(new)
        # Hold back a trailing incomplete UTF-8 sequence (decoded as U+FFFD) until its next bytes arrive.
        if not text.endswith("\ufffd") and text.startswith(shown):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    print(text[len(shown) :] if text.startswith(shown) else "", flush=True)
    print(f"[{stream.finish().summary()}]", file=sys.stderr)  # finish() runs the stream to its end for the statistics
    return 0
