"""Score an ensemble of finished runs, post hoc: the mean of their test probabilities, argmax.

    python benchmarks/ensemble.py R/today-3/predictions/test.csv R/swa-3/predictions/test.csv ... --out ens.csv
    hmnist compare R/notebook-0/predictions.csv,R/notebook-1/predictions.csv,R/notebook-2/predictions.csv ens.csv

Each input is a predictions CSV as `hmnist compare` reads it (a run's predictions/test.csv, or the
plain loop's predictions.csv); they must hold the same test images. The average is what `hmnist
predict --checkpoint A --checkpoint B ...` and the evaluate stage compute for several models: the
mean of the models' own (uncalibrated) probabilities. It prints the evaluate stage's metrics of
that average and writes it (`--out`) in the same format, so `hmnist compare` can set it against a
recipe's runs. No training: this scores runs that `benchmarks/quality.py` already made.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from hmnist.config import CLASS_COLUMNS, CLASSES
from hmnist.metrics import compute_metrics
from hmnist.runs import read_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", nargs="+", help="predictions CSVs of the runs to average")
    ap.add_argument("--out", help="write the averaged predictions here (CSV, the inputs' format)")
    args = ap.parse_args()

    frames = read_recipe(args.predictions)  # each sorted by image and checked; one test set
    mean = frames[0].copy()
    mean[CLASS_COLUMNS] = np.mean([f[CLASS_COLUMNS].to_numpy(dtype=np.float64) for f in frames], axis=0)
    labels = mean["dx"].map(CLASSES.index).to_numpy()
    m = compute_metrics(labels, mean[CLASS_COLUMNS].to_numpy())
    print(json.dumps({"models": len(frames), **{k: m[k] for k in
                      ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity")}}))
    if args.out:
        mean[["image", *CLASS_COLUMNS, "lesion_id", "dx"]].to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
