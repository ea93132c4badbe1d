"""``python -m sinkscope.figures``: see :mod:`sinkscope.figures.cli`."""

import sys

from .cli import main

sys.exit(main())
