"""Train-step throughput three ways, and the wall time of `dvc repro` per model.

    python -m hmnist.bench --model deit                      # the three ways, one model
    python -m hmnist.bench --repro --models deit,swin,resnet9  # whole pipeline per model

The three ways, in one run on one machine, each timed over the same number of train steps:
  model     the model alone on a batch already on the device (the ceiling, as timm's benchmark)
  pipeline  ours: uint8 cache on the device, gather + augment + normalise there, bf16, channels_last
  notebook  torchvision ImageFolder of JPEGs, PIL transforms, DataLoader workers, fp32
Peak GPU memory is reported for each. Data is synthetic (hmnist.synthetic): speed does not
depend on what the pixels show.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from hmnist.config import CLASSES, ModelConfig, load_params
from hmnist.engine import (Augment, Normalize, autocast, epoch_batches, memory_format,
                           resolve_device, to_device)
from hmnist.models import create_model, data_config
from hmnist.synthetic import write_dataset
from hmnist.train import backward_batch, class_weights, param_groups

REPO = Path(__file__).resolve().parents[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PROFILE_STEPS = 0  # --profile N: after timing, N more steps under torch.profiler, top ops printed


def _timed(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    if PROFILE_STEPS:
        _profile(step, device)
    return seconds


def _profile(step: Callable[[], Any], device: torch.device) -> None:
    """Where a step's time goes, for finding what to fuse next."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20), file=sys.stderr)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _model(config: ModelConfig, device: torch.device, compile: bool, channels_last: bool = True):
    torch.manual_seed(0)
    model = create_model(config, pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(device))
    return model, (torch.compile(model) if compile else model)


