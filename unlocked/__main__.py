"""``python -m unlocked``: the ``unlocked`` command, for an environment whose scripts
directory is not on PATH."""

import sys

from orchestrator.cli import main

sys.exit(main())
