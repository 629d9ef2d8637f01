"""``python -m sr_core``: see :mod:`sr_core.cli`."""
import sys

from .cli import main

sys.exit(main())
