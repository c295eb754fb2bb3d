"""One self-contained HTML page comparing runs: metrics with intervals, paired differences,
plots, and per-class galleries with class-activation maps.

    hmnist report A [B ...] [-o report.html] [--gallery 3]
    hmnist report A1,A2,A3 B1,B2,B3            (recipes: a recipe's runs, e.g. seeds, as one row)
    python -m hmnist.commands.report A B                (the same arguments)

A, B ... name runs as `hmnist compare` does (experiments, git revisions or branches,
`workspace`); comma-separated runs are one recipe, as in `hmnist compare A1,A2,A3 B1,B2,B3`.
Every picture is inline (PNG data URIs) and the page loads nothing else, no script, stylesheet
or font: it opens offline, from a USB stick. Top to bottom: one row per recipe (its model, the
params that differ, each headline metric with its 95% interval); each recipe after the first
against the first, computed by the code of `hmnist compare`; then per run its confusion matrix,
ROC, reliability diagram and training curves, per class the test images the model was most
confidently right and most confidently wrong about, each beside its Grad-CAM map (cam.py), and
its model card (export/MODEL_CARD.md, written by the export stage) embedded as its Markdown.

The page's HTML is report_page.py's, the gallery's images and maps gallery.py's, reading a run
runs.py's (`RunData`); this module gathers them and computes the intervals and differences.
"""
from __future__ import annotations

import logging
import argparse
import time
from pathlib import Path

import numpy as np

from hmnist.config import CLASS_COLUMNS, CLASS_INDEX, DEVICES
from hmnist.data import check_writable, write_whole
from hmnist.errors import MAX_SEED, at_least, cli, description
from hmnist.gallery import explain_run
from hmnist.report_page import HEADLINE, render
from hmnist.runs import RunData, check_same_test_set, parse_recipe

log = logging.getLogger("hmnist.commands.report")  # not __name__, which is "__main__" under -m


def recipe_row(runs: list[RunData], resamples: int, seed: int) -> dict[str, tuple]:
    """Each headline metric (value, low, high): metrics.json's for one run; for several, the
    mean over the runs and its two-level bootstrap interval (ECE: the mean, without one)."""
    from hmnist.bootstrap import recipe_intervals

    if len(runs) == 1:
        m = runs[0].metrics
        return {name: (m.get(name), m.get(f"{name}_low"), m.get(f"{name}_high")) for name in HEADLINE}
    first = runs[0].predictions
    labels = first["dx"].map(CLASS_INDEX).to_numpy()
    out = recipe_intervals(labels, [r.predictions[CLASS_COLUMNS].to_numpy(float) for r in runs],
                           first["lesion_id"].to_numpy(), resamples, seed)
    eces = [r.metrics.get("ece") for r in runs]
    out["ece"] = (float(np.mean(eces)) if None not in eces else None, None, None)
    return out


def report(recipes: list[list[str]], repo: str = ".", per_kind: int = 3, resamples: int = 2000, seed: int = 0,
           device: str = "auto", progress: bool = False) -> str:
    """The report's HTML for `recipes` (each a list of run names)."""
    from hmnist.bootstrap import compare_runs

    started = time.perf_counter()
    data = [[RunData(spec, repo) for spec in specs] for specs in recipes]
    first = data[0][0]
    for recipe in data:
        for run in recipe:
            check_same_test_set(first.predictions, run.predictions, first.spec, run.spec)
    names = [",".join(specs) for specs in recipes]
    rows = [recipe_row(recipe, resamples, seed) for recipe in data]
    comparisons = [compare_runs([r.predictions for r in data[0]], [r.predictions for r in recipe], resamples, seed)
                   for recipe in data[1:]]
    galleries = {}
    for recipe in data:
        for run in recipe:
            if run.spec not in galleries:
                if progress:
                    log.info(f"maps of {run.spec} ({time.perf_counter() - started:.0f} s)")
                galleries[run.spec] = explain_run(run, per_kind, device)
    return render(data, names, comparisons, galleries, rows, per_kind)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="+", metavar="RUN",
                        help="experiment, git revision, branch or `workspace`; several comma-separated (A1,A2,A3) "
                             "are one recipe's runs, shown as one row")
    parser.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default: %(default)s)")
    parser.add_argument("--gallery", type=at_least(0), default=3,
                        help="per class, how many right and how many wrong test images (default: %(default)s)")
    parser.add_argument("--resamples", type=at_least(100), default=2000,
                        help="lesion resamples of the intervals (default: %(default)s)")
    parser.add_argument("--seed", type=at_least(0, MAX_SEED), default=0,
                        help=f"the resampling seed, 0 to {MAX_SEED} (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the class-activation maps are computed (default: %(default)s)")
    parser.add_argument("--repo", default=".", help="the DVC project whose revisions the runs name (default: .)")


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    recipes = [parse_recipe(text) for text in args.recipes]
    check_writable(Path(args.out), "report.html")  # before minutes of reading runs and computing maps
    page = report(recipes, args.repo, args.gallery, args.resamples, args.seed, args.device, progress=True)
    path = Path(args.out)
    write_whole(path, lambda partial: partial.write_text(page, encoding="utf-8"))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {sum(map(len, recipes))} run(s)) in "
          f"{time.perf_counter() - started:.0f} s")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hmnist.commands.report", description=description(__doc__))
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
