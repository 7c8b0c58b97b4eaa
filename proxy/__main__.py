"""`python -m proxy` is the same command as `portcullis`."""

import sys

from proxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
