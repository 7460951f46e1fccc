"""``python -m pulse_bench ARGS``: the same as ``pulse bench ARGS``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``pulse bench`` with ``argv`` (default: the command line)."""
    from pipeline.cli import main as pulse_main

    return pulse_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
