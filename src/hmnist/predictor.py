"""Trained checkpoints, or their ONNX exports, ready to classify image files: what `hmnist.load`
hands out and `hmnist predict` runs.

Preprocessing comes from the checkpoint alone: each image is decoded by `data.decode_image` at
the checkpoint's prepare_size (image_files.py), then resized and normalised on the device
exactly as in evaluation, with the checkpoint's test-time augmentation, calibration and
operating points. Several checkpoints make an ensemble: their probabilities are averaged.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image

from hmnist.config import CLASS_COLUMNS, CLASSES, TTA
from hmnist.errors import UserError
from hmnist.image_files import DECODE_THREADS, check_unique_names, decoded_batches, find_images

log = logging.getLogger(__name__)

# torch, timm and pandas are imported where they are used: together they take seconds to
# import, and `import hmnist` should not wait for them.
if TYPE_CHECKING:
    import pandas as pd
    import torch

SKIP_HINT = "skip unreadable files with --skip-bad"


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
    """A checkpoint (.pt) as a _Member, or an ONNX export (.onnx) as an onnx_model.OnnxModel:
    both give (probabilities, calibrated probabilities) of uint8 cache-size images through `outputs`."""
    from hmnist.onnx_model import OnnxModel, is_onnx

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
        from hmnist.metrics import submission_frame

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        tta = self._check_options(batch_size, tta, explain)
        files = find_images(paths)
        check_unique_names(files)
        table = self._metadata_table(metadata, [f.stem for f in files])  # before any decoding
        folder = None if explain is None else make_folder(Path(explain))
        names, probs, calibrated, skipped = self._classify_files(files, batch_size, tta, skip_bad, progress,
                                                                 folder, table)
        if not names:
            raise UserError(f"none of the {len(files)} input file(s) could be read as an image")
        frame = submission_frame(names, np.concatenate(probs))
        calibrated_frame = submission_frame(names, np.concatenate(calibrated))
        return Prediction(frame, calibrated_frame, self.decisions(frame, calibrated_frame), skipped)

    def _check_options(self, batch_size: int, tta: str | bool | None, explain) -> str | None:
        """`tta` as a mode name (or None: each checkpoint's own), once the options suit the checkpoints."""
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
        return tta

    def _classify_files(self, files: list[Path], batch_size: int, tta: str | None, skip_bad: bool,
                        progress: bool | None, explain: Path | None, table):
        """(names, probabilities and calibrated probabilities per batch, skipped files) of `files`,
        decoded in threads one batch ahead of the model; each batch's maps go to `explain`."""
        import torch
        from tqdm import tqdm

        from hmnist.inference import BatchSize

        names, probs, calibrated, skipped = [], [], [], []
        inference_batch = BatchSize(batch_size)  # halved on out-of-memory, for all later batches too
        bar = tqdm(total=len(files), desc="predict", unit="img",
                   disable=None if progress is None else not progress)
        with bar, ThreadPoolExecutor(DECODE_THREADS) as pool, \
                closing(decoded_batches(files, self.prepare_size, batch_size, pool)) as batches:
            for batch in batches:
                good = readable(batch, skip_bad, skipped)
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
        return names, probs, calibrated, skipped

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
                log.info(f"notice: {users[0].path} reads patient metadata ({fields}) and none was given "
                         f"(--metadata FILE.csv): predicting with every field missing")
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
            log.info(notice)
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



def readable(batch: list[tuple[Path, tuple[np.ndarray | None, str | None]]], skip_bad: bool,
             skipped: list[str]) -> list[tuple[Path, np.ndarray]]:
    """The (path, image) pairs of `batch` that decoded; an unreadable file raises UserError or,
    with `skip_bad`, is warned about on stderr (the log, which keeps the progress bar whole) and
    added to `skipped`."""
    good = []
    for path, (image, reason) in batch:
        if reason is None:
            good.append((path, image))
            continue
        if not skip_bad:
            raise UserError(f"{path}: {reason} ({SKIP_HINT})")
        log.warning(f"warning: skipping {path}: {reason}")
        skipped.append(str(path))
    return good


def make_folder(folder: Path) -> Path:
    """The --explain folder, made if missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the --explain folder {folder}: {e.strerror or e}") from None
    return folder
