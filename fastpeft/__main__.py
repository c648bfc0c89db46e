"""``python -m fastpeft``: the ``fastpeft`` command (see :mod:`fastpeft.cli`)."""
import sys

from fastpeft.cli import main

sys.exit(main())
