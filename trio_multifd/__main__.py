"""``python -m trio_multifd``: the ``trio-multifd`` command."""

import sys

from ._cli import main

sys.exit(main())
