"""``python -m mstok.app``: the same as ``mstok app``."""

import sys

from mstok.app.command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
