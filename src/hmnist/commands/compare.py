"""Compare two runs, or two recipes' runs, on the same test images: B - A per metric with a 95%
paired bootstrap interval.

    hmnist compare A B [--json] [--resamples 2000] [--seed 0]
    hmnist compare A1,A2,A3 B1,B2,B3                      (recipes: several runs, e.g. seeds, per side)
    hmnist compare A B --oof                              (on out-of-fold predictions: runs with cv.folds K)
    python -m hmnist.commands.compare A B                          (the same arguments)

A and B are experiment names, git revisions or branches (as `dvc metrics diff` takes them),
`workspace` (the files in the working tree), or paths to predictions CSV files in the layout
of predictions/test.csv (image, MEL ... VASC, lesion_id, dx), e.g. saved by a benchmark script.
A run's predictions are read through DVC (`dvc.api.read` at the run's commit), so an experiment
pulled with `dvc exp pull` compares without checking it out.

Both runs are scored on the same resamples of the test lesions. The interval is where B - A
would fall for 95% of the test sets the split could have drawn: if it excludes 0, the
difference is larger than the test set's sampling noise; if it includes 0, the test set cannot
tell the two apart (which is not a proof that they are equal). With one run per side that is
a verdict on these two trained models, not on their recipes: another seed of either can land
elsewhere. With several runs per side (comma-separated), each side is the mean of its runs and
every resample also redraws each side's runs (a two-level bootstrap: seeds and lesions), so the
verdict is about the recipes.

Runs whose evaluate stage reported operating points (train.operating_points) are also compared
on each point both have: the test sensitivity and specificity each reaches at its own threshold,
chosen on its validation split for the same target sensitivity (docs/metrics.md).

`--oof` compares two cross-validated runs (cv.folds K >= 2) on their out-of-fold predictions
(predictions/oof.csv: every non-test image, predicted by the fold that held it out) instead of
the test split: about 5,000 images with ~45 dermatofibromas where the test split has ~900 with 9,
so a recipe choice is not decided by a handful of test images, and the test split stays untouched
for the final figure. Both runs need the same split and folds (split.seed, cv.folds); operating
points are not compared there (their thresholds were chosen on those same images).
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from hmnist.config import CLASS_COLUMNS
from hmnist.errors import MAX_SEED, at_least, cli, description
from hmnist.runs import (OOF, PREDICTIONS, check_same_test_set, number, parse_recipe, read_operating_points,
                         read_recipe)

if TYPE_CHECKING:
    import pandas as pd


def compare(a: pd.DataFrame | list[pd.DataFrame], b: pd.DataFrame | list[pd.DataFrame], resamples: int = 2000,
            seed: int = 0) -> dict:
    """bootstrap.compare_runs for one run (a frame) or several (a list) per side."""
    from hmnist.bootstrap import compare_runs  # with pandas: seconds that `hmnist --help` should not wait

    return compare_runs(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], resamples, seed)


def operating_points(specs_a: list[str], specs_b: list[str], predictions: pd.DataFrame, repo: str,
                     resamples: int, seed: int) -> dict:
    """bootstrap.compare_operating_points for the points (same name, classes and target) every
    run has; {} when a run has none (a CSV file, or a run from before operating points)."""
    from hmnist.bootstrap import compare_operating_points
    from hmnist.calibration import flag_scores
    from hmnist.config import CLASS_INDEX

    sides = [[read_operating_points(spec, repo) for spec in specs] for specs in (specs_a, specs_b)]
    runs = [r for side in sides for r in side]
    if any(r is None or r[1]["image"].tolist() != predictions["image"].tolist() for r in runs):
        return {}

    def key(op: dict) -> tuple:
        return tuple(op["classes"]), op["target_sensitivity"]

    first = runs[0][0]
    common = {name: op["classes"] for name, op in first.items()
              if all(name in points and key(points[name]) == key(op) for points, _ in runs)}
    if not common:
        return {}

    def flags(run: tuple[dict, pd.DataFrame]) -> dict:
        points, calibrated = run
        return {name: flag_scores(calibrated[CLASS_COLUMNS].to_numpy(float), classes) >= points[name]["threshold"]
                for name, classes in common.items()}

    labels = predictions["dx"].map(CLASS_INDEX).to_numpy()
    result = compare_operating_points(labels, predictions["lesion_id"].to_numpy(), common,
                                      [flags(r) for r in sides[0]], [flags(r) for r in sides[1]], resamples, seed)
    for name, row in result.items():
        row["target_sensitivity"] = first[name]["target_sensitivity"]
    return result


def format_table(result: dict, name_a: str, name_b: str, images: str = "test") -> str:
    lines = [f"A = {name_a}, B = {name_b}: {result['images']} {images} images of {result['lesions']} lesions, "
             f"{result['resamples']} paired lesion resamples",
             result["note"],
             f"{'metric':<22}{'A':>8}{'B':>8}{'B - A':>9}  {'95% interval':<20}  verdict"]
    for name, r in result["metrics"].items():
        interval = f"[{number(r['low'], '+')}, {number(r['high'], '+')}]"
        lines.append(f"{name:<22}{number(r['a']):>8}{number(r['b']):>8}{number(r['difference'], '+'):>9}  "
                     f"{interval:<20}  {r['verdict']}")
    if result.get("operating_points"):
        lines.append("operating points: each run at its own threshold for the target sensitivity, chosen on its "
                     "validation split")
        for name, op in result["operating_points"].items():
            for key in ("sensitivity", "specificity"):
                r = op[key]
                interval = f"[{number(r['low'], '+')}, {number(r['high'], '+')}]"
                lines.append(f"{name + ' ' + key[:4] + '.':<26}{number(r['a']):>8}{number(r['b']):>8}"
                             f"{number(r['difference'], '+'):>9}  {interval:<20}  {r['verdict']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="experiment, git revision, branch, `workspace`, or predictions CSV "
                                               "file; or several, comma-separated (A1,A2,A3): one recipe's runs")
    parser.add_argument("b", metavar="B", help="the same for the run(s) compared with A (differences are B - A)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON, for scripts")
    parser.add_argument("--resamples", type=at_least(100), default=2000,
                        help="paired lesion resamples (default: %(default)s)")
    parser.add_argument("--seed", type=at_least(0, MAX_SEED), default=0,
                        help=f"the resampling seed, 0 to {MAX_SEED} (default: %(default)s)")
    parser.add_argument("--oof", action="store_true",
                        help="compare out-of-fold predictions (runs trained with cv.folds >= 2) instead of the test split's")
    parser.add_argument("--repo", default=".", help="the DVC project whose revisions A and B name (default: .)")


def run(args: argparse.Namespace) -> None:
    specs_a, specs_b = parse_recipe(args.a), parse_recipe(args.b)
    predictions = OOF if args.oof else PREDICTIONS
    a, b = read_recipe(specs_a, args.repo, predictions), read_recipe(specs_b, args.repo, predictions)
    check_same_test_set(a[0], b[0], specs_a[0], specs_b[0])
    result = compare(a, b, args.resamples, args.seed)
    result["predictions"] = "out-of-fold" if args.oof else "test"
    result["operating_points"] = {} if args.oof else operating_points(specs_a, specs_b, a[0], args.repo,
                                                                        args.resamples, args.seed)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(format_table(result, args.a, args.b, result["predictions"]))


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hmnist.commands.compare", description=description(__doc__))
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