def bench_model_only(config: ModelConfig, device, steps, warmup, compile) -> dict[str, Any]:
    _peak_reset(device)
    model, run = _model(config, device, compile)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")
    x = torch.randn(config.batch_size, 3, config.resize, config.resize, device=device)
    x = x.contiguous(memory_format=memory_format(device))
    y = torch.randint(0, len(CLASSES), (config.batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()

    def step():
        with autocast(device):
            logits = run(x)
        criterion(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, warmup, steps, device)
    return {"images_per_second": steps * config.batch_size / seconds, "peak_gib": _peak_gib(device)}


def bench_pipeline(config: ModelConfig, device, steps, warmup, compile, n_images, size) -> dict[str, Any]:
    """The train stage's own step: the same functions, on a synthetic uint8 cache."""
    _peak_reset(device)
    rng = np.random.default_rng(0)
    images = to_device(rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8), device)
    labels_np = rng.choice(len(CLASSES), n_images, p=[0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02])
    labels = torch.from_numpy(labels_np).to(device)
    model, run = _model(config, device, compile)
    norm = data_config(model)
    normalize = Normalize(config.resize, norm["mean"], norm["std"], device)
    generator = torch.Generator(device=device).manual_seed(1)
    augment = Augment(generator)
    weights = class_weights(labels_np, 0.5).to(device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1, reduction="none")
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")
    batches = iter(())

    def step():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = epoch_batches(n_images, config.batch_size, generator)
            batch = next(batches)
        backward_batch(run, lambda rows: normalize(images[rows], augment), labels, criterion, weights,
                       batch, 1, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, warmup, steps, device)
    return {"images_per_second": steps * config.batch_size / seconds, "peak_gib": _peak_gib(device)}


def _synthetic_set(dest: Path, n_images: int, workers: int, duplicates: bool = True):
    """About `n_images` 600x450 JPEGs in the Kaggle layout (1-2 images per lesion, as a .zip or folder)."""
    return write_dataset(dest, n_lesions=max(42, n_images * 2 // 3), images_per_lesion=(1, 2), size=(600, 450),
                         duplicates=duplicates, workers=workers)


def _image_folder(root: Path, n_images: int, workers: int) -> Path:
    """600x450 JPEGs in torchvision's ImageFolder layout (one folder per class)."""
    kaggle = root / "kaggle"
    meta = _synthetic_set(kaggle, n_images, workers, duplicates=False)
    folder = root / "imagefolder"
    for row in meta.itertuples():
        (folder / row.dx).mkdir(parents=True, exist_ok=True)
        source = next(kaggle.glob(f"HAM10000_images_part_*/{row.image_id}.jpg"))
        os.link(source, folder / row.dx / f"{row.image_id}.jpg")
    return folder


def bench_notebook(config: ModelConfig, device, steps, warmup, folder: Path, workers: int) -> dict[str, Any]:
    """The usual notebook: decode and transform on CPU workers with PIL, train in fp32."""
    from torchvision import datasets, transforms

    _peak_reset(device)
    model, run = _model(config, device, compile=False, channels_last=False)
    norm = data_config(model)
    transform = transforms.Compose([
        transforms.RandomResizedCrop(config.resize),
        transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(),
        transforms.RandomRotation(20),
        transforms.ColorJitter(0.1, 0.1, 0.1),
        transforms.ToTensor(),
        transforms.Normalize(norm["mean"], norm["std"]),
    ])
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    criterion = nn.CrossEntropyLoss()
    batches = iter(())

    def step():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        criterion(run(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, warmup, steps, device)
    return {"images_per_second": steps * config.batch_size / seconds, "peak_gib": _peak_gib(device),
            "workers": workers}


def bench_repro(models: list[str], n_images: int, workers: int, keep: Path | None,
                params_file: Path = REPO / "params.yaml") -> dict[str, Any]:
    """Wall time of `dvc repro` for each model with the repo's default params (no hub weights).

    Without dvc on the machine, the stage commands are run in dvc.yaml's order instead.
    """
    root = Path(keep or tempfile.mkdtemp(prefix="hmnist-repro-"))
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "kaggle.zip"
    if not archive.exists():
        _synthetic_set(archive, n_images, workers)
    project = root / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load(params_file.read_text())
    params["data"]["source"] = str(archive)
    for model in params["models"].values():
        model["pretrained"] = False  # the benchmark machine cannot reach the hub
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
               else [sys.executable, "-m", f"hmnist.{stage}"])
        started = time.perf_counter()
        subprocess.run(cmd, cwd=project, check=True, stdout=sys.stderr, env=env)
        return time.perf_counter() - started

    result: dict[str, Any] = {"runner": "dvc repro" if have_dvc else "stage commands (dvc not installed)",
                              "models": {}}
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


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import timm
    info["timm"] = timm.__version__
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit", help="an entry of models: in params.yaml")
    parser.add_argument("--ways", default="model,pipeline,notebook", help="which of model,pipeline,notebook")
    parser.add_argument("--steps", type=int, default=50, help="timed train steps per way")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, workers)")
    parser.add_argument("--batch-size", type=int, help="default: the model's batch_size in params.yaml")
    parser.add_argument("--resize", type=int, help="default: the model's resize in params.yaml")
    parser.add_argument("--images", type=int, default=10015, help="images in the synthetic cache / archive")
    parser.add_argument("--size", type=int, default=224, help="side of the cached images (prepare.size)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model and pipeline ways)")
    parser.add_argument("--notebook-images", type=int, default=2000, help="JPEGs written for the notebook way")
    parser.add_argument("--notebook-workers", type=int, default=4, help="DataLoader workers for the notebook way")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repro", action="store_true", help="time dvc repro per model instead")
    parser.add_argument("--models", default="deit,swin,resnet9", help="with --repro")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="with --repro: params to run")
    parser.add_argument("--workdir", type=Path, help="keep generated data here (reused across runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing each way, profile N more steps and print the top ops")
    args = parser.parse_args(argv)
    global PROFILE_STEPS
    PROFILE_STEPS = args.profile

    result: dict[str, Any] = {"machine": machine()}
    if args.repro:
        result["repro"] = bench_repro(args.models.split(","), args.images, os.cpu_count() or 1, args.workdir,
                                     args.params)
    else:
        params = load_params()
        config = params.models[args.model]
        overrides = {k: v for k, v in (("batch_size", args.batch_size), ("resize", args.resize)) if v}
        config = ModelConfig(**{**config.__dict__, **overrides})
        device = resolve_device(args.device)
        result["bench"] = {"model": args.model, "arch": config.arch, "batch_size": config.batch_size,
                           "resize": config.resize, "device": str(device), "steps": args.steps,
                           "compile": args.compile}
        for way in args.ways.split(","):  # in the order given: run twice, swapped, to see order effects
            if way == "model":
                result["model"] = bench_model_only(config, device, args.steps, args.warmup, args.compile)
            elif way == "pipeline":
                result["pipeline"] = bench_pipeline(config, device, args.steps, args.warmup, args.compile,
                                                    args.images, args.size)
            elif way == "notebook":
                with tempfile.TemporaryDirectory() as tmp:
                    workdir = args.workdir or Path(tmp)
                    folder = workdir / "imagefolder"
                    if not folder.exists():
                        folder = _image_folder(workdir, args.notebook_images, os.cpu_count() or 1)
                    result["notebook"] = bench_notebook(config, device, args.steps, args.warmup, folder,
                                                        args.notebook_workers)
            else:
                parser.error(f"unknown way {way!r}: use model, pipeline, notebook")
            print(f"{way:9s}: {result[way]['images_per_second']:9.1f} img/s", file=sys.stderr)
        if "model" in result and "pipeline" in result:
            result["pipeline_over_model"] = result["pipeline"]["images_per_second"] / result["model"]["images_per_second"]
        if "notebook" in result and "pipeline" in result:
            result["pipeline_over_notebook"] = (result["pipeline"]["images_per_second"]
                                                / result["notebook"]["images_per_second"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
