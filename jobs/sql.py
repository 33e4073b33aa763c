"""`python -m jobs.sql` is `m3 sql`."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["sql", *sys.argv[1:]]))
