"""``python -m engines.serving``: the same as ``kvstore serve``."""

import sys

from engines.serving.command import main

sys.exit(main())
