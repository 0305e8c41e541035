"""Command-line plumbing shared by ``tools/*.py``: ``-c CONFIG -o key=value ...`` and clean errors."""
import argparse
import sys

from ..errors import ConfigError, DataError, WeightsError

USER_ERRORS = (ConfigError, DataError, WeightsError, FileNotFoundError)


def parse_args(description, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", required=True, help="PaddleClas-style YAML config")
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="override a key, e.g. -o Global.epochs=5 -o Arch.class_num=10 "
                             "(value parsed as YAML; list items by index: transform_ops.1.X.size=160)")
    return parser.parse_args(argv)


def run_cli(description, fn, argv=None):
    """Load the config from argv and call ``fn(cfg)``; user errors print one clear line, exit 2."""
    from ..config import load_config
    args = parse_args(description, argv)
    try:
        cfg = load_config(args.config, args.override)
        return fn(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
