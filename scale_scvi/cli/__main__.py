"""``python -m scale_scvi.cli``."""

import sys

from . import main

sys.exit(main())
