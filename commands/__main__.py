"""``python -m mpcvit.commands``: the ``mpcvit`` console script."""

import sys

from . import main

sys.exit(main())
