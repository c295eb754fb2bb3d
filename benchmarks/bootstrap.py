"""The evaluate stage's time with and without the lesion bootstrap, on synthetic data of the
real test split's size (about 1,500 images of about 1,100 lesions).

    python benchmarks/bootstrap.py [--images 1700] [--repeat 3] [--workdir DIR]

Builds a throwaway project from a synthetic Kaggle-layout archive whose split puts ~1,500
images in the test split, trains a 1-epoch ResNet9 at 32 px, then times `python -m
hmnist.stages.evaluate` (a subprocess: imports, inference, metrics, plots, all of it) with
evaluate.bootstrap 0 and 2000, alternating, and the bootstrap call alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1700, help="synthetic lesions (1-3 images each, ~2 on average)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="keep the project here (default: a temporary folder)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))  # synthetic.py: test data, kept beside the tests, not in the package
    from synthetic import write_dataset

    root = Path(args.workdir or tempfile.mkdtemp(prefix="hmnist-bootstrap-"))
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "data/raw/skin-cancer-mnist-ham10000.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    lesions = args.images * 2 // 3  # about 1.5 images per lesion, as HAM10000 (10,015 of 7,470)
    write_dataset(archive, n_lesions=lesions, images_per_lesion=(1, 2), size=(60, 45), seed=0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(archive)
    params["prepare"]["size"] = 32
    params["split"].update(val=0.05, test=0.9)  # most images in the test split: the size that matters here
    params["train"].update(device="cpu", warmup_epochs=0)
    params["model"] = "resnet9"
    params["models"]["resnet9"].update(resize=32, epochs=1, batch_size=32)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def stage(name: str, bootstrap: int | None = None) -> float:
        if bootstrap is not None:
            params["evaluate"]["bootstrap"] = bootstrap
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"hmnist.stages.{name}"], cwd=root, env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - started

    for name in ("prepare", "split", "train"):
        stage(name)
    import pandas as pd
    split = pd.read_csv(root / "data/split.csv")
    test = split[split["split"] == "test"]
    print(f"test split: {len(test)} images of {test['lesion_id'].nunique()} lesions")

    times: dict[int, list[float]] = {0: [], 2000: []}
    for _ in range(args.repeat):
        for bootstrap in times:
            times[bootstrap].append(stage("evaluate", bootstrap))
    for bootstrap, values in times.items():
        print(f"python -m hmnist.stages.evaluate, evaluate.bootstrap {bootstrap}: median {statistics.median(values):.2f} s, "
              f"best {min(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")

    from hmnist.bootstrap import bootstrap_intervals
    predictions = pd.read_csv(root / "predictions/test.csv")
    probs = predictions[["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].to_numpy()
    labels = predictions["dx"].map({c: i for i, c in enumerate(("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"))})
    alone = []
    for seed in range(args.repeat):
        started = time.perf_counter()
        bootstrap_intervals(labels.to_numpy(), probs, predictions["lesion_id"].to_numpy(), 2000, seed)
        alone.append(time.perf_counter() - started)
    print(f"bootstrap_intervals alone, 2000 resamples: median {statistics.median(alone):.2f} s, best {min(alone):.2f} s")


if __name__ == "__main__":
    main()
