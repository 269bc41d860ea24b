"""`python -m wcms` is the `wcms` command."""

import sys

from wcms.cli import main

sys.exit(main())
