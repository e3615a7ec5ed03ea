"""`python -m abdag` is the `abdag` command."""

import sys

from abdag.cli import main

sys.exit(main())
