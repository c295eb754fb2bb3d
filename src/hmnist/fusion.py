"""Patient metadata beside the image: the fields' encoding and the fused model.

HAM10000 gives, for every image, the patient's age and sex and the lesion's body site
(`localization`). A model whose `models.<name>.metadata` lists some of them reads them through:

- an `Encoding`, fitted on the train split's rows only and kept in the checkpoint (key
  "metadata"), so that evaluate and `hmnist predict` encode new rows exactly as training did:
  age as (age - train mean) / train sd plus a missing indicator (the scaled age is 0 when
  missing, so the indicator's weight is the learned "missing" value); sex and localization
  one-hot over the values seen in training plus their own "unknown" slot, which an empty value,
  "unknown", or a value training never saw all take;
- `FusedModel`: the timm backbone's pooled features (`forward_features`, then
  `forward_head(pre_logits=True)`, which every timm model and ResNet9 have) concatenated with a
  small MLP's embedding of the encoded fields, then a new linear classifier;
- `drop_fields`: training replaces whole fields by their missing encoding at random
  (`models.<name>.metadata_dropout`), so the model also works when a field, or all of them, is
  unknown at prediction time.

Only `config.METADATA_FIELDS` can be encoded: the label (dx), its proxy dx_type and the
identifiers (lesion_id, image_id) are refused here as in params.yaml, and `encode` reads no
other column of the frame it is given. The encoding is written here rather than with
scikit-learn's OneHotEncoder/StandardScaler: the checkpoint loads with weights_only=True, so
what it keeps must be plain lists and numbers, and sklearn's fitted transformers are pickled
objects; the arithmetic is a mean, an sd and a lookup.

`read_csv` reads `hmnist predict --metadata FILE.csv`: HAM10000's column names or the ISIC
archive's (`age_approx`, `anatom_site_general`), checked row by row (docs/workflow.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from hmnist.config import LEAKAGE_FIELDS, METADATA_FIELDS
from hmnist.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

UNKNOWN = "unknown"
CATEGORICAL = ("sex", "localization")
# the metadata branch: two small dense layers, as the ISIC 2019 winners' metadata branch, narrower:
# three fields carry a few bits, against a backbone's hundreds of pooled features
HIDDEN = 32

# HAM10000's localization vocabulary, and the ISIC archive's anatom_site_general values mapped onto
# it where one HAM10000 value covers the ISIC one. head/neck is HAM10000's face, scalp, ear or
# neck (which one is not known): unknown. anterior and lateral torso: HAM10000's generic "trunk"
# (it has chest and abdomen too, but the ISIC value does not say which).
HAM_SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity",
             "neck", "scalp", "trunk", "upper extremity")
ISIC_SITES = {"anterior torso": "trunk", "posterior torso": "back", "lateral torso": "trunk", "torso": "trunk",
              "upper extremity": "upper extremity", "lower extremity": "lower extremity", "palms/soles": "acral",
              "oral/genital": "genital", "head/neck": UNKNOWN}
SEXES = ("female", "male")
# a metadata CSV's column names for each field (HAM10000's first, then the ISIC archive's and
# challenge files'), and for the image it describes
FIELD_COLUMNS = {"age": ("age", "age_approx"), "sex": ("sex",),
                 "localization": ("localization", "anatom_site_general", "anatom_site_general_challenge")}
IMAGE_COLUMNS = ("image", "image_id", "isic_id", "image_name")
MAX_AGE = 120


def check_fields(fields: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`fields` in the canonical order, refused if any is not a metadata field (a leakage field
    above all: the encoder is the last gate before the model)."""
    for name in fields:
        if name in LEAKAGE_FIELDS or name not in METADATA_FIELDS:
            raise UserError(f"metadata field {name!r} cannot reach a model (allowed: {', '.join(METADATA_FIELDS)})")
    return tuple(f for f in METADATA_FIELDS if f in fields)


def _ages(frame: pd.DataFrame) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(frame["age"], errors="coerce").to_numpy(np.float64)


def _categories(frame: pd.DataFrame, name: str) -> np.ndarray:
    values = frame[name].fillna("").astype(str).str.strip().str.lower()
    return values.where(values != "", UNKNOWN).to_numpy()


