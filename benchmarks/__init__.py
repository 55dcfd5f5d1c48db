"""The benchmarks, each a module run as `python -m benchmarks.NAME` from the repository root.

Every one has a tiny mode (`--tiny`): the same code path at a size that runs in seconds, so
that tests/test_benchmarks.py can run them all in the suite and none rots unnoticed. Its
figures mean nothing; only the default sizes measure."""

from __future__ import annotations

import argparse

TINY_HELP = "a few seconds' run of the same code (for the test suite; its figures mean nothing)"


def add_tiny(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tiny", action="store_true", help=TINY_HELP)


def apply_tiny(ap: argparse.ArgumentParser, args: argparse.Namespace, **sizes) -> None:
    """With --tiny, each option named in `sizes` that was left at its default takes the tiny
    value instead (what the command line set explicitly stays)."""
    if args.tiny:
        for name, value in sizes.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
