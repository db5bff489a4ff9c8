"""``python -m palo <verb> ...``: the ``palo`` command line (:mod:`palo.cli`)."""

import sys

from palo.cli import main

if __name__ == "__main__":
    sys.exit(main())
