"""`python -m jobs.run` is `m3 run`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
