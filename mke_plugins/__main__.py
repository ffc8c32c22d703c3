"""``python -m mke_plugins``: the ``mke-plugins`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
