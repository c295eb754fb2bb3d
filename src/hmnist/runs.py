"""Finished runs as the commands that look back at them read them: `hmnist compare` and
`hmnist report`.

A run is named as `dvc metrics diff` names one: an experiment, a git revision or branch, or
`workspace` (the files in the working tree); `hmnist compare` also takes a predictions CSV
file. Files at a revision are read through DVC: git-tracked ones (metrics, plots, params) from
the commit, DVC outputs (predictions, checkpoint, the prepared cache) from the DVC cache, so an
experiment pulled with `dvc exp pull` is read without checking it out.
"""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hmnist import data
from hmnist.config import CLASS_COLUMNS, CLASSES
from hmnist.errors import UserError, first_line

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pandas as pd

# the pipeline's files (hmnist.data) as paths inside a revision: strings, as DVC takes them
PREDICTIONS, CALIBRATED = data.PREDICTIONS.as_posix(), data.CALIBRATED_PREDICTIONS.as_posix()
OOF = data.OOF_PREDICTIONS.as_posix()  # out-of-fold: every non-test image, predicted by the fold that held it out
METRICS, SPLIT, CHECKPOINT = data.METRICS.as_posix(), data.SPLIT.as_posix(), data.CHECKPOINT.as_posix()
IMAGES, INDEX = (data.PREPARED / data.IMAGES_FILE).as_posix(), (data.PREPARED / data.INDEX_FILE).as_posix()
WORKSPACE = "workspace"
# the evaluate and train stages' pictures, in the order a reader looks at them (hmnist report)
PLOTS = {"confusion matrix": "plots/confusion_matrix.png", "ROC": "plots/roc.png",
         "reliability": "plots/reliability.png", "training curves": "plots/training_curves.png"}
MODEL_CARD = "export/MODEL_CARD.md"


def number(value: float | None, sign: str = "") -> str:
    """A figure as compare and report show it: 4 decimals (`sign` "+": signed), n/a when missing."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{sign}.4f}"


def pull_hint(spec: str) -> str:
    """How to get a run's DVC outputs that are not here (the run finished: its dvc.lock says so)."""
    if spec == WORKSPACE:
        return "`dvc pull` it, or run `dvc repro`"
    return f"`dvc exp pull origin {spec}` (an experiment) or `dvc pull` at it (a commit), or re-run its failed stage"


def never_ran(spec: str) -> str:
    """A revision with no run to pull: `dvc exp pull` cannot help, a run can. The README's own
    examples name `main`, which on a fresh clone is such a revision."""
    return (f"{spec} has no finished run: its dvc.lock records no evaluate stage (a fresh clone's main has none). "
            "Name experiments and compare those (`dvc exp run -n baseline`, `dvc exp run -n other -S ...`, "
            "`hmnist compare baseline other`), or commit a finished run first (`dvc repro`, then "
            "`git add -A && git commit`)")


class Run:
    """One run's files: the working tree's (`workspace`) or those of an experiment or revision."""

    def __init__(self, spec: str, repo: str = "."):
        self.spec, self.repo = spec, repo
        self.commit = None if spec == WORKSPACE else _resolve(spec, repo)
        self._fs = None

    def __repr__(self) -> str:
        return f"Run({self.spec!r})"

    def lock(self) -> dict:
        """The run's dvc.lock ({} if it has none): which stages finished there, with their outputs' hashes."""
        import yaml

        try:
            return yaml.safe_load(self.read("dvc.lock")) or {}
        except FileNotFoundError:
            return {}

    def check_finished(self) -> None:
        """A revision whose dvc.lock has no evaluate stage has nothing to read or pull: say so
        first, not that a file is missing."""
        if self.commit is not None and "evaluate" not in (self.lock().get("stages") or {}):
            raise UserError(never_ran(self.spec))

    def read(self, path: str, mode: str = "r") -> str | bytes:
        """A file of the run, git-tracked or a DVC output. FileNotFoundError if it has none."""
        if self.commit is None:
            file = Path(self.repo) / path
            if not file.is_file():
                raise FileNotFoundError(path)
            return file.read_text() if mode == "r" else file.read_bytes()
        from dvc.exceptions import DvcException

        if self._fs is None:  # one DVC file system per run: opening the repo at a commit takes a while
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(self.repo, rev=self.commit)
        try:
            return self._fs.read_text(path) if mode == "r" else self._fs.read_bytes(path)
        except (FileNotFoundError, DvcException) as e:
            raise FileNotFoundError(f"{path}: {first_line(e)}") from None

    def local_file(self, path: str) -> Path:
        """A DVC output of the run as a file on this disk, to memory-map or load: the working
        tree's, or its copy in the DVC cache (found through the revision's dvc.lock). A UserError
        saying how to get it when it is not here."""
        if self.commit is None:
            file = Path(self.repo) / path
            if file.is_file():
                return file
            raise UserError(f"{self.spec} has no {path}: {pull_hint(self.spec)}")
        self.check_finished()
        md5 = next((out.get("md5") for stage in (self.lock().get("stages") or {}).values()
                    for out in stage.get("outs", []) if out.get("path") == path), None)
        if md5 is None:
            raise UserError(f"{self.spec} has no {path} (its stage never finished there): {pull_hint(self.spec)}")
        from dvc.repo import Repo

        with Repo(self.repo) as project:
            cached = Path(project.cache.local.oid_to_path(md5))
        if cached.is_file():
            return cached
        workspace = Path(self.repo) / path
        if workspace.is_file() and _md5(workspace) == md5:  # cache cleaned (dvc gc), the file still checked out
            return workspace
        raise UserError(f"{self.spec}'s {path} is not in the DVC cache: {pull_hint(self.spec)}")


