"""`python -m parcae …` (also under torchrun) is the `parcae` command."""

from .cli import main

raise SystemExit(main())
