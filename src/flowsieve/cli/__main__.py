"""``python -m flowsieve.cli`` entry point."""

import sys

from flowsieve.cli import main

sys.exit(main())
