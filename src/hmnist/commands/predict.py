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

import argparse
import errno
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from hmnist.config import CLASS_COLUMNS, CLASSES, DEVICES, TTA
from hmnist.errors import UserError, at_least, cli, description

# torch, timm and pandas are imported where they are used: together they take seconds to
# import, and `hmnist --help` or a typo in a PATH should not wait for them.
if TYPE_CHECKING:
    import pandas as pd
    import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Decoding threads: PIL releases the GIL while it decodes, and a few threads keep up with a
# GPU on HAM10000-sized JPEGs. More would mostly hold more decoded batches in memory.
DECODE_THREADS = min(4, os.cpu_count() or 1)
SKIP_HINT = "skip unreadable files with --skip-bad"


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by `paths` (files, or folders searched recursively), sorted, deduplicated.

    A file named explicitly is kept whatever its extension (decoding will say if it is not an
    image); in folders only .jpg, .jpeg and .png files count.
    """
    found: dict[str, Path] = {}  # real path -> the path as the user spelled it, first seen wins
    searched = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            searched.append(str(path))
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                for name in names:
                    if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                        file = Path(folder, name)
                        found.setdefault(os.path.realpath(file), file)
        elif os.path.lexists(path):  # a broken symbolic link too: read_image names it, --skip-bad skips it
            found.setdefault(os.path.realpath(path), path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not found:
        where = ", ".join(searched) if searched else "the given paths"
        raise UserError(f"no JPEG or PNG images (.jpg, .jpeg, .png) found in {where}")
    return sorted(found.values(), key=str)


def check_unique_names(files: Sequence[Path]) -> None:
    """The submission names each image by its file name without extension: those must be unique."""
    seen: dict[str, Path] = {}
    for file in files:
        if file.stem in seen:
            raise UserError(f"two inputs would both be image '{file.stem}' in the submission: "
                            f"{seen[file.stem]} and {file}; rename or leave out one of them")
        seen[file.stem] = file


def read_image(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(size x size x 3 uint8 image, None), or (None, why it cannot be read)."""
    from hmnist.data import decode_image

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return None, "not a JPEG or PNG file: its name does not end in .jpg, .jpeg or .png"
    try:
        data = path.read_bytes()
    except OSError as e:
        if path.is_symlink():  # os.walk lists a link whatever it points at
            if e.errno == errno.ELOOP:
                return None, "a broken symbolic link: it leads to itself, in a loop"
            if e.errno == errno.ENOENT:
                return None, f"a broken symbolic link: its target {os.readlink(path)} does not exist"
        return None, f"cannot read it: {e.strerror or e}"
    try:
        return decode_image(data, size), None
    except ValueError as e:
        reason = str(e)
        if "cannot identify image file" in reason:  # PIL's words, with a BytesIO repr in them
            reason = "not an image, or in a format PIL cannot read"
        return None, f"cannot decode it as an image: {reason}"


class _Member:
    """One checkpoint of a Predictor: its model and preprocessing."""

    def __init__(self, path: Path, device: torch.device):
        from hmnist.inference import inference_model
        from hmnist.models import damaged_checkpoint, load_checkpoint

        self.path = path
        state = load_checkpoint(path)
        try:
            self.classes = list(state["classes"])
            self.model_name, self.arch = str(state["model_name"]), str(state["arch"])
            self.input_size, self.prepare_size = int(state["input_size"]), int(state["prepare_size"])
        except (KeyError, TypeError, ValueError) as e:
            # right format tag but missing fields: damaged, or edited by hand
            raise damaged_checkpoint(path, e) from None
        self.model, self.model_input = inference_model(state, device, str(path))
        # absent from checkpoints made before them: no TTA, no calibration, no operating points
        self.tta, self.calibration = state.get("tta", "none"), state.get("calibration")
        from hmnist.fusion import checkpoint_encoding

        self.encoding = checkpoint_encoding(state)  # None: an image-only model (checked by inference_model)
        self.state = {k: v for k, v in state.items() if k != "state_dict"}  # what ensemble_operating_points reads
        check_classes(path, self.classes)

    def encoded_metadata(self, rows: pd.DataFrame | None, count: int) -> torch.Tensor | None:
        """A metadata model's encoded `rows` (`count` all-missing rows when None); None for an image-only one."""
        import torch

        return None if self.encoding is None else torch.from_numpy(self.encoding.encode(rows, count))

    def outputs(self, images: torch.Tensor, batch_size, device: torch.device, tta: str | None,
                metadata: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, calibrated probabilities) of a uint8 NHWC cache-size batch, with the
        checkpoint's own views (tta None) or `tta`'s, and the checkpoint's calibration; `metadata`:
        the images' encoded metadata rows, for a metadata model (`metadata`)."""
        from hmnist import calibration
        from hmnist.inference import predict_probs

        probs = predict_probs(self.model, images, self.model_input, batch_size, device,
                              tta=self.tta if tta is None else tta, metadata=metadata)
        return probs, calibration.apply(probs, self.calibration)


