"""The wall time of the export stage's ONNX export, per model, on the CPU.

    python benchmarks/export_time.py [--models lite0,resnet9,deit,swin] [--size 32] [--repeats 3]
    PYTHONPATH=/tmp/old/src python benchmarks/export_time.py ...   (another checkout's code)

Each model of params.yaml, with random weights (the values do not change the export's work) at
`--size` (default: the model's own resize), is exported by `onnx_export.export`, the function
the export stage calls: the exporter's trace, decompositions and the ONNX graph, not the
self-check on test images. As in the stage, each export is the first of a fresh process (the
exporter's one-time set-up included; imports not); `--repeats` processes per model, their
median and range. Run it on an otherwise idle machine; BENCHMARKS.md ("ONNX export: the
stage's time") has the figures.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import hmnist
from hmnist.onnx_export import export
from onnx_speed import REPO, random_checkpoint


def one(name: str, size: int | None) -> float:
    """Seconds of one export of model `name`, in this process."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"] = name
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        checkpoint = random_checkpoint(path, size, max(size or 0, params["prepare"]["size"]))
    started = time.perf_counter()
    export([checkpoint], [f"random {name}"])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0,resnet9,deit,swin")
    parser.add_argument("--size", type=int, help="input side (default: each model's resize)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a test worker has)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single export, in the process the others start
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(one(args.one, args.size))
        return
    print(f"hmnist from {Path(hmnist.__file__).parent}; torch {torch.__version__}; {args.threads} thread(s)")
    print("| model | input | export s, median | min - max | processes |")
    print("|---|--:|--:|--:|--:|")
    for name in args.models.split(","):
        command = [sys.executable, __file__, "--one", name, "--threads", str(args.threads)]
        command += ["--size", str(args.size)] if args.size else []
        times = [float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
                 for _ in range(args.repeats)]
        print(f"| {name} | {args.size or 'resize'} | {statistics.median(times):.2f} | {min(times):.2f} - "
              f"{max(times):.2f} | {len(times)} |", flush=True)


if __name__ == "__main__":
    main()
