"""Entry point of the Pareto experiment; the code is the ``pareto_experiment`` package beside it.

    .venv/bin/python benchmarks/pareto.py --out runs/pareto [flags]   # see docs/pareto.md
"""

import sys
from pathlib import Path

# A script named pareto.py and a package named pareto cannot share one import name, so the package
# is pareto_experiment/ and this thin script keeps the documented command (and works under -I/-P,
# where Python does not put the script's folder on sys.path itself).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pareto_experiment.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
