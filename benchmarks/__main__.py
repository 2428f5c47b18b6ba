"""``python -m benchmarks``: see :mod:`benchmarks._cli`."""

import sys

from benchmarks._cli import main

if __name__ == "__main__":
    sys.exit(main())
