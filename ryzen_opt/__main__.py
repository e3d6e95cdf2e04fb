"""``python -m ryzen_opt`` is the same as the ``ryzen-opt`` console script."""

import sys

from ryzen_opt.cli import main

sys.exit(main())
