"""``python -m linsolve_rbp``: the ``linsolve-rbp`` command line."""

import sys

from .cli import main

sys.exit(main())
