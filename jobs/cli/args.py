"""What every `m3` command parses: -c/--config FILE and any number of --set KEY=VALUE, and the
command-line flags that stand for a --set (`m3 generate --temperature 0.7` is
`--set infer.temperature=0.7`): the config checks their values, and its errors name the flag."""

from __future__ import annotations

import argparse


class _Sets(argparse.Action):
    """A flag that stands for `--set KEY=VALUE`: it joins the --set overrides in command-line
    order (the later one wins), as (key, value, flag) so that an error names the flag."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        super().__init__(option_strings, "overrides", default=argparse.SUPPRESS, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.overrides = [*getattr(namespace, "overrides", []), (self.key, value, option_string)]


def config_parser() -> argparse.ArgumentParser:
    """The parent parser of every command: the config file and its overrides."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="pipeline YAML (default: built-in defaults)")
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set bank.uri=/tmp/bank (repeatable)",
    )
    return common


def config_flag(parser: argparse.ArgumentParser, flag: str, key: str, help: str, **kwargs) -> None:
    """Add `flag` as another spelling of `--set key=VALUE`; `type` converts the value as the flag
    reads it (a float from `1e-3`, which YAML would read as a string)."""
    parser.add_argument(flag, action=_Sets, key=key, help=f"{help} (= --set {key}=...)", **kwargs)
