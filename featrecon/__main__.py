"""`python -m featrecon COMMAND ...`: the console commands without the entry points."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
