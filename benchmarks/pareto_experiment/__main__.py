"""``python -m pareto_experiment --out DIR`` (from ``benchmarks/``): same as ``pareto.py``."""

import sys

from .run import main

sys.exit(main())
