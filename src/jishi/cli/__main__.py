"""`python -m jishi.cli` is the `jishi` command."""

import sys

from jishi.cli import main

sys.exit(main())
