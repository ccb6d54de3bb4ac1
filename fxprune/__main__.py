"""``python -m fxprune train ...``: the same as the ``fxprune`` command."""
import sys

from .cli import main

sys.exit(main())
