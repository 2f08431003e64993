"""`python -m matching merge ...` (the same command as `rebasin merge`)."""

import argparse
import sys

from matching.cli import add_merge_command


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matching")
    add_merge_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