def _md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve(rev: str, repo: str) -> str:
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    try:
        with Repo(repo) as project:
            # resolve_rev knows experiment names as `dvc exp show` lists them, besides git's revisions
            return resolve_rev(project.scm, rev)
    except NotDvcRepoError:
        raise UserError(f"'{rev}' is not a file, and {Path(repo).resolve()} is not a DVC project to look up "
                        "revisions in") from None
    except (RevError, DvcException) as e:
        raise UserError(f"'{rev}' is not an experiment, git revision, branch or predictions CSV file "
                        f"({first_line(e)})") from None


def read_run(spec: str, repo: str = ".", predictions: str = PREDICTIONS) -> pd.DataFrame:
    """A run's test predictions (or, with `predictions=OOF`, its out-of-fold ones) with their
    truth: image, MEL ... VASC, lesion_id, dx."""
    path = Path(spec)
    if spec != WORKSPACE and (spec.lower().endswith(".csv") or path.is_file()):
        if not path.is_file():
            raise UserError(f"{spec}: no such predictions file")
        return checked_predictions(_read_csv(path.read_text(), spec), spec)
    return run_predictions(Run(spec, repo), predictions)


def run_predictions(run: Run, predictions: str = PREDICTIONS) -> pd.DataFrame:
    """read_run of a Run: its predictions/test.csv (or `predictions`), with the truth from
    data/split.csv for the predictions of an older evaluate stage (no dx column)."""
    run.check_finished()
    try:
        frame = _read_csv(run.read(predictions), run.spec)
    except FileNotFoundError as e:
        if predictions == OOF:
            raise UserError(f"{run.spec} has no {OOF}: its evaluate stage predates out-of-fold predictions "
                            "(re-run it with `dvc repro evaluate`)") from None
        if run.commit is None:
            raise UserError(f"the workspace has no {predictions}: {pull_hint(WORKSPACE)}") from None
        raise UserError(f"{run.spec} has no {predictions} (or its cached copy is missing; {pull_hint(run.spec)}): "
                        f"{first_line(e)}") from None
    if predictions == OOF and frame.empty:
        raise UserError(f"{run.spec} has no out-of-fold predictions: it was trained with cv.folds 1 "
                        "(set cv.folds to 2 or more, e.g. `dvc exp run -S cv.folds=5`)")
    if "dx" not in frame.columns:
        try:
            frame = _with_truth(frame, _read_csv(run.read(SPLIT), f"{SPLIT} of {run.spec}"), run.spec)
        except FileNotFoundError:
            pass
    return checked_predictions(frame, run.spec)


def checked_predictions(frame: pd.DataFrame, spec: str) -> pd.DataFrame:
    missing = [c for c in ["image", *CLASS_COLUMNS, "dx"] if c not in frame.columns]
    if missing:
        raise UserError(f"{spec}: predictions lack column(s) {', '.join(missing)}: need image, "
                        f"{', '.join(CLASS_COLUMNS)} and dx, the true class (as predictions/test.csv has)")
    unknown = sorted(set(frame["dx"]) - set(CLASSES))
    if unknown:
        raise UserError(f"{spec}: unknown dx label(s) {', '.join(map(str, unknown[:5]))}; known: {', '.join(CLASSES)}")
    if not frame["image"].is_unique:
        raise UserError(f"{spec}: image {frame['image'][frame['image'].duplicated()].iloc[0]} is listed twice")
    if "lesion_id" not in frame.columns:
        log.info(f"notice: {spec} has no lesion_id column: resampling images, not lesions (the intervals come out "
                 "too narrow when a lesion has several images)")
        frame = frame.assign(lesion_id=frame["image"])
    return frame.sort_values("image", kind="stable").reset_index(drop=True)


