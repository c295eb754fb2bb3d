"""Stage `export`: the trained model as ONNX (export/model.onnx) and its model card
(export/MODEL_CARD.md), what a user hands a colleague.

    python -m hmnist.stages.export    (params: cv.folds)

A stage, not an ad-hoc command: the ONNX file and the card are versioned with the run they
describe (an experiment's card is its own, `dvc exp apply` brings back both) and remade only
when the checkpoint, the metrics or this code change. It runs after evaluate because the card
reports evaluate's test metrics, and writes to export/, not models/: evaluate depends on the
whole models/ folder (a cross-validation run's fold checkpoints, which DVC cannot list), so a
file there made from evaluate's metrics would be a dependency cycle.

With cv.folds K the export holds the K fold models' ensemble, as evaluate measured it. The
ONNX graph is checked against PyTorch on test images before anything is written
(onnx_export.check): a wrong export fails the stage and leaves the old files alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from hmnist.card import model_card
from hmnist.config import load_params
from hmnist.data import METRICS, PREPARED, fold_paths, load_prepared, load_split, split_rows, write_whole
from hmnist.errors import UserError, cli
from hmnist.models import load_checkpoint
from hmnist.onnx_export import CHECK_IMAGES, OPSET, TOLERANCE, check, export

EXPORT = Path("export")
ONNX_FILE = EXPORT / "model.onnx"
CARD_FILE = EXPORT / "MODEL_CARD.md"


def read_metrics(checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics/metrics.json, checked to be evaluate's of these checkpoints."""
    try:
        metrics = json.loads(METRICS.read_text())
    except FileNotFoundError:
        raise UserError(f"{METRICS} not found: run `dvc repro evaluate` first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {METRICS}: {e}: run `dvc repro evaluate`") from None
    model, members = metrics.get("model"), metrics.get("ensemble_of", 1)
    if model != checkpoints[0]["model_name"] or members != len(checkpoints):
        raise UserError(f"{METRICS} is of {model} ({members} model(s)), the checkpoints of "
                        f"{checkpoints[0]['model_name']} ({len(checkpoints)}): run `dvc repro evaluate`")
    return metrics


@cli
def main() -> None:
    started = time.perf_counter()
    params = load_params()
    sources = [fold_paths(fold).checkpoint for fold in range(params.cv.folds)]
    checkpoints = [load_checkpoint(path) for path in sources]
    metrics = read_metrics(checkpoints)
    split = load_split()
    images, index = load_prepared(PREPARED)
    if int(images.shape[1]) != checkpoints[0]["prepare_size"]:
        raise UserError(f"the prepared cache is {images.shape[1]}px but the model was trained on "
                        f"{checkpoints[0]['prepare_size']}px: run `dvc repro`")
    rows = split_rows(index, split, "test")[:CHECK_IMAGES]

    data = export(checkpoints, [str(s) for s in sources])
    # a metadata model is checked with the test images' own fields (the prepared index's)
    worst = check(data, checkpoints, np.asarray(images[rows]), str(ONNX_FILE), index.iloc[rows])
    card = model_card(checkpoints, metrics, split, {"file": str(ONNX_FILE), "opset": OPSET, "tolerance": TOLERANCE,
                                                    "check_images": len(rows), "worst": worst})
    write_whole(ONNX_FILE, lambda partial: partial.write_bytes(data))
    write_whole(CARD_FILE, lambda partial: partial.write_text(card, encoding="utf-8"))
    what = f"{len(checkpoints)}-fold ensemble of " if len(checkpoints) > 1 else ""
    print(f"exported {what}{checkpoints[0]['model_name']} ({checkpoints[0]['arch']}) to {ONNX_FILE} "
          f"({len(data) / 1e6:.1f} MB; ONNX Runtime within {worst:.1e} of PyTorch on {len(rows)} test images) "
          f"and wrote {CARD_FILE} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
