"""Train-step throughput three ways, and the wall time of `dvc repro` per model.

    python -m hmnist.commands.bench --model deit                      # the three ways, one model
    python -m hmnist.commands.bench --model deit --ways model,pipeline,input --rounds 5 --profile 10
    python -m hmnist.commands.bench --repro --models deit,swin,resnet9  # whole pipeline per model

The three ways, in one run on one machine, each timed over the same number of train steps:
  model     the model alone on a batch already on the device (the ceiling, as timm's benchmark)
  pipeline  ours: uint8 cache on the device, gather + augment + normalise there, bf16, channels_last
  notebook  torchvision ImageFolder of JPEGs, PIL transforms, DataLoader workers, fp32
and, on request, `input`: our gather + augment + normalise alone, what it adds to a step at most.
The device ways take turns over several rounds (speed drifts within a process); the notebook
is timed after them. Peak GPU memory is reported for each. Data is synthetic
(hmnist.synthetic): speed does not depend on what the pixels show.
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

from hmnist.augment import Augment, ModelInput, memory_format
from hmnist.config import CLASSES, ModelConfig, load_params
from hmnist.engine import (SmoothedCrossEntropy, autocast, backward_batch, class_weights, epoch_batches,
                           param_groups, resolve_device, to_device)
from hmnist.errors import description
from hmnist.models import create_model, data_config
from hmnist.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[3]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


Step = Callable[[], Any]


def _run(step: Step, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls, the device drained before and after."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - started


def measure(setups: dict[str, Callable[[], Step]], batch_size: int, device: torch.device, steps: int,
            warmup: int, rounds: int, profile: int = 0) -> dict[str, dict[str, Any]]:
    """Images/second of each way, timed in `rounds` interleaved rounds of `steps` steps.

    One process's speed drifts on a GPU (clocks, the host) by as much as the differences
    measured (BENCHMARKS.md, run A): so the ways take turns, in alternating order, and each
    reports the median of its rounds. Peak memory is each way's own, from its set-up to the end
    of its warm-up. With `profile`, N more steps per way under torch.profiler give the device
    time per step: busy near 1 means the GPU bounds the step, far under 1 the host does.
    """
    results, steps_of = {}, {}
    for name, setup in setups.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step = steps_of[name] = setup()
        _run(step, warmup, device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
        results[name] = {"peak_gib": peak, "rounds": []}
    names = list(setups)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name]["rounds"].append(steps * batch_size / _run(steps_of[name], steps, device))
            # as it goes: a run cut short by a time limit still leaves its figures
            print(f"round {r + 1}/{rounds} {name}: {results[name]['rounds'][-1]:.1f} img/s", file=sys.stderr)
    for name, result in results.items():
        result["images_per_second"] = float(np.median(result["rounds"]))
        result["ms_per_step"] = 1000 * batch_size / result["images_per_second"]
        if profile:
            result["device_ms_per_step"] = _device_ms_per_step(steps_of[name], profile, device, name)
            if result["device_ms_per_step"] is not None:
                result["device_busy"] = result["device_ms_per_step"] / result["ms_per_step"]
    return results


def _device_ms_per_step(step: Step, steps: int, device: torch.device, name: str) -> float | None:
    """Milliseconds of device work (kernels, copies) per step, and the top ops on stderr."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _run(step, steps, device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"== profile: {name}, {steps} steps", file=sys.stderr)
    print(events.table(sort_by=sort, row_limit=15), file=sys.stderr)
    if device.type != "cuda":
        return None
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return device_us / 1000 / steps


def _model(config: ModelConfig, device: torch.device, compile: bool, channels_last: bool = True):
    torch.manual_seed(0)
    model = create_model(config, pretrained=False).to(device)
    if channels_last:
        model = model.to(memory_format=memory_format(device, config.arch))
    return model, (torch.compile(model) if compile else model)


def model_way(config: ModelConfig, device: torch.device, compile: bool) -> Step:
    """The model alone on one batch already on the device, in the train stage's precision."""
    model, run = _model(config, device, compile)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")
    x = torch.randn(config.batch_size, 3, config.resize, config.resize, device=device)
    x = x.contiguous(memory_format=memory_format(device, config.arch))
    y = torch.randint(0, len(CLASSES), (config.batch_size,), device=device)
    criterion = nn.CrossEntropyLoss()

    def step():
        with autocast(device):
            logits = run(x)
        criterion(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _cache(config: ModelConfig, device: torch.device, n_images: int, size: int, model: nn.Module):
    """A synthetic uint8 cache on the device with HAM10000's class mix, and the train stage's
    input function for `model`: gather a batch, augment it and normalise it there."""
    rng = np.random.default_rng(0)
    images = to_device(rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8), device)
    labels = rng.choice(len(CLASSES), n_images, p=[0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02])
    norm = data_config(model)
    model_input = ModelInput(config.resize, norm["mean"], norm["std"], device, config.arch)
    generator = torch.Generator(device=device).manual_seed(1)
    augment = Augment(generator)
    batches = iter(())

    def next_batch() -> torch.Tensor:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = epoch_batches(n_images, config.batch_size, generator)
            batch = next(batches)
        return batch
    return labels, next_batch, lambda rows: model_input(images[rows], augment)


