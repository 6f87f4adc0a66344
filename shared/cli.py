"""The ``fedspine`` command line (coordinator, node, simulate, monitor, broker tools)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("fedspine: commands arrive with the coordinator and node agents", file=sys.stderr)
    return 2
