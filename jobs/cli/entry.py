"""The entrypoint of an `m3 submit` job on the cluster: `python -m jobs.cli.entry STAGE [args]`
runs the stage with the config the submitter resolved (jobs/ops/submit.py puts it, as YAML, in the
job's environment). Its own module so that jobs.ops.submit never imports the CLI that imports it."""

from __future__ import annotations

import os
import sys
import tempfile

from jobs.cli.main import main as cli_main
from jobs.ops.submit import CONFIG_ENV


def main(argv: list[str]) -> int:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        print(
            f"jobs.cli.entry: {CONFIG_ENV} is not set: this module is the entrypoint of `m3 submit` jobs",
            file=sys.stderr,
        )
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return cli_main([argv[0], "-c", f.name, *argv[1:]])
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