def input_way(config: ModelConfig, device: torch.device, n_images: int, size: int) -> Step:
    """Our input pipeline alone: what it adds to each step, at most."""
    _, next_batch, inputs = _cache(config, device, n_images, size, create_model(config, pretrained=False))
    return lambda: inputs(next_batch())


def pipeline_way(config: ModelConfig, device: torch.device, compile: bool, n_images: int, size: int) -> Step:
    """The train stage's own step: the same functions, on a synthetic uint8 cache."""
    model, run = _model(config, device, compile)
    labels_np, next_batch, inputs = _cache(config, device, n_images, size, model)
    labels = torch.from_numpy(labels_np).to(device)
    weights = class_weights(labels_np, 0.5).to(device)
    criterion = SmoothedCrossEntropy(weights, 0.1)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr, config.weight_decay), lr=config.lr,
                                  fused=device.type == "cuda")

    def step():
        backward_batch(run, inputs, labels, criterion, weights, next_batch(), 1, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


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


def notebook_way(config: ModelConfig, device: torch.device, folder: Path, workers: int) -> Step:
    """The usual notebook: decode and transform on CPU workers with PIL, train in fp32."""
    from torchvision import datasets, transforms

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
    return step


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
    params = yaml.safe_load(params_file.read_text())
    params["data"]["source"] = str(archive)
    for model in params["models"].values():
        model["pretrained"] = False  # the benchmark machine cannot reach the hub
    project = root / "project"
    run, runner = _repro_project(root, project)

    result: dict[str, Any] = {"runner": runner, "models": {}}
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "model": models[0]}, sort_keys=False))
    result["data_stages_seconds"] = {stage: run(stage) for stage in ("check_params", "download", "prepare", "split")}
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


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import timm
    info["timm"] = timm.__version__
    return info


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    unknown = set(ways) - {"model", "pipeline", "input", "notebook"}
    if unknown:
        parser.error(f"unknown way {sorted(unknown)[0]!r}: use model, pipeline, input, notebook")

    result: dict[str, Any] = {"machine": machine()}
    if args.repro:
        result["repro"] = bench_repro(args.models.split(","), args.images, os.cpu_count() or 1, args.workdir,
                                     args.params)
    else:
        result.update(bench_ways(args, ways))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--model", default="deit", help="an entry of models: in params.yaml")
    parser.add_argument("--ways", default="model,pipeline,notebook",
                        help="which of model,pipeline,input,notebook (input: our input pipeline alone)")
    parser.add_argument("--steps", type=int, default=100, help="timed train steps per way and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the GPU ways take turns this many times; each reports its median round")
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
                        help="profile N more steps of each way: device time per step, top ops on stderr")
    return parser


def bench_ways(args: argparse.Namespace, ways: list[str]) -> dict[str, Any]:
    """Each of `ways` measured (the device ways interleaved, the notebook alone) and compared."""
    params = load_params()
    config = params.models[args.model]
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("resize", args.resize)) if v}
    config = ModelConfig(**{**config.__dict__, **overrides})
    device = resolve_device(args.device)
    result: dict[str, Any] = {"bench": {"model": args.model, "arch": config.arch, "batch_size": config.batch_size,
                                        "resize": config.resize, "device": str(device), "steps": args.steps,
                                        "rounds": args.rounds, "warmup": args.warmup, "compile": args.compile}}
    setups = {
        "model": lambda: model_way(config, device, args.compile),
        "pipeline": lambda: pipeline_way(config, device, args.compile, args.images, args.size),
        "input": lambda: input_way(config, device, args.images, args.size),
    }
    # the GPU ways take turns; the notebook's loader workers would load the host meanwhile
    # and skew them, so it is timed alone, afterwards
    interleaved = {way: setups[way] for way in ways if way != "notebook"}
    if interleaved:
        result.update(measure(interleaved, config.batch_size, device, args.steps, args.warmup, args.rounds,
                              args.profile))
    if "notebook" in ways:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = args.workdir or Path(tmp)
            folder = workdir / "imagefolder"
            if not folder.exists():
                folder = _image_folder(workdir, args.notebook_images, os.cpu_count() or 1)
            notebook = lambda: notebook_way(config, device, folder, args.notebook_workers)  # noqa: E731
            result.update(measure({"notebook": notebook}, config.batch_size, device, args.steps, args.warmup,
                                  args.rounds, args.profile))
            result["notebook"]["workers"] = args.notebook_workers
    for way in ways:
        r = result[way]
        busy = f", device busy {r['device_busy']:.0%}" if r.get("device_busy") is not None else ""
        print(f"{way:9s}: {r['images_per_second']:9.1f} img/s (rounds: "
              f"{', '.join(f'{v:.0f}' for v in r['rounds'])}){busy}", file=sys.stderr)
    if "model" in result and "pipeline" in result:
        per_round = [p / m for p, m in zip(result["pipeline"]["rounds"], result["model"]["rounds"])]
        result["pipeline_over_model"] = float(np.median(per_round))
        result["pipeline_over_model_rounds"] = per_round
    if "notebook" in result and "pipeline" in result:
        result["pipeline_over_notebook"] = (result["pipeline"]["images_per_second"]
                                            / result["notebook"]["images_per_second"])
    return result


if __name__ == "__main__":
    main()
