"""`parcae generate`: sample text from a model."""

from __future__ import annotations

import argparse

from ..cli_types import positive_int


def register(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="sample text from a model",
        description='Sample a continuation.\n  parcae generate runs/tiny --prompt "def fib(" --steps 8',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("run", metavar="RUN", help="run directory or save_pretrained directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=positive_int, help="test-time depth T (default μ_rec)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=positive_int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--checkpoint", metavar="NAME")
    gen.add_argument("--device", default="auto")

    gen.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from ..run import open_run
    from ..train.trainer import resolve_device
    from .generate import generate

    run = open_run(args.run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    tok = run.tokenizer
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    ids = torch.tensor([prompt], dtype=torch.long)
    out = generate(run.model, ids, args.max_new_tokens, num_steps=args.steps, temperature=args.temperature,
                   top_k=args.top_k, stop_id=tok.bos_id, seed=args.seed, vocab_limit=tok.vocab_size)  # fmt: skip
    new = [t for t in out[0, len(prompt) :].tolist() if t != tok.bos_id]
    print(args.prompt + tok.decode(new))
    return 0
