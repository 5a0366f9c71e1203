"""``python -m fedtune`` is ``fedtune``."""

import sys

from fedtune.cli import main

sys.exit(main())
