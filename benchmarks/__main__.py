"""``python -m benchmarks SUITE [--quick] [--out DIR] [suite options]``, or ``report`` to rewrite BENCHMARKS.md."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
