"""`python -m featrecon COMMAND ...`: the three console commands without the entry points."""

import sys

from .cli import extract_main, score_main, train_main

COMMANDS = {"extract-features": extract_main, "train-decoder": train_main, "score": score_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m featrecon {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
