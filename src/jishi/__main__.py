"""`python -m jishi` is the `jishi` command (the service unit starts the server this way)."""

import sys

from jishi.cli import main

sys.exit(main())
