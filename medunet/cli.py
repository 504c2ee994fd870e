"""The ``medunet`` command line. Thin: parse arguments, call the package, print.

Exit status: 0 success, 1 failure, 2 usage error, 3 partial success (some files of a batch failed).
Errors are one line naming the file and the problem; ``--debug`` shows the traceback.

Each subcommand is a pair of functions below, ``_add_<name>(subparsers)`` which declares its
arguments and ``_run_<name>(args) -> int``; the package does the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def command(adder: Callable[[argparse._SubParsersAction], None]):
    """Register a subcommand's argument declaration (in the order the help lists them)."""
    _COMMANDS.append(adder)
    return adder


def batch_exit_code(n_ok: int, n_failed: int) -> int:
    """0 when all succeeded, 3 when some failed, 1 when all failed (or there was nothing to do)."""
    if n_failed == 0 and n_ok > 0:
        return EXIT_OK
    return EXIT_PARTIAL if n_ok > 0 else EXIT_FAILURE


# --------------------------------------------------------------------------------------------------
# medunet networks
@command
def _add_networks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("networks", help="list registered networks, their dimensions and parameter counts")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2)
    p.set_defaults(func=_run_networks)


def _run_networks(args: argparse.Namespace) -> int:
    from medunet import networks

    print(f"{'name':<14} {'dims':<6} {'params (2D)':>14} {'params (3D)':>14}  description")
    for name, spec in networks.available().items():
        counts = {}
        for d in (2, 3):
            if d in spec.spatial_dims:
                net = networks.create(name, spatial_dims=d, in_channels=args.in_channels,
                                      out_channels=args.out_channels)
                counts[d] = f"{networks.count_parameters(net):,}"
            else:
                counts[d] = "-"
        dims = ",".join(f"{d}D" for d in sorted(spec.spatial_dims))
        print(f"{name:<14} {dims:<6} {counts[2]:>14} {counts[3]:>14}  {spec.description}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from medunet import __version__

    parser = argparse.ArgumentParser(
        prog="medunet",
        description="medunet: 2D/3D medical image segmentation (U-Net family, MONAI, nnU-Net-style planning)",
    )
    parser.add_argument("--version", action="version", version=f"medunet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for adder in _COMMANDS:
        adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("medunet: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug or os.environ.get("MEDUNET_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"medunet {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
