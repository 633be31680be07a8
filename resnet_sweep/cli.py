"""`resnet-sweep` command line: tools around the sweeps (`python train.py` runs them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def cmd_stats(args) -> None:
    """Per-channel mean/std of the training split, as `data.normalize=dataset` uses."""
    from . import data

    root = Path(args.root)
    train = root / "train" if (root / "train").is_dir() else root
    paths = sorted(p for p in train.rglob("*") if data.is_image(p))
    if not paths:
        raise UserError(f"{train}: no images found")
    mean, std = data.channel_stats(paths)
    print(f"{len(paths)} images under {train}")
    print(f"mean: [{', '.join(f'{v:.4f}' for v in mean)}]")
    print(f"std:  [{', '.join(f'{v:.4f}' for v in std)}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stats", help="per-channel mean/std of ROOT/train (or ROOT), streamed")
    p.add_argument("root")
    p.set_defaults(func=cmd_stats)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"resnet-sweep {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