@dataclass(frozen=True)
class Encoding:
    """How a model's metadata fields become numbers: fitted on the train split, kept in the checkpoint."""
    fields: tuple[str, ...]
    age_mean: float = 0.0
    age_scale: float = 1.0
    vocabularies: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (field, values seen in training)
    dropout: float = 0.0  # the training's field dropout (for the record: inference never drops)

    @classmethod
    def fit(cls, frame: pd.DataFrame, fields: list[str] | tuple[str, ...], dropout: float = 0.0) -> Encoding:
        fields = check_fields(fields)
        absent = [f for f in fields if f not in frame.columns]
        if absent:
            raise UserError(f"the prepared index has no {', '.join(absent)} column: it was prepared before hmnist "
                            f"kept the metadata; run the prepare stage again (dvc repro prepare)")
        mean, scale = 0.0, 1.0
        if "age" in fields:
            ages = _ages(frame)
            known = ages[~np.isnan(ages)]
            if len(known):
                mean = float(known.mean())
                scale = float(known.std()) or 1.0
        vocabularies = tuple((f, tuple(sorted(set(_categories(frame, f)) - {UNKNOWN}))) for f in fields
                             if f in CATEGORICAL)
        return cls(fields, mean, scale, vocabularies, float(dropout))

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> Encoding:
        """The checkpoint's "metadata" entry (KeyError/TypeError/ValueError when damaged)."""
        fields = check_fields(list(data["fields"]))
        return cls(fields, float(data["age"]["mean"]), float(data["age"]["scale"]),
                   tuple((f, tuple(str(v) for v in data[f])) for f in fields if f in CATEGORICAL),
                   float(data.get("dropout", 0.0)))

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain lists and numbers: the checkpoint loads with weights_only=True."""
        return {"fields": list(self.fields), "age": {"mean": self.age_mean, "scale": self.age_scale},
                **{f: list(values) for f, values in self.vocabularies}, "dropout": self.dropout}

    def layout(self) -> dict[str, slice]:
        """Each field's columns in the encoded vector."""
        vocab, out, start = dict(self.vocabularies), {}, 0
        for name in self.fields:
            width = 2 if name == "age" else len(vocab[name]) + 1
            out[name], start = slice(start, start + width), start + width
        return out

    @property
    def width(self) -> int:
        return sum(s.stop - s.start for s in self.layout().values())

    def missing(self, name: str) -> np.ndarray:
        """A field's encoding when it is unknown: age 0 with its indicator on; the unknown slot."""
        columns = self.layout()[name]
        out = np.zeros(columns.stop - columns.start, np.float32)
        out[-1] = 1.0
        return out

    def encode(self, frame: pd.DataFrame | None, rows: int | None = None,
               missing: list[str] | tuple[str, ...] = ()) -> np.ndarray:
        """The rows of `frame` encoded (N x width float32), reading only this encoding's fields;
        a field in `missing`, or absent from the frame, is missing in every row. `frame` None:
        `rows` rows with every field missing."""
        n = len(frame) if frame is not None else int(rows or 0)
        out = np.zeros((n, self.width), np.float32)
        vocab = dict(self.vocabularies)
        for name, columns in self.layout().items():
            if frame is None or name in missing or name not in frame.columns:
                out[:, columns] = self.missing(name)
                continue
            block = out[:, columns]
            if name == "age":
                ages = _ages(frame)
                known = ~np.isnan(ages)
                block[known, 0] = (ages[known] - self.age_mean) / self.age_scale
                block[~known, 1] = 1.0
            else:
                index = {v: i for i, v in enumerate(vocab[name])}
                slots = [index.get(v, len(index)) for v in _categories(frame, name)]  # unseen -> unknown
                block[np.arange(n), slots] = 1.0
            out[:, columns] = block
        return out


def checkpoint_encoding(checkpoint: dict[str, Any]) -> Encoding | None:
    """The checkpoint's metadata encoding; None for an image-only model (no "metadata" key: every
    checkpoint made before metadata existed, too)."""
    data = checkpoint.get("metadata")
    return Encoding.from_checkpoint(data) if data else None


def encoded_for(checkpoint: dict[str, Any], frame: pd.DataFrame | None, rows: int,
                missing: list[str] | tuple[str, ...] = ()) -> torch.Tensor | None:
    """The checkpoint's encoding of `frame`'s rows (`rows` all missing when `frame` is None), the
    fields in `missing` read as missing; None for an image-only model."""
    encoding = checkpoint_encoding(checkpoint)
    return None if encoding is None else torch.from_numpy(encoding.encode(frame, rows, missing))


def drop_fields(metadata: torch.Tensor, encoding: Encoding, p: float, generator: torch.Generator) -> torch.Tensor:
    """`metadata` (encoded rows) with each field of each row replaced by its missing encoding with
    probability `p`, drawn from `generator` (one draw per row and field, field by field)."""
    if p <= 0:
        return metadata
    out = metadata.clone()
    for name, columns in encoding.layout().items():
        dropped = torch.rand(len(out), generator=generator, device=generator.device).to(out.device) < p
        missing = torch.from_numpy(encoding.missing(name)).to(out.device)
        out[:, columns] = torch.where(dropped[:, None], missing, out[:, columns])
    return out