def check_classes(path: Path, classes: Sequence[str]) -> None:
    if tuple(classes) != CLASSES:
        # the submission's columns are ISIC 2018's classes in ISIC 2018's order
        raise UserError(f"{path} predicts classes {', '.join(classes)}, "
                        f"not the ISIC 2018 ones ({', '.join(CLASSES)})")


def load_member(path: Path, device: torch.device):
    """A checkpoint (.pt) as a _Member, or an ONNX export (.onnx) as an onnx_export.OnnxModel:
    both give (probabilities, calibrated probabilities) of uint8 cache-size images through `outputs`."""
    from hmnist.onnx_export import OnnxModel, is_onnx

    if not is_onnx(path):
        return _Member(path, device)
    member = OnnxModel(path)
    check_classes(path, member.classes)
    return member


@dataclass
class Prediction:
    """What `Predictor.classify` returns, one row per image, sorted by image."""
    submission: pd.DataFrame  # ISIC 2018 columns: the model's own probabilities (their argmax: the decision)
    calibrated: pd.DataFrame  # the same columns, calibrated probabilities (the checkpoint's calibration)
    decisions: pd.DataFrame  # image, class (the argmax), and yes/no per operating point
    skipped: list[str] = field(default_factory=list)  # files that could not be read (skip_bad)


