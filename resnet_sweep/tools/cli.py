"""`resnet-sweep` command line: tools around the sweeps (`python train.py` runs them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnet_sweep.core.errors import UserError


def check_store(uri: str | None) -> None:
    """A sqlite store that does not exist is a mistake here, not a new empty store to create."""
    if uri and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.exists():
            raise UserError(
                f"--tracking-uri {uri}: no MLflow store at {path.resolve()}; run a sweep here first "
                "or point --tracking-uri at your store"
            )


def cmd_stats(args) -> None:
    """Per-channel mean/std of the training split, as `data.normalize=dataset` uses."""
    from resnet_sweep.data import image_folder, normalisation

    root = Path(args.root)
    if (root / "train").is_dir():  # the files training reads: ROOT/train/<class>/**
        train = root / "train"
        paths = [p for cls in image_folder.class_folders(train) for p in image_folder.class_images(train / cls)]
    else:
        train = root
        paths = image_folder.class_images(root)
    if not paths:
        raise UserError(f"{train}: no images found")
    mean, std = normalisation.channel_stats(paths)
    print(f"{len(paths)} images under {train}")
    print(f"mean: [{', '.join(f'{v:.4f}' for v in mean)}]")
    print(f"std:  [{', '.join(f'{v:.4f}' for v in std)}]")


def cmd_split(args) -> None:
    """SRC/<class>/* -> DST/{train,valid,test}/<class>/*, no group in two splits."""
    from resnet_sweep.tools import split

    ratios = split.parse_ratios(args.ratios)
    items = split.scan(Path(args.src), args.group)
    assignment = split.assign(items, ratios, args.seed)
    split.write(items, assignment, Path(args.src), Path(args.dst), copy=args.copy, force=args.force)
    if args.group is None:
        print(
            "no --group: every file is its own group (give --group if files share a slide or patient)", file=sys.stderr
        )
    print(split.table(items, assignment, ratios))
    for cls, group, where in assignment.forced:
        print(f"note: group {group!r} went to {where} so that {where} holds class {cls!r}", file=sys.stderr)
    print(
        f"{len(items)} files in {len(assignment.split_of_group)} groups "
        f"{'copied' if args.copy else 'linked'} into {args.dst}/{{train,valid,test}}/; list in {args.dst}/split.csv"
    )


def cmd_report(args) -> None:
    from resnet_sweep.reports import report

    markdown, folder = report.write(args.tracking_uri, args.experiment, args.parent, args.out)
    print(markdown)
    print(
        f"report written to {folder}/ (report.md, runs.csv, test_acc_vs_lr.png, learning_curves.png, "
        "dashboard.html) and logged to the sweep's parent run (report/, dashboard.html)",
        file=sys.stderr,
    )


def cmd_predict(args) -> None:
    from resnet_sweep.tools import predict
    from resnet_sweep.training import hardware

    hardware.keep_freed_memory()  # as training jobs do: a forward's activations are reused, not page-faulted again
    out, n, bad, run = predict.predict(
        args.images_dir,
        args.run,
        args.best,
        args.experiment,
        args.tracking_uri,
        args.out,
        args.batch_size,
        args.logged_model,
        args.group,
        args.aggregate,
    )
    print(f"{n} predictions from run {run.info.run_name} ({run.info.run_id}) -> {out}")
    if args.group:
        print(f"per group ({args.aggregate}) -> {out.with_name(out.stem + '_groups.csv')}")
    if bad:
        print(f"{len(bad)} file(s) could not be read and were skipped:", file=sys.stderr)
        for path, why in bad:
            print(f"  {path}: {why}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def tracking_args(p):
        p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s)")
        p.add_argument("--experiment", default="resnet-sweep", help="MLflow experiment (default: %(default)s)")

    p = sub.add_parser("report", help="the study's tables (Markdown, CSV, PNG) of a sweep, from MLflow")
    tracking_args(p)
    p.add_argument("--parent", help="the sweep's parent run id (default: the latest sweep of the experiment)")
    p.add_argument("--out", help="output folder (default: reports/<parent run name>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="probabilities for a folder of images with a run's model -> CSV")
    p.add_argument("images_dir")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", help="the run id whose model predicts")
    which.add_argument("--best", action="store_true", help="the best run of the experiment (on validation)")
    tracking_args(p)
    p.add_argument(
        "--out",
        default="predictions.csv",
        help="CSV path,probability,label; three or more classes: path,p_<class>...,label (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--group",
        help="REGEX: the group (slide, patient) of each file, as split --group; adds <out stem>_groups.csv",
    )
    p.add_argument("--aggregate", default="mean", help="per group: mean (probability) or majority (of tile votes)")
    p.add_argument(
        "--logged-model",
        action="store_true",
        help="unpickle the run's logged MLflow model instead of rebuilding it from the weights-only "
        "checkpoint (only for stores you trust)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "split", help="SRC/<class>/* -> DST/{train,valid,test}/<class>/*, no group (slide) in two splits"
    )
    p.add_argument("src", help="folder with one folder per class")
    p.add_argument("dst", help="new or empty folder for train/, valid/, test/ and split.csv")
    p.add_argument(
        "--group",
        metavar="REGEX",
        help="the group of a file: the regex's first capture group (else the whole match), searched "
        "in the path below its class folder, e.g. 'slide(\\w+)_tile'; without it every file is "
        "its own group",
    )
    p.add_argument("--ratios", default="0.7,0.15,0.15", help="train,valid,test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="breaks ties between equal groups (default: %(default)s)")
    p.add_argument("--copy", action="store_true", help="copy the files (default: absolute symlinks)")
    p.add_argument("--force", action="store_true", help="replace an earlier split in DST (one with split.csv)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("stats", help="per-channel mean/std of ROOT/train (or ROOT), streamed")
    p.add_argument("root")
    p.set_defaults(func=cmd_stats)
    args = parser.parse_args(argv)
    try:
        check_store(getattr(args, "tracking_uri", None))
        args.func(args)
    except UserError as e:
        print(f"resnet-sweep {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
