"""``python -m sliceout_fx``: the ``sliceout-fx`` command line."""

import sys

from .cli import main

sys.exit(main())
