"""Time the train stage in 1 process against `train.devices` processes on this machine's CPU.

    .venv/bin/python benchmarks/ddp_cpu.py [--devices 2] [--lesions 400] [--epochs 2] [--repeat 2]

Writes a synthetic archive in the Kaggle layout (tests/synthetic.py), prepares it at 64 px and
splits it, then runs `python -m hmnist.stages.train` (ResNet9 at 64 px, batch 64, no validation cost
worth naming) with `train.devices: 1` and with `--devices`, both on the CPU, taking turns, and
prints each run's wall clock (interpreter and worker start-up included) and the stage's own
training images/s. With 1 process torch uses every core; with N, each worker gets cores / N
threads, so on a CPU this measures DDP's overhead, not a speed-up: the feature is for GPUs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from hmnist.config import parse_params
from hmnist.data import load_prepared
from hmnist.stages.prepare import prepare
from hmnist.stages.split import split_lesions, write_split
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py: test data, kept beside the tests, not in the package
from synthetic import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hmnist-ddp-"))
    write_dataset(root / "raw.zip", n_lesions=args.lesions, images_per_lesion=(1, 3), size=(80, 60), seed=0)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"], raw["prepare"]["size"], raw["model"] = str(root / "raw.zip"), 64, "resnet9"
    raw["train"].update(device="cpu", warmup_epochs=0)
    raw["models"]["resnet9"].update(resize=64, batch_size=64, epochs=args.epochs)
    prepare(root / "raw.zip", root / "data/prepared", size=64, workers=1, progress=False)
    _, index = load_prepared(root / "data/prepared")
    write_split(split_lesions(index.astype(str), parse_params(raw).split), root / "data/split.csv",
                root / "metrics/split.json")
    print(f"{len(index)} images, {os.cpu_count()} CPU cores, torch {torch.__version__}, in {root}")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for round_ in range(args.repeat):
        for devices in (1, args.devices):
            raw["train"]["devices"] = devices
            (root / "params.yaml").write_text(yaml.safe_dump(raw))
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "hmnist.stages.train"], cwd=root, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            meta = torch.load(root / "models/model.pt", weights_only=True)
            print(f"round {round_ + 1}: {devices} process(es): {seconds:6.1f} s wall, "
                  f"{meta['train_images_per_second']:6.1f} training images/s", flush=True)


if __name__ == "__main__":
    main()
