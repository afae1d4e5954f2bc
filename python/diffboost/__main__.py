"""``python -m diffboost``: the same as the ``diffboost`` console script."""

import sys

from diffboost.cli import main

sys.exit(main())
