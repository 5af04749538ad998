"""`python -m tfemde.cli`."""

import sys

from tfemde.cli import main

if __name__ == "__main__":
    sys.exit(main())