class Predictor:
    """Trained checkpoints ready to classify image files; made by `hmnist.load(path)`. Several
    checkpoints (the folds of a cross-validation run) make an ensemble: their probabilities
    are averaged, as the evaluate stage does."""

    def __init__(self, checkpoint: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto"):
        from hmnist.engine import resolve_device

        self.device = resolve_device(device, setting="--device")  # before the checkpoints: fail fast
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        if not paths:
            raise UserError("no checkpoint given")
        self.members = [load_member(Path(path), self.device) for path in paths]
        first = self.members[0]
        self.checkpoint_path, self.classes = first.path, first.classes
        self.model_name, self.arch = first.model_name, first.arch
        self.input_size, self.prepare_size = first.input_size, first.prepare_size
        from hmnist.calibration import ensemble_operating_points

        self.operating_points = ensemble_operating_points([m.state for m in self.members])
        for member in self.members[1:]:
            if member.prepare_size != self.prepare_size:
                # one decode per image serves every member, as one prepared cache served evaluate
                raise UserError(f"{member.path} reads {member.prepare_size}px images but {first.path} "
                                f"{first.prepare_size}px: an ensemble's checkpoints must come from one cache size")

    @property
    def model(self) -> torch.nn.Module:
        """The (first) checkpoint's model."""
        return self.members[0].model

    @property
    def model_input(self):
        return self.members[0].model_input

    def __repr__(self) -> str:
        source = self.checkpoint_path if len(self.members) == 1 else f"{len(self.members)} checkpoints"
        return f"Predictor({self.model_name}: {self.arch} at {self.input_size}px, from {source}, on {self.device})"

    def predict(self, paths: str | os.PathLike | Iterable[str | os.PathLike], batch_size: int = 64,
                tta: str | None = None, skip_bad: bool = False, progress: bool | None = False,
                explain: str | os.PathLike | None = None, metadata: str | os.PathLike | None = None) -> pd.DataFrame:
        """The model's probabilities for every image in `paths`, in the ISIC 2018 submission format
        (`classify(...).submission`; the calibrated ones and the decisions: `classify`)."""
        result = self.classify(paths, batch_size, tta, skip_bad, progress, explain, metadata)
        result.submission.attrs["skipped"] = result.skipped
        return result.submission

    def classify(self, paths: str | os.PathLike | Iterable[str | os.PathLike], batch_size: int = 64,
                 tta: str | None = None, skip_bad: bool = False, progress: bool | None = False,
                 explain: str | os.PathLike | None = None, metadata: str | os.PathLike | None = None) -> Prediction:
        """Probabilities, calibrated probabilities and decisions for every image in `paths`.

        The frames have one row per image, sorted by image (the file name without extension);
        the probability frames have the ISIC 2018 columns image, MEL, NV, BCC, AKIEC, BKL, DF,
        VASC. `tta`: None (each checkpoint's own, `models.<name>.tta`), or "none", "hflip" (the
        image and its horizontal flip), "flips" (the four flips) or "dihedral" (the eight flips
        and right-angle rotations) for every checkpoint; the calibration stays the checkpoint's,
        fitted with its own TTA. With `skip_bad`, files that cannot be decoded are left out with
        a warning on stderr and listed in `.skipped`; without it the first one raises UserError.
        `progress=None` shows a bar only on a terminal. With `explain`, a folder, each image's
        Grad-CAM map for its predicted class (cam.py; an ensemble's: the mean of its checkpoints'
        maps), overlaid on the image as the model saw it, goes there as <image>.png.
        `metadata`: a CSV of each image's patient metadata (`image` plus age, sex, localization
        or the ISIC archive's names; docs/workflow.md#metadata) for a model trained with it;
        without it such a model predicts with every field missing, and says so once.
        """
        import torch
        from tqdm import tqdm

        from hmnist.inference import BatchSize
        from hmnist.metrics import submission_frame

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(tta, bool):  # the older signature: tta=True meant the four flips
            tta = "flips" if tta else "none"
        if tta is not None and tta not in TTA:
            raise UserError(f"tta must be one of {', '.join(TTA)}, got {tta!r}")
        for member in self.members:  # an ONNX export's views are in its graph: None (the default) takes them
            if member.model is None and tta not in (None, member.tta):
                raise UserError(f"{member.path} has its test-time augmentation built in ({member.tta}): "
                                f"leave out --tta (tta={tta!r}), or export again")
        if explain is not None and any(m.model is None for m in self.members):
            onnx = next(m for m in self.members if m.model is None)
            raise UserError(f"--explain needs PyTorch checkpoints (.pt): {onnx.path} is an ONNX export "
                            f"(give its models/model.pt instead)")
        files = find_images(paths)
        check_unique_names(files)
        table = self._metadata_table(metadata, [f.stem for f in files])  # before any decoding
        if explain is not None:
            explain = Path(explain)
            try:
                explain.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot make the --explain folder {explain}: {e.strerror or e}") from None

        names, probs, calibrated, skipped = [], [], [], []
        inference_batch = BatchSize(batch_size)  # halved on out-of-memory, for all later batches too
        bar = tqdm(total=len(files), desc="predict", unit="img",
                   disable=None if progress is None else not progress)
        with bar, ThreadPoolExecutor(DECODE_THREADS) as pool, \
                closing(self._decoded_batches(files, batch_size, pool)) as batches:
            for batch in batches:
                good = []
                for path, (image, reason) in batch:
                    if reason is None:
                        good.append((path, image))
                        continue
                    if not skip_bad:
                        raise UserError(f"{path}: {reason} ({SKIP_HINT})")
                    tqdm.write(f"warning: skipping {path}: {reason}", file=sys.stderr)
                    skipped.append(str(path))
                if good:
                    images = torch.from_numpy(np.stack([image for _, image in good]))
                    rows = None if table is None else table.for_images([path.stem for path, _ in good])
                    own = [m.outputs(images, inference_batch, self.device, tta,
                                     m.encoded_metadata(rows, len(good)))
                           for m in self.members]
                    # an ensemble: the mean of the members' probabilities, and of their calibrated ones
                    probs.append(np.mean([p for p, _ in own], axis=0))
                    calibrated.append(np.mean([c for _, c in own], axis=0))
                    names += [path.stem for path, _ in good]
                    if explain is not None:
                        self._explain(images, probs[-1].argmax(1), names[-len(good):], explain, rows)
                bar.update(len(batch))
        if not names:
            raise UserError(f"none of the {len(files)} input file(s) could be read as an image")
        frame = submission_frame(names, np.concatenate(probs))
        calibrated_frame = submission_frame(names, np.concatenate(calibrated))
        return Prediction(frame, calibrated_frame, self.decisions(frame, calibrated_frame), skipped)

    def decisions(self, submission: pd.DataFrame, calibrated: pd.DataFrame) -> pd.DataFrame:
        """Per image its argmax class (of the submission's probabilities) and, per operating point,
        yes when the calibrated probability of its classes reaches the checkpoint's threshold."""
        import pandas as pd

        from hmnist.calibration import decisions

        columns = CLASS_COLUMNS
        out = pd.DataFrame({"image": submission["image"],
                            "class": [CLASSES[i] for i in submission[columns].to_numpy().argmax(1)]})
        for name, flagged in decisions(calibrated[columns].to_numpy(), self.operating_points).items():
            out[name] = np.where(flagged, "yes", "no")
        return out

    def _metadata_table(self, metadata: str | os.PathLike | None, names: list[str]):
        """The metadata CSV read and checked against the images (fusion.MetadataFile), or None;
        its notices, or the one saying that a metadata model gets none, on stderr."""
        from hmnist import fusion

        users = [m for m in self.members if m.encoding is not None]
        if metadata is None:
            if users:
                fields = ", ".join(users[0].encoding.fields)
                print(f"notice: {users[0].path} reads patient metadata ({fields}) and none was given "
                      f"(--metadata FILE.csv): predicting with every field missing", file=sys.stderr)
            return None
        if not users:
            raise UserError(f"--metadata was given but {self.checkpoint_path} was trained without metadata "
                            f"(models.<name>.metadata: []): leave --metadata out")
        table = fusion.read_csv(metadata)
        notices = table.notices + table.check_covers(names)
        fields = dict.fromkeys(f for m in users for f in m.encoding.fields)
        notices += [f"notice: {table.path} has no {f} column: read as missing for every image"
                    for f in fields if f not in table.rows.columns]
        for notice in notices:
            print(notice, file=sys.stderr)
        return table

    def _explain(self, images: torch.Tensor, predicted: np.ndarray, names: list[str], folder: Path,
                 rows: pd.DataFrame | None = None) -> None:
        from hmnist.cam import class_maps, overlay

        maps = np.mean([class_maps(m.model, m.model_input, images, predicted,
                                   metadata=m.encoded_metadata(rows, len(images)))
                        for m in self.members], axis=0)
        for name, image, heat in zip(names, images.numpy(), maps):
            path = folder / f"{name}.png"
            try:
                Image.fromarray(overlay(image, heat)).save(path)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None

    def _decoded_batches(self, files: list[Path], batch_size: int, pool: ThreadPoolExecutor
                         ) -> Iterator[list[tuple[Path, tuple[np.ndarray | None, str | None]]]]:
        """Batches of (path, read_image result), decoded by `pool` one batch ahead of the model.

        At most two batches of decoded images exist at once, whatever the number of files.
        """
        def submit(start: int) -> list[tuple[Path, Future]]:
            return [(path, pool.submit(read_image, path, self.prepare_size))
                    for path in files[start:start + batch_size]]

        ahead = submit(0)
        try:
            for start in range(0, len(files), batch_size):
                current, ahead = ahead, submit(start + batch_size)
                yield [(path, future.result()) for path, future in current]
        finally:
            for _, future in ahead:  # on an error, do not decode a batch nobody will use
                future.cancel()


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
        print(f"skipped {len(skipped)} file(s) that could not be read as images:", file=sys.stderr)
        for path in skipped:
            print(f"  {path}", file=sys.stderr)
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
