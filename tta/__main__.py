"""``python -m tta``: the same command line as the ``tta`` script (useful where the script is not on PATH)."""

import sys

from tta.cli import main

sys.exit(main())
