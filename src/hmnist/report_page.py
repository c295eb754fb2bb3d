"""The HTML of `hmnist report`: one self-contained page, every picture inline (PNG data URIs),
no script, stylesheet or font to load, so it opens offline.

Top to bottom: the runs table (one row per recipe), calibration and operating points, the
paired differences against the first recipe, then one section per run (plots, the gallery of
class-activation maps, the model card).
"""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

from hmnist.runs import MODEL_CARD, PLOTS, RunData, number

# bootstrap.INTERVAL_METRICS and the ECE (bootstrap.py imports threadpoolctl, metrics.py sklearn: not at `hmnist --help`)
HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity", "ece")
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


def render(recipes: list[list[RunData]], names: list[str], comparisons: list[dict], galleries: dict[str, dict],
           rows: list[dict[str, tuple]], per_kind: int) -> str:
    """The page: `rows` are the recipes' headline metrics (value, low, high), `comparisons` each
    later recipe against the first (bootstrap.compare_runs), `galleries` each run's (gallery.py)."""
    e = html.escape
    all_runs = [r for recipe in recipes for r in recipe]
    unique = list({r.spec: r for r in all_runs}.values())  # a run named in two recipes: one section
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>hmnist report: {e(' vs '.join(names))}</title><style>{STYLE}</style></head><body>",
           f"<h1>hmnist report: {e(' vs '.join(names))}</h1>",
           f'<p class="note">{len(all_runs[0].predictions)} test images. Intervals: 95%, lesion bootstrap '
           "(several runs per recipe: seeds and lesions). Made by <code>hmnist report</code>.</p>"]
    out += runs_table(recipes, names, rows, differing_params(all_runs))
    out += calibration_section(unique)
    out += differences_section(names, comparisons)
    for position, data in enumerate(unique):
        out += run_section(data, position, galleries[data.spec], per_kind)
    out.append("</body></html>")
    return "\n".join(out)


def differing_params(runs: list[RunData]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in runs}) > 1]


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


def used_metadata(metrics: dict[str, Any]) -> str:
    """What a run's model read beside the image, as the runs table says it ("" for an image-only model)."""
    if "metadata" not in metrics:
        return ""
    removed = metrics.get("metadata_removed", "none")
    return (f" with patient metadata ({metrics['metadata']}"
            + (f"; evaluated with {removed} removed" if removed != "none" else "") + ")")


def runs_table(recipes: list[list[RunData]], names: list[str], rows: list[dict[str, tuple]],
               differ: list[str]) -> list[str]:
    """One row per recipe: its models, the params in `differ`, each headline metric with its interval."""
    e = html.escape
    out = ['<h2 id="runs">Runs</h2><table class="runs"><tr><th>recipe</th><th>model</th>',
           *[f"<th>{e(k)}</th>" for k in differ], *[f"<th>{e(m)}</th>" for m in HEADLINE], "</tr>"]
    for name, recipe, row in zip(names, recipes, rows):
        models = sorted({f"{r.metrics.get('model', '?')} ({r.metrics.get('arch', '?')}){used_metadata(r.metrics)}"
                         for r in recipe})
        params = ["/".join(sorted({json.dumps(r.params.get(k)) for r in recipe})) for k in differ]
        out.append(f'<tr class="recipe"><td>{e(name)}</td><td>{e(", ".join(models))}</td>'
                   + "".join(f"<td>{e(p)}</td>" for p in params)
                   + "".join(f'<td class="num">{_with_interval(*row[m])}</td>' for m in HEADLINE) + "</tr>")
    out.append("</table>")
    return out


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


def differences_section(names: list[str], comparisons: list[dict]) -> list[str]:
    """Each later recipe (B) against the first (A), as `hmnist compare` shows it."""
    e = html.escape
    out = []
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
    return out


def run_section(data: RunData, position: int, gallery: dict[str, dict], per_kind: int) -> list[str]:
    """One run's plots, its gallery (per class and kind, gallery.py's examples) and its model card."""
    e = html.escape
    out = [f'<section class="run" id="run-{position}"><h2>Run {e(data.spec)}</h2><div class="plots">']
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
    for name, kinds in gallery.items():
        out += class_gallery(name, kinds)
    # the card's Markdown as it is (a Markdown renderer would be a dependency for one section;
    # the text reads as it is, tables included)
    out.append(f'<details class="card"><summary>Model card ({e(MODEL_CARD)})</summary><pre>{e(data.card)}</pre>'
               "</details>" if data.card is not None else
               f'<p class="note">no {e(MODEL_CARD)} in this run (the export stage writes it)</p>')
    out.append("</section>")
    return out


def class_gallery(name: str, kinds: dict[str, list[dict]]) -> list[str]:
    """One true class's examples, right then wrong, each image beside its map."""
    e = html.escape
    out = [f'<h4>{e(name.upper())}</h4><div class="gallery" data-class="{e(name)}">']
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
    return out
