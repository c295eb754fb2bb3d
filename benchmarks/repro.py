"""The wall time of `dvc repro` per model, from an empty workspace, on synthetic images.

    python benchmarks/repro.py --models deit,swin,resnet9 [--params params.yaml] [--json FILE]

Each model's train and evaluate stages are timed after one shared download, prepare and split,
with the params' own settings (no hub weights: a benchmark machine may not reach the hub).
Without dvc on the machine, the stage commands are run in dvc.yaml's order instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from timing import machine, write_result
from train_step import REPO, synthetic_set


def bench_repro(models: list[str], n_images: int, workers: int, keep: Path | None,
                params_file: Path = REPO / "params.yaml") -> dict[str, Any]:
    """Wall time of `dvc repro` for each model with the repo's default params (no hub weights).

    Without dvc on the machine, the stage commands are run in dvc.yaml's order instead.
    """
    root = Path(keep or tempfile.mkdtemp(prefix="hmnist-repro-"))
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "kaggle.zip"
    if not archive.exists():
        synthetic_set(archive, n_images, workers)
    params = yaml.safe_load(params_file.read_text())
    params["data"]["source"] = str(archive)
    for model in params["models"].values():
        model["pretrained"] = False  # the benchmark machine cannot reach the hub
    project = root / "project"
    run, runner = _repro_project(root, project)

    result: dict[str, Any] = {"runner": runner, "models": {}}
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "model": models[0]}, sort_keys=False))
    result["data_stages_seconds"] = {stage: run(stage) for stage in ("download", "prepare", "split")}
    result["images"] = len((project / "data/prepared/index.csv").read_text().splitlines()) - 1
    for name in models:
        (project / "params.yaml").write_text(yaml.safe_dump({**params, "model": name}, sort_keys=False))
        seconds = {stage: run(stage) for stage in ("train", "evaluate")}
        metrics = json.loads((project / "metrics/metrics.json").read_text())
        result["models"][name] = {"stage_seconds": seconds, "epochs": params["models"][name]["epochs"],
                                  "test_balanced_accuracy": metrics["balanced_accuracy"],
                                  "test_accuracy": metrics["accuracy"]}
        print(f"{name}: {seconds}", file=sys.stderr)
    data_seconds = sum(result["data_stages_seconds"].values())
    for entry in result["models"].values():  # a whole repro of one model from an empty workspace
        entry["repro_seconds"] = data_seconds + sum(entry["stage_seconds"].values())
    result["total_seconds"] = data_seconds + sum(sum(m["stage_seconds"].values()) for m in result["models"].values())
    return result


def _repro_project(root: Path, project: Path) -> tuple[Callable[[str], float], str]:
    """A fresh copy of the repo's pipeline in `project`; returns a function that runs one of its
    stages and says how long it took, and what runs the stages (dvc, or the stage commands)."""
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # dvc.yaml's commands say `python`: make that this interpreter, whatever the machine calls it
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python").exists():
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        if not (bin_dir / "python").exists():
            (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(project / "src"), os.environ.get("PYTHONPATH")]))}
    have_dvc = subprocess.run([sys.executable, "-m", "dvc", "version"], capture_output=True).returncode == 0
    if have_dvc:
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=project, check=True)

    def run(stage: str) -> float:
        # one stage at a time (dvc repro --single-item), so each stage's wall time is known
        cmd = ([sys.executable, "-m", "dvc", "repro", "--single-item", stage] if have_dvc
               else [sys.executable, "-m", f"hmnist.stages.{stage}"])
        started = time.perf_counter()
        subprocess.run(cmd, cwd=project, check=True, stdout=sys.stderr, env=env)
        return time.perf_counter() - started
    return run, "dvc repro" if have_dvc else "stage commands (dvc not installed)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit,swin,resnet9", help="entries of models: in the params")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="the params to run")
    parser.add_argument("--images", type=int, default=10015, help="images in the synthetic archive")
    parser.add_argument("--workdir", type=Path, help="keep generated data here (reused across runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    repro = bench_repro(args.models.split(","), args.images, os.cpu_count() or 1, args.workdir, args.params)
    write_result({"machine": machine(), "repro": repro}, args.json)


if __name__ == "__main__":
    main()
