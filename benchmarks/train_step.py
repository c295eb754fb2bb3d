"""Train-step throughput three ways: the model alone, the train stage's own step, the notebook way.

    python benchmarks/train_step.py --model deit                      # the three ways, one model
    python benchmarks/train_step.py --model deit --ways model,pipeline,input --rounds 5 --profile 10

The three ways, in one run on one machine, each timed over the same number of train steps:
  model     the model alone on a batch already on the device (the ceiling, as timm's benchmark)
  pipeline  the train stage's own step (hmnist/trainer.py's `_setup` and `_train_step`, with the
            params' augmentation, loss, optimizer and schedule) on a uint8 cache on the device
  notebook  torchvision ImageFolder of JPEGs, PIL transforms, DataLoader workers, fp32
and, on request, `input`: the stage's gather + augment + normalise alone, what it adds to a step
at most. The device ways take turns over several rounds (speed drifts within a process); the
notebook is timed after them. Peak GPU memory is reported for each. Data is synthetic
(tests/synthetic.py, or random pixels): speed does not depend on what the pixels show.

A script beside the other benchmarks, not a package command: it drives a stage's internals,
which no package module may import (tests/test_structure.py), and it serves who measures the
code, not who uses a trained model. `python benchmarks/repro.py` times whole `dvc repro` runs.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import yaml

from hmnist.augment import memory_format
from hmnist.config import CLASSES, ModelConfig, Params, parse_params
from hmnist.engine import autocast, deterministic, resolve_device
from hmnist.training import epoch_batches, param_groups
from hmnist.models import create_model, data_config
# the stage's own set-up and step, private to it: this benchmark is their one outside caller, and
# tests/test_bench.py holds its steps to the stage's weights
from hmnist.trainer import Run, _setup, _train_step
from timing import Step, machine, measure, write_result
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py: test data, kept beside the tests, not in the package
from synthetic import write_dataset  # noqa: E402

# this script lives in the repository, never in an installed package: its params.yaml is beside it
REPO = Path(__file__).resolve().parents[1]
AUGMENT_PARAMS = ("augment", "crop_area_min", "rotation", "color_jitter")


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


def stage_params(path: Path, model: str, device: str, compile: bool, **overrides: int | None) -> Params:
    """`path`'s params with `model` selected on `device`, its entry's `overrides` applied (None:
    keep) and no hub weights (a benchmark machine may not reach the hub; speed does not depend
    on the weights): the augmentation, loss and optimizer are the file's own."""
    raw = yaml.safe_load(path.read_text())
    raw["model"] = model
    raw["train"].update(device=device, compile=compile)
    raw["models"][model].update({k: v for k, v in overrides.items() if v is not None},
                                pretrained=False, pretrained_path=None)
    return parse_params(raw, str(path))


