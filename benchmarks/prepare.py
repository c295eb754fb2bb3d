"""Benchmark the prepare stage against the naive way of building the same cache.

    .venv/bin/python benchmarks/prepare.py [--images 2000] [--repeat 3]

Writes a synthetic zip in the Kaggle layout with 600x450 JPEGs (tests/synthetic.py), then times,
on this machine in this run:
  naive: one process, each image read from the zip, fully decoded by PIL and resized to
         224x224 (`Image.open(f).convert('RGB').resize((224, 224))`), stacked and saved;
  stage: `python -m hmnist.stages.prepare` as a subprocess in a throwaway project, wall clock,
         interpreter start-up included.
Each is run --repeat times, interleaved; the best run counts (the others only suffer from noise).
The default of 2,000 images keeps the stage's fixed cost (~0.2 s of imports and pool start-up,
2% of the real 10,015-image run) from dominating; at a few hundred images it is a quarter of
the stage's time. Writing the zip takes ~15 s per 1,000 images.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from hmnist.data import METADATA
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py: test data, kept beside the tests, not in the package
from synthetic import image_folder, write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 224


def naive(archive_path: Path, out: Path) -> int:
    with zipfile.ZipFile(archive_path) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read(METADATA).decode())))
        image_ids = sorted(r["image_id"] for r in rows)
        images = np.empty((len(image_ids), SIZE, SIZE, 3), np.uint8)
        for i, image_id in enumerate(image_ids):
            with archive.open(f"{image_folder(image_id)}/{image_id}.jpg") as f:
                images[i] = np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE)))
    np.save(out, images)
    return len(images)


def stage(project: Path) -> None:
    subprocess.run([sys.executable, "-m", "hmnist.stages.prepare"], cwd=project, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def best_of(repeat: int, runs: dict) -> dict[str, float]:
    """Best wall-clock seconds of each (setup, run); interleaved, so a busy spell hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (setup, run) in runs.items():
            setup()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the synthetic zip (>= 42)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hmnist-bench-") as tmp:
        project = Path(tmp)
        archive = project / "data/raw/skin-cancer-mnist-ham10000.zip"
        print(f"writing {args.images} synthetic 600x450 JPEGs ...", flush=True)
        write_dataset(archive, n_lesions=args.images, images_per_lesion=(1, 1), size=(600, 450))
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["prepare"] = {"size": SIZE, "workers": 0}
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

        # Outputs of the previous run are deleted before the clock starts, as `dvc repro` deletes
        # a stage's outputs before running it: freeing a big file is not decoding.
        naive_out, stage_out = project / "naive.npy", project / "data/prepared"
        best = best_of(args.repeat, {
            "naive": (lambda: naive_out.unlink(missing_ok=True), lambda: naive(archive, naive_out)),
            "stage": (lambda: shutil.rmtree(stage_out, ignore_errors=True), lambda: stage(project)),
        })
        naive_s, stage_s = best["naive"], best["stage"]

        ours = np.load(project / "data/prepared/images.npy", mmap_mode="r")
        assert ours.shape == (args.images, SIZE, SIZE, 3), ours.shape
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        print(f"machine: {os.cpu_count()} CPUs, {cpu}")
        print(f"images: {args.images} of 600x450 -> {SIZE}x{SIZE}; best of {args.repeat} runs")
        print(f"naive (PIL full decode, 1 process):   {naive_s:6.2f} s  {args.images / naive_s:7.1f} images/s")
        print(f"stage (python -m hmnist.stages.prepare):     {stage_s:6.2f} s  {args.images / stage_s:7.1f} images/s")
        print(f"speedup: {naive_s / stage_s:.2f}x")


if __name__ == "__main__":
    main()
