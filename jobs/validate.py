"""`python -m jobs.validate` is `m3 validate`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