def synthetic_cache(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """A random uint8 cache with HAM10000's class mix, as the prepare and split stages leave it:
    (images, index, split), one image per lesion, nearly all of it the train split (speed does not
    depend on the pixels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    image_ids = [f"ISIC_{i:07d}" for i in range(n_images)]
    labels = rng.choice(len(CLASSES), n_images, p=[0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02])
    labels[:len(CLASSES)] = np.arange(len(CLASSES))  # every class in the val split: operating points need positives
    index = pd.DataFrame({"image_id": image_ids, "lesion_id": image_ids, "label": labels})
    val = np.arange(n_images) < max(len(CLASSES), n_images // 50)
    split = pd.DataFrame({"image_id": image_ids, "split": np.where(val, "val", "train")})
    return images, index, split


def stage_step(run: Run) -> Step:
    """The train stage's own step on `run` (built by its own `_setup`): batches drawn as its
    epochs draw them, one optimizer step each, with whatever the params set (augmentation,
    loss, clipping, schedule, EMA). tests/test_bench.py holds it to the stage's weights."""
    run.optimisation.model.train()
    batches = iter(())

    def step() -> torch.Tensor:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # an epoch's batches, as the stage's _train_epoch draws them
            batches = epoch_batches(len(run.data.train_labels), run.batch_size, run.generator, run.sample_weights)
            batch = next(batches)
        return _train_step(run, batch)
    return step


def input_way(run: Run) -> Step:
    """The stage's input pipeline alone (gather, augment, normalise, as its step calls it): what
    it adds to each step, at most."""
    def step() -> torch.Tensor:
        batch = torch.randint(0, len(run.data.train_labels), (run.batch_size,), generator=run.generator,
                              device=run.device)
        draws = run.augment.draw(len(batch)) if run.augment is not None else None
        return run.model_input(run.data.train_images[batch], run.augment, draws)
    return step


def synthetic_set(dest: Path, n_images: int, workers: int, duplicates: bool = True):
    """About `n_images` 600x450 JPEGs in the Kaggle layout (1-2 images per lesion, as a .zip or folder)."""
    return write_dataset(dest, n_lesions=max(42, n_images * 2 // 3), images_per_lesion=(1, 2), size=(600, 450),
                         duplicates=duplicates, workers=workers)


def _image_folder(root: Path, n_images: int, workers: int) -> Path:
    """600x450 JPEGs in torchvision's ImageFolder layout (one folder per class)."""
    kaggle = root / "kaggle"
    meta = synthetic_set(kaggle, n_images, workers, duplicates=False)
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


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    unknown = set(ways) - {"model", "pipeline", "input", "notebook"}
    if unknown:
        parser.error(f"unknown way {sorted(unknown)[0]!r}: use model, pipeline, input, notebook")
    result = {"machine": machine(), **bench_ways(args, ways)}
    write_result(result, args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit", help="an entry of models: in params.yaml")
    parser.add_argument("--ways", default="model,pipeline,notebook",
                        help="which of model,pipeline,input,notebook (input: our input pipeline alone)")
    parser.add_argument("--steps", type=int, default=100, help="timed train steps per way and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="the GPU ways take turns this many times; each reports its median round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, workers)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="the params whose model entry and train block the stage's step runs with")
    parser.add_argument("--batch-size", type=int, help="default: the model's batch_size in the params")
    parser.add_argument("--resize", type=int, help="default: the model's resize in the params")
    parser.add_argument("--images", type=int, default=10015, help="images in the synthetic cache")
    parser.add_argument("--size", type=int, default=224, help="side of the cached images (prepare.size)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model and pipeline ways)")
    parser.add_argument("--notebook-images", type=int, default=2000, help="JPEGs written for the notebook way")
    parser.add_argument("--notebook-workers", type=int, default=4, help="DataLoader workers for the notebook way")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, help="keep generated data here (reused across runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more steps of each way: device time per step, top ops on stderr")
    return parser


def bench_ways(args: argparse.Namespace, ways: list[str]) -> dict[str, Any]:
    """Each of `ways` measured (the device ways interleaved, the notebook alone) and compared."""
    params = stage_params(args.params, args.model, args.device, args.compile,
                          batch_size=args.batch_size, resize=args.resize)
    config, device = params.model_config, resolve_device(args.device)
    result: dict[str, Any] = {"bench": {"model": args.model, "arch": config.arch, "batch_size": config.batch_size,
                                        "resize": config.resize, "device": str(device), "steps": args.steps,
                                        "rounds": args.rounds, "warmup": args.warmup, "compile": args.compile,
                                        # the augmentation the pipeline way's step runs: the params'
                                        "augment": {k: getattr(params.train, k) for k in AUGMENT_PARAMS}}}
    # one stage run serves the pipeline and input ways: one cache on the device
    stage_run = functools.cache(lambda: _setup(params, *synthetic_cache(args.images, args.size)))
    setups = {
        "model": lambda: model_way(config, device, args.compile),
        "pipeline": lambda: stage_step(stage_run()),
        "input": lambda: input_way(stage_run()),
    }
    # the GPU ways take turns; the notebook's loader workers would load the host meanwhile
    # and skew them, so it is timed alone, afterwards
    interleaved = {way: setups[way] for way in ways if way != "notebook"}
    with deterministic(params.train.deterministic):  # as the stage runs
        if interleaved:
            result.update(measure(interleaved, config.batch_size, device, args.steps, args.warmup, args.rounds,
                                  args.profile))
    if "notebook" in ways:
        result["notebook"] = _notebook(args, config, device)
    return _compared(result, ways)


def _notebook(args: argparse.Namespace, config: ModelConfig, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        folder = workdir / "imagefolder"
        if not folder.exists():
            folder = _image_folder(workdir, args.notebook_images, os.cpu_count() or 1)
        notebook = lambda: notebook_way(config, device, folder, args.notebook_workers)  # noqa: E731
        result = measure({"notebook": notebook}, config.batch_size, device, args.steps, args.warmup,
                         args.rounds, args.profile)["notebook"]
    return {**result, "workers": args.notebook_workers}


def _compared(result: dict[str, Any], ways: list[str]) -> dict[str, Any]:
    """Each way's speed on stderr, and the ratios of the pipeline to the others."""
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
