"""Classify new images with a trained checkpoint; write an ISIC 2018 Task 3 submission file.

    hmnist predict --checkpoint models/model.pt PATH... [--out predictions.csv]
        (and beside it predictions_calibrated.csv, predictions_decisions.csv)
    hmnist predict --checkpoint models/model.pt --checkpoint models/fold1.pt ... PATH...   (an ensemble)
    hmnist predict --checkpoint models/model.pt PATH... --explain maps/   (and each image's class-activation map)
    hmnist predict --checkpoint models/model.pt PATH... --metadata meta.csv   (a model trained with metadata)
    hmnist predict --checkpoint export/model.onnx PATH...   (the ONNX export, through ONNX Runtime: the same CSV)
    python -m hmnist.commands.predict --checkpoint models/model.pt PATH...     (the same arguments)

PATH is any mix of image files and folders; folders are searched recursively for JPEG and
PNG files (.jpg, .jpeg, .png, any case), skipping hidden files and folders as a shell glob
does. Preprocessing comes from the checkpoint alone: each image is decoded by
`data.decode_image` at the checkpoint's prepare_size, the function that built the cache the
model was evaluated on, then resized and normalised on the device exactly as in evaluation,
with the checkpoint's test-time augmentation, calibration and operating points. An ONNX export
(onnx_export.py, `dvc repro export`) is decoded and resized the same way, on the CPU, and run by
ONNX Runtime, whose graph holds the normalisation, the views and the calibration; its metadata
holds the classes, sizes, TTA, calibration and operating points predict needs.

This module is the command: its arguments and files. The checkpoints and the classifying are
predictor.py's `Predictor` (what `hmnist.load` hands out), finding and decoding the images
image_files.py's.

The submission CSV holds the model's own probabilities, whose argmax is the decision balanced
accuracy measures; the calibrated probabilities (which can be read as probabilities) and the
operating points' yes/no decisions go beside it (docs/metrics.md, "Which file holds what").

From Python:

    import hmnist
    model = hmnist.load("models/model.pt")
    frame = model.predict(["new_images/"], batch_size=64, skip_bad=False)   # the submission
    result = model.classify(["new_images/"])   # .submission, .calibrated, .decisions, .skipped
"""
from __future__ import annotations

import logging
import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hmnist.config import DEVICES, TTA
from hmnist.errors import at_least, cli, description
from hmnist.image_files import check_unique_names, find_images
from hmnist.predictor import Predictor

log = logging.getLogger("hmnist.commands.predict")  # not __name__, which is "__main__" under -m

# pandas (and torch, timm) are imported where they are used: together they take seconds to
# import, and `hmnist --help` or a typo in a PATH should not wait for them.
if TYPE_CHECKING:
    import pandas as pd


def beside(out: str, suffix: str) -> Path:
    """predictions.csv -> predictions_<suffix>.csv, in the same folder."""
    path = Path(out)
    return path.with_name(f"{path.stem}_{suffix}{path.suffix or '.csv'}")


def write_submission(frame: pd.DataFrame, out: str) -> None:
    """The CSV to `out` ("-" for stdout), written under a temporary name and renamed when complete."""
    if out == "-":
        frame.to_csv(sys.stdout, index=False, lineterminator="\n")
        return
    from hmnist.data import write_whole

    write_whole(Path(out), lambda partial: frame.to_csv(partial, index=False, lineterminator="\n"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files and folders (searched recursively for .jpg, .jpeg, .png)")
    parser.add_argument("--checkpoint", required=True, action="append",
                        help="a model saved by the train stage, e.g. models/model.pt, or its ONNX export "
                             "(export/model.onnx, run by ONNX Runtime on the CPU); repeat it to average several "
                             "(the folds of cv.folds: --checkpoint models/model.pt --checkpoint models/fold1.pt ...)")
    parser.add_argument("--out", default="predictions.csv",
                        help="the ISIC 2018 submission CSV to write; - for stdout (default: %(default)s). Beside "
                             "it: OUT_calibrated.csv (calibrated probabilities) and OUT_decisions.csv (the argmax "
                             "class and yes/no per operating point); with -, neither")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA when present, else the CPU (default: %(default)s)")
    parser.add_argument("--tta", nargs="?", const="flips", default=None, choices=TTA,
                        help="test-time augmentation instead of the checkpoint's own (models.<name>.tta, which "
                             "evaluate used): none, hflip (the image and its horizontal flip), flips (the four "
                             "flips; --tta alone) or dihedral (the eight flips and right-angle rotations) "
                             "(default: the checkpoint's)")
    parser.add_argument("--explain", metavar="DIR",
                        help="also write each image's class-activation map (Grad-CAM, for its predicted class) "
                             "over the image as DIR/<image>.png")
    parser.add_argument("--metadata", metavar="FILE.csv",
                        help="each image's patient metadata, for a model trained with it: a CSV with an image column "
                             "(the file name without extension) and age, sex, localization (or the ISIC archive's "
                             "age_approx, anatom_site_general); every image needs a row, empty fields are unknown. "
                             "Without it such a model predicts with every field missing")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip files that cannot be decoded, with a warning, instead of stopping")


def run(args: argparse.Namespace) -> None:
    files = find_images(args.paths)  # before loading the model: a typo fails in a blink
    check_unique_names(files)
    if args.out != "-":
        from hmnist.data import check_writable

        check_writable(Path(args.out), "predictions.csv")
    predictor = Predictor(args.checkpoint, args.device)
    result = predictor.classify(files, args.batch_size, tta=args.tta, skip_bad=args.skip_bad, progress=None,
                                explain=args.explain, metadata=args.metadata)
    frame = result.submission
    write_submission(frame, args.out)
    if args.out != "-":
        write_submission(result.calibrated, str(beside(args.out, "calibrated")))
        write_submission(result.decisions, str(beside(args.out, "decisions")))
    report = sys.stderr if args.out == "-" else sys.stdout  # stdout may be the CSV itself
    skipped = result.skipped
    if skipped:
        log.warning(f"skipped {len(skipped)} file(s) that could not be read as images:")
        for path in skipped:
            log.warning(f"  {path}")
    where = "stdout" if args.out == "-" else args.out
    ensemble = f", ensemble of {len(predictor.members)}" if len(predictor.members) > 1 else ""
    tta = args.tta or predictor.members[0].tta
    also = f" (and {beside(args.out, 'calibrated')}, {beside(args.out, 'decisions')})" if args.out != "-" else ""
    print(f"{predictor.model_name} ({predictor.arch}{ensemble}) classified {len(frame)} image(s)"
          f"{'' if tta == 'none' else f' with TTA ({tta})'}"
          f"{f' with the metadata of {args.metadata}' if args.metadata else ''}: "
          f"wrote {where}{also}" + (f", and their maps to {args.explain}" if args.explain else ""), file=report)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hmnist.commands.predict", description=description(__doc__))
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
