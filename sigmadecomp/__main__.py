"""``python -m sigmadecomp`` is the ``sigmadecomp`` console script."""

import sys

from sigmadecomp.cli import main

if __name__ == "__main__":
    sys.exit(main())