class FusedModel(nn.Module):
    """A timm backbone's pooled image features and an MLP embedding of the encoded metadata,
    concatenated, then a linear classifier. `forward(images, metadata)`; Grad-CAM hooks the
    feature map between `forward_features` and `forward_head`, as for an image-only model."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, hidden: int = HIDDEN):
        super().__init__()
        backbone.reset_classifier(0)  # its own head would be an unused parameter (DDP refuses those)
        self.backbone = backbone
        self.pretrained_cfg = backbone.pretrained_cfg  # timm's data config (mean, std) is the backbone's
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.metadata = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(features + hidden, num_classes)  # nn.Linear's default start, as a new head's

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else ()
        return {f"backbone.{name}" for name in inner}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(features, pre_logits=True)
        embedded = self.metadata(metadata.to(pooled.dtype))
        return self.classifier(torch.cat([pooled, embedded], dim=1))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), metadata)


def fuse(backbone: nn.Module, encoding: Encoding | None, num_classes: int) -> nn.Module:
    """The backbone itself for an image-only model, else the fused model."""
    return backbone if encoding is None else FusedModel(backbone, encoding.width, num_classes)


# -- hmnist predict --metadata FILE.csv ------------------------------------------------------------

@dataclass
class MetadataFile:
    """A metadata CSV, read and checked: one row per image name, the fields under their
    HAM10000 names, values as the prepare stage writes them."""
    path: Path
    rows: pd.DataFrame  # indexed by image name (the file name without extension)
    notices: list[str]

    def for_images(self, names: list[str]) -> pd.DataFrame:
        return self.rows.loc[names]

    def check_covers(self, names: list[str]) -> list[str]:
        """An error unless every image has a row; the notice for rows that name no image."""
        absent = sorted(set(names) - set(self.rows.index))
        if absent:
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise UserError(f"--metadata {self.path} has no row for {len(absent)} of the {len(names)} image(s): "
                            f"{', '.join(absent[:5])}{more} (add a row per image, its fields empty where unknown)")
        extra = len(set(self.rows.index) - set(names))
        return [f"notice: {extra} row(s) of {self.path} name no input image: ignored"] if extra else []


def read_csv(path: str | Path) -> MetadataFile:
    """`path` read as a metadata CSV, or a one-line UserError naming what is wrong and where."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise UserError(f"--metadata {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --metadata {path}: {getattr(e, 'strerror', None) or e}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"--metadata {path} is not a readable CSV file: {str(e).strip().splitlines()[0]}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    ids = [c for c in IMAGE_COLUMNS if c in frame.columns]
    if len(ids) != 1:
        has = f"several ({', '.join(ids)}): keep one" if ids else f"none (has {', '.join(frame.columns)})"
        raise UserError(f"--metadata {path} needs one image column ({', '.join(IMAGE_COLUMNS)}), naming each row's "
                        f"image file without its extension; it has {has}")
    rows = pd.DataFrame({"image": frame[ids[0]].str.strip()})
    empty = np.flatnonzero(rows["image"] == "")
    if len(empty):
        raise UserError(f"--metadata {path} line {empty[0] + 2} has no image name")
    repeated = sorted(rows["image"][rows["image"].duplicated()].unique())
    if repeated:
        raise UserError(f"--metadata {path} lists {len(repeated)} image(s) more than once: {', '.join(repeated[:5])}")
    notices, found = [], 0
    for name, columns in FIELD_COLUMNS.items():
        present = [c for c in columns if c in frame.columns]
        if len(present) > 1:
            raise UserError(f"--metadata {path} gives a field twice, as {present[0]} and {present[1]}: keep one column for {name}")
        if not present:
            continue
        found += 1
        values = frame[present[0]].str.strip()
        if name == "age":
            rows["age"] = _checked_ages(values, path, present[0])
        else:
            rows[name], unmapped = _mapped(values, name)
            if unmapped:
                shown = ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(unmapped.items())[:5])
                notices.append(f"notice: {path}: {name} value(s) {shown} read as unknown (docs/workflow.md#metadata)")
    if not found:
        names = ", ".join(" or ".join(c[:2]) for c in FIELD_COLUMNS.values())
        raise UserError(f"--metadata {path} has no metadata column: it needs one or more of {names}")
    return MetadataFile(path, rows.set_index("image"), notices)


def _checked_ages(values: pd.Series, path: Path, column: str) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, text in enumerate(values):
        if text == "" or text.lower() in ("unknown", "nan", "na"):
            continue
        try:
            age = float(text)
        except ValueError:
            age = math.nan
        if not 0 <= age <= MAX_AGE:  # NaN fails this too
            raise UserError(f"--metadata {path} line {i + 2}: {column} {text!r} is not an age in years between 0 and "
                            f"{MAX_AGE} (leave it empty when unknown)")
        out[i] = age
    return out


def _mapped(values: pd.Series, name: str) -> tuple[list[str], dict[str, int]]:
    """Values under HAM10000's vocabulary (ISIC sites mapped), and the unrecognised ones, counted."""
    known = SEXES if name == "sex" else HAM_SITES
    out, unmapped = [], {}
    for value in values.str.lower():
        if name == "localization" and value in ISIC_SITES:
            value = ISIC_SITES[value]
        if value not in known and value not in ("", UNKNOWN):
            unmapped[value] = unmapped.get(value, 0) + 1
            value = UNKNOWN
        out.append(value or UNKNOWN)
    return out, unmapped
