"""``python -m cdeq.data list | describe NAME | fetch NAME... | fetch --all``."""
from __future__ import annotations

import argparse
import sys

from cdeq.data.registry import REGISTRY, DataError, available, describe, fetch, fetch_all


def main(argv: list[str] | None = None) -> int:
    """Run the data command line; returns the exit status (1 when a fetch failed)."""
    parser = argparse.ArgumentParser(prog="python -m cdeq.data", description="cdeq data sets")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="data sets and the state of their sources")
    p_describe = sub.add_parser("describe", help="sources and checksums of one data set")
    p_describe.add_argument("name", choices=list(REGISTRY))
    p_fetch = sub.add_parser("fetch", help="fetch and check data sets into the cache")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(REGISTRY)}")
    p_fetch.add_argument("--all", action="store_true", help="every data set with files")
    p_fetch.add_argument("--root", help="folder holding the files (one NAME only)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for status in available():
            print(status)
        return 0
    if args.command == "describe":
        print(describe(args.name))
        return 0
    if args.all == bool(args.names):
        parser.error("fetch: give NAME(s) or --all")
    if args.root is not None:
        if len(args.names) != 1:
            parser.error("fetch --root: give exactly one NAME")
        try:
            print(f"{args.names[0]}: {fetch(args.names[0], args.root)}")
        except DataError as exc:
            print(f"{args.names[0]}: FAILED: {exc}", file=sys.stderr)
            return 1
        return 0
    results = fetch_all(args.names or None, log=print)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
