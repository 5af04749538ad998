"""`python -m tfemde.cli`."""

import sys

from tfemde.cli import main

sys.exit(main())