def _read_csv(text: str, where: str) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(io.StringIO(text), dtype={"image": str, "image_id": str, "lesion_id": str, "dx": str})
    except (ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{where} is not a readable CSV file: {first_line(e)}") from None


def _with_truth(frame: pd.DataFrame, split: pd.DataFrame, spec: str) -> pd.DataFrame:
    truth = split.set_index("image_id")[["lesion_id", "dx"]]
    if not set(frame["image"]) <= set(truth.index):
        raise UserError(f"{spec}: {PREDICTIONS} lists images that {SPLIT} does not")
    return frame.join(truth, on="image")


def read_operating_points(spec: str, repo: str = ".") -> tuple[dict[str, dict], pd.DataFrame] | None:
    """A run's operating points (metrics.json's, with their validation thresholds) and its
    calibrated test probabilities, sorted by image; None for a predictions CSV file or a run from
    before operating points."""
    import json

    if spec != WORKSPACE and (spec.lower().endswith(".csv") or Path(spec).is_file()):
        return None
    run = Run(spec, repo)
    try:
        points = json.loads(run.read(METRICS)).get("operating_points")
        calibrated = _read_csv(run.read(CALIBRATED), f"{CALIBRATED} of {spec}") if points else None
    except (FileNotFoundError, ValueError):
        return None
    if not points:
        return None
    return points, calibrated.sort_values("image", kind="stable").reset_index(drop=True)


def check_same_test_set(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> None:
    if a["image"].tolist() != b["image"].tolist():
        common = len(set(a["image"]) & set(b["image"]))
        raise UserError(f"{name_a} and {name_b} are not on the same test images ({len(a)} and {len(b)} images, "
                        f"{common} in common): compare runs made with the same split")
    for column in ("dx", "lesion_id"):
        differ = a[column] != b[column]
        if differ.any():
            raise UserError(f"{name_a} and {name_b} disagree on the {column} of image {a['image'][differ].iloc[0]}: "
                            "they come from different metadata")


def read_recipe(specs: list[str], repo: str = ".", predictions: str = PREDICTIONS) -> list[pd.DataFrame]:
    """The predictions of one recipe's runs (one or several training seeds), on one test set
    (or on the out-of-fold images, `predictions=OOF`)."""
    frames = [read_run(spec, repo, predictions) for spec in specs]
    for spec, frame in zip(specs[1:], frames[1:]):
        check_same_test_set(frames[0], frame, specs[0], spec)
    return frames


def parse_recipe(text: str) -> list[str]:
    """`A1,A2,A3` -> the runs of one recipe."""
    specs = [s.strip() for s in text.split(",")]
    if not all(specs):
        raise UserError(f"'{text}': an empty run name in the comma-separated list")
    if len(set(specs)) != len(specs):
        raise UserError(f"'{text}' names a run twice: a recipe's runs must be different runs (seeds)")
    return specs


class RunData:
    """What `hmnist report` shows of one run, read once: its predictions, metrics, params (flat),
    checkpoint, plots and model card."""

    def __init__(self, spec: str, repo: str):
        self.spec, self.run = spec, Run(spec, repo)
        self.predictions = run_predictions(self.run)  # the fix when absent is in its error
        self.metrics = json.loads(self._read("metrics/metrics.json"))
        self.params = _flat_params(self._read("params.yaml"))
        self.checkpoint = self.run.local_file(CHECKPOINT)  # a missing checkpoint fails here, before any work
        self.plots = {}
        for title, path in PLOTS.items():
            try:
                self.plots[title] = self.run.read(path, mode="rb")
            except FileNotFoundError:
                self.plots[title] = None
        try:
            self.card = self.run.read(MODEL_CARD)
        except FileNotFoundError:  # a run from before the export stage, or whose export failed
            self.card = None

    def _read(self, path: str) -> str:
        try:
            return self.run.read(path)
        except FileNotFoundError:
            raise UserError(f"{self.spec} has no {path}: {pull_hint(self.spec)}") from None


def _flat_params(text: str) -> dict[str, Any]:
    """params.yaml as dotted keys, with only the selected model's block (the others cannot matter)."""
    import yaml

    raw = yaml.safe_load(text) or {}
    models = raw.pop("models", {}) or {}
    selected = raw.get("model")
    flat: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(inner, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = value

    walk(raw, "")
    walk(models.get(selected, {}), "models.<model>")
    return flat
