"""``python -m sinkscope.cli``: the same as the ``sinkscope`` console script."""

import sys

from . import main

sys.exit(main())
