"""Compare two runs on the same test images: B - A per metric with a 95% paired bootstrap interval.

    hmnist compare A B [--json] [--resamples 2000] [--seed 0]
    python -m hmnist.compare A B                          (the same arguments)

A and B are experiment names, git revisions or branches (as `dvc metrics diff` takes them),
`workspace` (the files in the working tree), or paths to predictions CSV files in the layout
of predictions/test.csv (image, MEL ... VASC, lesion_id, dx), e.g. saved by a benchmark script.
A run's predictions are read through DVC (`dvc.api.read` at the run's commit), so an experiment
pulled with `dvc exp pull` compares without checking it out.

Both runs are scored on the same resamples of the test lesions. The interval is where B - A
would fall for 95% of the test sets the split could have drawn: if it excludes 0, the
difference is larger than the test set's sampling noise; if it includes 0, the test set cannot
tell the two apart (which is not a proof that they are equal).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hmnist.config import CLASSES
from hmnist.errors import UserError, cli, first_line

if TYPE_CHECKING:
    import pandas as pd

PREDICTIONS = "predictions/test.csv"  # data.PREDICTIONS, as the path inside a revision
SPLIT = "data/split.csv"
WORKSPACE = "workspace"
PROB_COLUMNS = [c.upper() for c in CLASSES]


def read_run(spec: str, repo: str = ".") -> pd.DataFrame:
    """A run's test predictions with their truth: image, MEL ... VASC, lesion_id, dx."""
    import pandas as pd

    path = Path(spec)
    if spec == WORKSPACE:
        path = Path(repo) / PREDICTIONS
        if not path.is_file():
            raise UserError(f"the workspace has no {PREDICTIONS}: run `dvc repro` first")
    if spec.lower().endswith(".csv") and not path.is_file():
        raise UserError(f"{spec}: no such predictions file")
    if path.is_file():
        frame = _read_csv(path.read_text(), spec)
        if "dx" not in frame.columns and spec == WORKSPACE and (Path(repo) / SPLIT).is_file():
            frame = _with_truth(frame, _read_csv((Path(repo) / SPLIT).read_text(), SPLIT), spec)
    else:
        text, split_text = _read_at_revision(spec, repo)
        frame = _read_csv(text, spec)
        if "dx" not in frame.columns and split_text is not None:  # predictions of an older evaluate stage
            frame = _with_truth(frame, _read_csv(split_text, f"{SPLIT} of {spec}"), spec)
    missing = [c for c in ["image", *PROB_COLUMNS, "dx"] if c not in frame.columns]
    if missing:
        raise UserError(f"{spec}: predictions lack column(s) {', '.join(missing)}: need image, "
                        f"{', '.join(PROB_COLUMNS)} and dx, the true class (as predictions/test.csv has)")
    unknown = sorted(set(frame["dx"]) - set(CLASSES))
    if unknown:
        raise UserError(f"{spec}: unknown dx label(s) {', '.join(map(str, unknown[:5]))}; known: {', '.join(CLASSES)}")
    if not frame["image"].is_unique:
        raise UserError(f"{spec}: image {frame['image'][frame['image'].duplicated()].iloc[0]} is listed twice")
    if "lesion_id" not in frame.columns:
        print(f"notice: {spec} has no lesion_id column: resampling images, not lesions (the intervals come out "
              "too narrow when a lesion has several images)", file=sys.stderr)
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


def _read_at_revision(rev: str, repo: str) -> tuple[str, str | None]:
    """predictions/test.csv (and data/split.csv, if there) at an experiment, branch or commit."""
    import dvc.api
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import RevError, resolve_rev

    try:
        with Repo(repo) as project:
            # resolve_rev knows experiment names as `dvc exp show` lists them, besides git's revisions
            commit = resolve_rev(project.scm, rev)
    except NotDvcRepoError:
        raise UserError(f"'{rev}' is not a file, and {Path(repo).resolve()} is not a DVC project to look up "
                        "revisions in") from None
    except (RevError, DvcException) as e:
        raise UserError(f"'{rev}' is not an experiment, git revision, branch or predictions CSV file "
                        f"({first_line(e)})") from None

    def read(path: str) -> str:
        return dvc.api.read(path, repo=repo, rev=commit)

    try:
        text = read(PREDICTIONS)
    except (FileNotFoundError, DvcException) as e:
        raise UserError(f"{rev} has no {PREDICTIONS} (or its cached copy is missing; `dvc pull` or "
                        f"`dvc exp pull` it): {first_line(e)}") from None
    try:
        split_text = read(SPLIT)
    except (FileNotFoundError, DvcException):
        split_text = None
    return text, split_text


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


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "B better"
    if high < 0:
        return "A better"
    if low <= 0 <= high:
        return "no detectable difference"
    return "undefined"  # NaN: the metric is undefined on this test set


def compare(a: pd.DataFrame, b: pd.DataFrame, resamples: int = 2000, seed: int = 0) -> dict:
    import numpy as np

    from hmnist.metrics import paired_bootstrap

    labels = a["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    rows = paired_bootstrap(labels, a[PROB_COLUMNS].to_numpy(float), b[PROB_COLUMNS].to_numpy(float),
                            a["lesion_id"].to_numpy(), resamples, seed)
    for name, row in rows.items():
        row["verdict"] = verdict(row["low"], row["high"])
        # NaN (a metric undefined on these images, e.g. no AUC without negatives) is not JSON
        rows[name] = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}
    return {"images": len(a), "lesions": int(np.unique(a["lesion_id"]).size), "resamples": resamples,
            "seed": seed, "metrics": rows}


def format_table(result: dict, name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}, B = {name_b}: {result['images']} test images of {result['lesions']} lesions, "
             f"{result['resamples']} paired lesion resamples",
             f"{'metric':<22}{'A':>8}{'B':>8}{'B - A':>9}  {'95% interval':<20}  verdict"]
    def number(value: float | None, sign: str = "") -> str:
        return "n/a" if value is None else f"{value:{sign}.4f}"

    for name, r in result["metrics"].items():
        interval = f"[{number(r['low'], '+')}, {number(r['high'], '+')}]"
        lines.append(f"{name:<22}{number(r['a']):>8}{number(r['b']):>8}{number(r['difference'], '+'):>9}  "
                     f"{interval:<20}  {r['verdict']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="experiment, git revision, branch, `workspace`, or predictions CSV file")
    parser.add_argument("b", metavar="B", help="the same for the run compared with A (differences are B - A)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, for scripts")
    parser.add_argument("--resamples", type=_resamples, default=2000,
                        help="paired lesion resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the resampling seed (default: %(default)s)")
    parser.add_argument("--repo", default=".", help="the DVC project whose revisions A and B name (default: .)")


def run(args: argparse.Namespace) -> None:
    a, b = read_run(args.a, args.repo), read_run(args.b, args.repo)
    check_same_test_set(a, b, args.a, args.b)
    result = compare(a, b, args.resamples, args.seed)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(format_table(result, args.a, args.b))


def _resamples(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 100:
        raise argparse.ArgumentTypeError(f"must be at least 100, got {value}")
    return value


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hmnist.compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
