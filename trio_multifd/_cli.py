"""The ``trio-multifd`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-multifd`` command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="trio-multifd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="decode a QEMU multifd channel capture")
    demo.add_argument("capture", help="a file of multifd channel bytes")
    args = parser.parse_args(argv)
    from ._demo import decode_capture

    return decode_capture(args.capture)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
