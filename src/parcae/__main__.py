"""`python -m parcae …` (also under torchrun) is the `parcae` command."""

import sys

from .cli import main

sys.exit(main())
