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
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hmnist.config import CLASS_COLUMNS, CLASS_INDEX, CLASSES, DEVICES
from hmnist.data import check_writable, write_whole
from hmnist.errors import MAX_SEED, UserError, at_least, cli, description
from hmnist.runs import (CHECKPOINT, IMAGES, INDEX, Run, check_same_test_set, number, parse_recipe, pull_hint,
                         run_predictions)

if TYPE_CHECKING:
    import pandas as pd

# metrics.INTERVAL_METRICS and the ECE (metrics.py imports sklearn: not at `hmnist --help`)
HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity", "ece")
# the evaluate and train stages' pictures, in the order a reader looks at them
PLOTS = {"confusion matrix": "plots/confusion_matrix.png", "ROC": "plots/roc.png",
         "reliability": "plots/reliability.png", "training curves": "plots/training_curves.png"}
MODEL_CARD = "export/MODEL_CARD.md"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: .5em 1em; }
.plots figure { margin: 0; }
.plots img { height: 300px; width: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: .4em 1em; margin-bottom: 1em; align-items: flex-start; }
.gallery .kind { flex-basis: 100%; margin: .3em 0 0; font-weight: 600; }
.example { margin: 0; font-size: 12px; width: 232px; }
.example img { width: 112px; height: 112px; margin-right: 2px; image-rendering: auto; }
.wrong figcaption { color: #b00; }
.note { color: #555; }
details.card pre { white-space: pre-wrap; font-size: 12px; background: #f7f7f7; padding: .5em; }
"""


class RunData:
    """What the report shows of one run, read once."""

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


def differing_params(runs: list[RunData]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in runs}) > 1]


# -- the gallery ---------------------------------------------------------------------------------

def gallery_rows(frame: pd.DataFrame, per_kind: int) -> dict[str, dict[str, list[int]]]:
    """Per true class, the rows of the `per_kind` most confident right predictions and the
    `per_kind` most confident wrong ones (a true `mel` called something else: what it missed)."""
    probs = frame[CLASS_COLUMNS].to_numpy(float)
    predicted, truth = probs.argmax(1), frame["dx"].map(CLASS_INDEX).to_numpy()
    confidence = probs.max(1)
    out = {}
    for i, name in enumerate(CLASSES):
        right = np.flatnonzero((truth == i) & (predicted == i))
        wrong = np.flatnonzero((truth == i) & (predicted != i))
        out[name] = {kind: rows[np.argsort(-confidence[rows], kind="stable")][:per_kind].tolist()
                     for kind, rows in (("right", right), ("wrong", wrong))}
    return out


def explain_run(data: RunData, per_kind: int, device_name: str) -> dict[str, dict[str, list[dict]]]:
    """The gallery of one run: per class and kind, each example's image, map overlay and caption."""
    import pandas as pd
    import torch

    from hmnist.cam import class_maps, overlay
    from hmnist.engine import resolve_device
    from hmnist.fusion import encoded_for
    from hmnist.inference import inference_model
    from hmnist.models import load_checkpoint

    frame = data.predictions
    chosen = gallery_rows(frame, per_kind)
    rows = sorted({r for kinds in chosen.values() for rs in kinds.values() for r in rs})
    if not rows:
        return {name: {"right": [], "wrong": []} for name in CLASSES}
    index = pd.read_csv(data.run.local_file(INDEX), dtype={"image_id": str})
    images = np.load(data.run.local_file(IMAGES), mmap_mode="r")
    position = pd.Series(np.arange(len(index)), index=index["image_id"])
    wanted = frame["image"].iloc[rows]
    absent = sorted(set(wanted) - set(position.index))
    if absent:
        raise UserError(f"{data.spec}: test image {absent[0]} is not in its prepared cache ({INDEX}): "
                        f"{pull_hint(data.spec)}")
    pixels = torch.from_numpy(np.array(images[position[wanted].to_numpy()]))
    try:
        checkpoint = load_checkpoint(data.checkpoint)
    except UserError as e:
        raise UserError(f"{data.spec}'s {CHECKPOINT}: {e}") from None
    device = resolve_device(device_name, setting="--device")
    model, model_input = inference_model(checkpoint, device)
    probs = frame[CLASS_COLUMNS].to_numpy(float)[rows]
    # a metadata model's map: its image part, with each image's metadata as its evaluation read it
    removed = [f for f in str(data.metrics.get("metadata_removed", "none")).split(",") if f != "none"]
    metadata = encoded_for(checkpoint, index.iloc[position[wanted].to_numpy()], len(rows), removed)
    maps = class_maps(model, model_input, pixels, probs.argmax(1), metadata=metadata)
    cards = {}
    for row, image, heat, p in zip(rows, pixels.numpy(), maps, probs):
        predicted = CLASSES[int(p.argmax())]
        cards[row] = {"image": image, "overlay": overlay(image, heat), "name": frame["image"].iloc[row],
                      "true": frame["dx"].iloc[row], "predicted": predicted, "probability": float(p.max())}
    return {name: {kind: [cards[r] for r in rs] for kind, rs in kinds.items()} for name, kinds in chosen.items()}


# -- HTML ----------------------------------------------------------------------------------------

def png_uri(data: bytes | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(data).save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _with_interval(value, low, high, sign: str = "") -> str:
    if low is None or high is None:
        return number(value, sign)
    return f"{number(value, sign)} [{number(low, sign)}, {number(high, sign)}]"


def recipe_row(runs: list[RunData], resamples: int, seed: int) -> dict[str, tuple]:
    """Each headline metric (value, low, high): metrics.json's for one run; for several, the
    mean over the runs and its two-level bootstrap interval (ECE: the mean, without one)."""
    from hmnist.metrics import recipe_intervals

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


def used_metadata(metrics: dict[str, Any]) -> str:
    """What a run's model read beside the image, as the runs table says it ("" for an image-only model)."""
    if "metadata" not in metrics:
        return ""
    removed = metrics.get("metadata_removed", "none")
    return (f" with patient metadata ({metrics['metadata']}"
            + (f"; evaluated with {removed} removed" if removed != "none" else "") + ")")


def calibration_section(runs: list[RunData]) -> list[str]:
    """Each run's calibration (test ECE and Brier of its own and its calibrated probabilities)
    and operating points (test sensitivity and specificity at the threshold chosen on
    validation), as its metrics.json holds them; n/a for a run from before either."""
    e = html.escape
    points = list(dict.fromkeys(name for r in runs for name in (r.metrics.get("operating_points") or {})))
    out = ['<h2 id="operating-points">Calibration and operating points</h2>',
           '<p class="note">Test split. ECE and Brier: the model\'s own probabilities, then calibrated (fitted on '
           "validation). Each operating point flags an image when the calibrated probability of its classes reaches "
           "the threshold chosen on validation for its target sensitivity; here what that threshold reaches on test, "
           "with 95% lesion-bootstrap intervals.</p>",
           '<table class="operating-points"><tr><th>run</th><th>calibration</th><th>ECE</th><th>Brier</th>',
           *[f"<th>{e(name)}: sensitivity</th><th>{e(name)}: specificity</th>" for name in points], "</tr>"]
    for r in runs:
        m, ops = r.metrics, r.metrics.get("operating_points") or {}
        cells = [m.get("calibration", "n/a"),
                 *(f"{number(m.get(f'{k}_uncalibrated'))} &rarr; {_with_interval(m.get(k), m.get(f'{k}_low'), m.get(f'{k}_high'))}"
                   for k in ("ece", "brier"))]
        for name in points:
            op = ops.get(name, {})
            cells += [_with_interval(op.get(k), op.get(f"{k}_low"), op.get(f"{k}_high")) for k in ("sensitivity", "specificity")]
        out.append(f'<tr class="operating-point"><td>{e(r.spec)}</td><td>{e(str(cells[0]))}</td>'
                   + "".join(f'<td class="num">{c}</td>' for c in cells[1:]) + "</tr>")
    out.append("</table>")
    return out


def render(recipes: list[list[RunData]], names: list[str], comparisons: list[dict], galleries: dict[str, dict],
           rows: list[dict[str, tuple]], per_kind: int) -> str:
    e = html.escape
    all_runs = [r for recipe in recipes for r in recipe]
    differ = differing_params(all_runs)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>hmnist report: {e(' vs '.join(names))}</title><style>{STYLE}</style></head><body>",
           f"<h1>hmnist report: {e(' vs '.join(names))}</h1>",
           f'<p class="note">{len(all_runs[0].predictions)} test images. Intervals: 95%, lesion bootstrap '
           "(several runs per recipe: seeds and lesions). Made by <code>hmnist report</code>.</p>",
           '<h2 id="runs">Runs</h2><table class="runs"><tr><th>recipe</th><th>model</th>',
           *[f"<th>{e(k)}</th>" for k in differ], *[f"<th>{e(m)}</th>" for m in HEADLINE], "</tr>"]
    for name, recipe, row in zip(names, recipes, rows):
        models = sorted({f"{r.metrics.get('model', '?')} ({r.metrics.get('arch', '?')}){used_metadata(r.metrics)}"
                         for r in recipe})
        params = ["/".join(sorted({json.dumps(r.params.get(k)) for r in recipe})) for k in differ]
        out.append(f'<tr class="recipe"><td>{e(name)}</td><td>{e(", ".join(models))}</td>'
                   + "".join(f"<td>{e(p)}</td>" for p in params)
                   + "".join(f'<td class="num">{_with_interval(*row[m])}</td>' for m in HEADLINE) + "</tr>")
    out.append("</table>")
    out += calibration_section(list({r.spec: r for r in all_runs}.values()))
    if comparisons:
        out.append('<h2 id="differences">Paired differences (B - A, as <code>hmnist compare</code>)</h2>')
    for name, result in zip(names[1:], comparisons):
        out.append(f'<h3>A = {e(names[0])}, B = {e(name)}</h3><p class="note">{e(result["note"])}</p>'
                   '<table class="comparison"><tr><th>metric</th><th>A</th><th>B</th><th>B - A</th>'
                   "<th>95% interval</th><th>verdict</th></tr>")
        for metric, r in result["metrics"].items():
            out.append(f'<tr class="verdict" data-metric="{e(metric)}"><td>{e(metric)}</td>'
                       f'<td class="num">{number(r["a"])}</td><td class="num">{number(r["b"])}</td>'
                       f'<td class="num">{number(r["difference"], "+")}</td>'
                       f'<td class="num">[{number(r["low"], "+")}, {number(r["high"], "+")}]</td>'
                       f'<td class="verdict">{e(r["verdict"])}</td></tr>')
        out.append("</table>")
    unique = list({r.spec: r for r in all_runs}.values())  # a run named in two recipes: one section
    for position, data in enumerate(unique):
        out.append(f'<section class="run" id="run-{position}"><h2>Run {e(data.spec)}</h2><div class="plots">')
        for title, png in data.plots.items():
            body = (f'<img alt="{e(title)} of {e(data.spec)}" src="{png_uri(png)}">' if png is not None
                    else f'<p class="note">no {e(PLOTS[title])} in this run</p>')
            out.append(f"<figure>{body}<figcaption>{e(title)}</figcaption></figure>")
        out.append(f'</div><h3>Gallery: per true class, the {per_kind} most confident right and wrong '
                   "predictions, each beside its Grad-CAM map for the predicted class (red: most evidence for it)</h3>")
        if "metadata" in data.metrics:
            out.append(f'<p class="note metadata">This model also read each image\'s patient metadata '
                       f"({e(data.metrics['metadata'])}): the maps show where in the image it found evidence, "
                       "with the metadata held as it was; they cannot show what the metadata added.</p>")
        for name, kinds in galleries[data.spec].items():
            out.append(f'<h4>{e(name.upper())}</h4><div class="gallery" data-class="{e(name)}">')
            for kind in ("right", "wrong"):
                if kinds[kind]:
                    out.append(f'<p class="kind">{"right" if kind == "right" else "wrong (missed)"}</p>')
                for card in kinds[kind]:
                    out.append(
                        f'<figure class="example {kind}"><img alt="{e(card["name"])}" src="{png_uri(card["image"])}">'
                        f'<img alt="Grad-CAM of {e(card["name"])}" src="{png_uri(card["overlay"])}">'
                        f'<figcaption>{e(card["name"])}: true {e(card["true"].upper())}, predicted '
                        f'{e(card["predicted"].upper())}, p = {card["probability"]:.2f}</figcaption></figure>')
            if not kinds["right"] and not kinds["wrong"]:
                out.append('<p class="note">no test images of this class</p>')
            out.append("</div>")
        # the card's Markdown as it is (a Markdown renderer would be a dependency for one section;
        # the text reads as it is, tables included)
        out.append(f'<details class="card"><summary>Model card ({e(MODEL_CARD)})</summary><pre>{e(data.card)}</pre>'
                   "</details>" if data.card is not None else
                   f'<p class="note">no {e(MODEL_CARD)} in this run (the export stage writes it)</p>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def report(recipes: list[list[str]], repo: str = ".", per_kind: int = 3, resamples: int = 2000, seed: int = 0,
           device: str = "auto", progress: bool = False) -> str:
    """The report's HTML for `recipes` (each a list of run names)."""
    from hmnist.metrics import compare_runs

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
                    print(f"maps of {run.spec} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
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
