"""Model quality on real HAM10000 images: training recipes compared over several seeds.

    python benchmarks/quality.py --archive ~/ham-real.zip --configs today,notebook --seeds 0,1,2
    python benchmarks/quality.py --archive ~/ham-real.zip --configs default --seeds 0 --src /tmp/old/src
    python benchmarks/quality.py --archive ~/ham-real.zip --budget lite0 --configs today,notebook --seeds 0,1,2
    python benchmarks/quality.py --archive ~/ham-real.zip --budget lite0 --configs today,metadata --seeds 0,1,2
        (patient metadata fused: each metadata run also evaluated with its fields removed, CONFIG+no-metadata)

Each configuration is a set of params.yaml overrides, run as a user runs it: the stage commands
`python -m hmnist.stages.train` and `python -m hmnist.stages.evaluate` in a throwaway project whose data/ is
shared by every run (download, prepare and split run once per archive, cache size and split seed).
`--src` runs another checkout's code (e.g. a worktree of an older commit, for "today's recipe");
stages meet only through files, so any version's stages work here. The `notebook` configuration
is the peer: a plain training loop written here, as the Kaggle notebooks write it (PIL resize,
flips only, class-weighted label-smoothed cross-entropy, OneCycle to 4e-3, fp32, last epoch
kept), on the same split's images. With `--budget lite0` the runs fine-tune the ImageNet-pretrained
EfficientNet-Lite0 at 128 px for 8 epochs instead, and `notebook` is the plain fine-tuning loop
`plain_finetune.py` (`--peer`, default ../shared/tools/plain_finetune.py beside the repository),
run as its header says on the same archive and data/split.csv, at lr 2e-3 (`--peer-lr`): PIL
bilinear resize, flips, AdamW (weight decay 1e-2 on every tensor) with OneCycleLR, torch's
class-weighted label-smoothed cross-entropy, batch 32, fp32, the last epoch, 2-view flip TTA.
The loop written here before it scored 0.587 at lr 3e-4 where that script scores 0.700 (seed 0):
it was a re-implementation from a description, and the one difference found in its code is
that it built its model through hmnist's create_model, whose new 7-class head then started at
timm's EfficientNet initialisation (logits of sd 2.7 at the start, not 0.35; now reset as the
script does). A peer must be the strongest plain loop, so the script itself is run, not a copy.
Its figures are computed from its test_predictions.csv with the evaluate stage's definitions; a
finished run of it (OUT/test_predictions.csv with its stdout in OUT/log.txt) is scored, not rerun.

Results go to WORKDIR/results.jsonl one line per run as it finishes, so an interrupted
benchmark keeps what it measured and a rerun skips the runs already there; the table (mean +- sd
over seeds of test balanced accuracy, accuracy, macro AUC, the kept epoch's validation balanced
accuracy and training images per second) is printed from all of them at the end.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# params.yaml overrides per configuration, on top of the shared budget (model, sizes, epochs,
# device) that --size and --epochs set. "today" is the repo's params as they are.
CONFIGS: dict[str, dict[str, Any]] = {
    "today": {},
    "notebook": {},  # the plain loop below, not the stages
    # the budget's model with patient metadata fused (issue 31); each run is also evaluated again
    # with every field removed (rows CONFIG+no-metadata), as an image without metadata is predicted
    "metadata": {"models.<model>.metadata": ["age", "sex", "localization"]},
}
FIELDS = ["age", "sex", "localization"]
# CPU budgets: the model, its cache and input size, epochs; fine-tuning or from scratch
BUDGETS = {"resnet9": {"size": 32, "epochs": 12, "pretrained": False},
           "lite0": {"size": 128, "epochs": 8, "pretrained": True}}
PEER = REPO.parent / "shared/tools/plain_finetune.py"


def budget(params: dict, archive: Path, size: int, epochs: int, seed: int, overrides: dict[str, Any],
           model: str = "resnet9") -> dict:
    """A CPU budget (`model`, from scratch or pretrained as BUDGETS says, `size` px cache and
    input, `epochs` epochs), then a configuration's `overrides` (dotted keys)."""
    params = copy.deepcopy(params)
    params["data"]["source"] = str(archive)
    params["prepare"]["size"] = size
    params["model"] = model
    params["train"]["device"] = "cpu"
    params["train"]["seed"] = seed
    params["models"][model].update(resize=size, epochs=epochs, pretrained=BUDGETS[model]["pretrained"])
    for key, value in overrides.items():
        set_key(params, key.replace("<model>", model), value)
    if "cv" in params:  # cv.folds K set: the K-1 other folds' train_fold stages, as dvc.yaml needs them listed
        params["cv"]["other_folds"] = list(range(1, params["cv"]["folds"]))
    return params


def folds_of(params: dict) -> int:
    """cv.folds (1 for a source tree from before cross-validation)."""
    return params.get("cv", {}).get("folds", 1)


def set_key(params: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        params = params[key]
    params[last] = value


def run_stage(stage: str, project: Path, src: Path, log: Path, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "a") as out:
        result = subprocess.run([sys.executable, "-m", f"hmnist.stages.{stage}", *args], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed in {project}: see {log}")
    return time.perf_counter() - started


def data_stages(workdir: Path, params: dict, src: Path) -> Path:
    """download, prepare and split once; returns the data/ folder every run links to."""
    folds = folds_of(params)  # the split stage writes data/folds.csv for K folds
    key = f"data-{params['prepare']['size']}-{params['split']['seed']}" + (f"-cv{folds}" if folds > 1 else "")
    project = workdir / key
    if (project / "data/split.csv").exists():
        if not (project / "data/folds.csv").exists():  # made before the split stage wrote folds (train reads them)
            run_stage("split", project, src, project / "log.txt")
        index = project / "data/prepared/index.csv"
        if "age" not in index.read_text().split("\n", 1)[0].split(",") and (src / "hmnist/fusion.py").exists():
            # prepared before index.csv kept the patient metadata, which metadata runs need: the
            # same images, prepared again (the split does not change)
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            for stage in ("prepare", "split"):
                run_stage(stage, project, src, project / "log.txt")
        return project / "data"
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("download", "prepare", "split"):
        run_stage(stage, project, src, project / "log.txt")
    return project / "data"


def stage_run(workdir: Path, name: str, seed: int, params: dict, data: Path, src: Path) -> dict:
    project = workdir / "runs" / f"{name}-{seed}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "data").symlink_to(data)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = project / "log.txt"
    train_seconds = run_stage("train", project, src, log)
    for fold in params.get("cv", {}).get("other_folds", []):  # cv.folds K: evaluate then scores the K models' ensemble
        train_seconds += run_stage("train", project, src, log, "--fold", str(fold))
    run_stage("evaluate", project, src, log)
    return collect(project, data, params, train_seconds)


def tta_run(workdir: Path, run: dict, tta: str, src: Path) -> dict:
    """A finished run's checkpoint evaluated again with another TTA: TTA costs no training. The
    model's TTA is in its checkpoint (models.<name>.tta), so the copy's is changed; its
    calibration stays the one fitted on the original views. A source tree from before
    per-model TTA reads evaluate.tta instead."""
    def with_tta(params: dict) -> None:
        if "tta" in params.get("evaluate", {}):
            params["evaluate"]["tta"] = tta

    return reevaluated(workdir, run, f"tta-{tta}", src, lambda checkpoint: checkpoint.update(tta=tta), with_tta)


def uses_metadata(params: dict) -> bool:
    return bool(params["models"][params["model"]].get("metadata"))


def no_metadata_run(workdir: Path, run: dict, src: Path) -> dict:
    """A finished metadata run's checkpoint evaluated again with every field removed
    (evaluate.remove_metadata), as an image without metadata is predicted: no training."""
    return reevaluated(workdir, run, "no-metadata", src, lambda checkpoint: None,
                       lambda params: params["evaluate"].update(remove_metadata=FIELDS))


def reevaluated(workdir: Path, run: dict, label: str, src: Path, edit_checkpoint, edit_params) -> dict:
    """The evaluate stage again on a copy of a finished run's project (CONFIG+LABEL-SEED), its
    checkpoint and params.yaml changed by the two edits: figures that cost no training."""
    import torch

    source = workdir / "runs" / f"{run['config']}-{run['seed']}"
    project = workdir / "runs" / f"{run['config']}+{label}-{run['seed']}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "models").mkdir(parents=True)
    (project / "data").symlink_to((source / "data").resolve())
    for path in (source / "models").glob("*.pt"):  # model.pt, and fold1.pt ... of a cv.folds run
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        edit_checkpoint(checkpoint)
        torch.save(checkpoint, project / "models" / path.name)
    shutil.copytree(source / "dvclive", project / "dvclive")
    params = yaml.safe_load((source / "params.yaml").read_text())
    edit_params(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage("evaluate", project, src, project / "log.txt")
    result = collect(project, (source / "data").resolve(), params, None)
    return {**result, "train_seconds": run["train_seconds"], "train_images_per_second": run["train_images_per_second"],
            "loop_images_per_second": run.get("loop_images_per_second")}


def collect(project: Path, data: Path, params: dict, train_seconds: float | None) -> dict:
    """One finished run's figures, from the files its stages wrote."""
    import torch

    metrics = json.loads((project / "metrics/metrics.json").read_text())
    live = json.loads((project / "dvclive/metrics.json").read_text())
    meta = torch.load(project / "models/model.pt", map_location="cpu", weights_only=True)  # the checkpoint's metadata
    epochs = params["models"][params["model"]]["epochs"]
    folds = folds_of(params)
    images = _split_count(data, "train")
    if folds > 1:  # every non-test image trains K-1 of the K fold models
        images = (images + _split_count(data, "val")) * (folds - 1)
    speed = images * epochs / train_seconds if train_seconds else None
    curve = project / "dvclive/plots/metrics/val/balanced_accuracy.tsv"
    val_curve = [float(line.split("\t")[1]) for line in curve.read_text().splitlines()[1:]]
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"],
            "macro_auc": metrics["macro_auc"], "melanoma_sensitivity": metrics["melanoma_sensitivity"],
            "ece": metrics.get("ece"),
            # calibration (absent from runs of a source tree from before it): before and after
            **{f"{name}{kind}": metrics.get(f"{name}{kind}") for name in ("ece", "nll", "brier")
               for kind in ("_uncalibrated", "") if name != "ece" or kind},
            "calibration": metrics.get("calibration"),
            # each operating point's test sensitivity and specificity at its validation threshold
            "operating_points": {name: {k: op.get(k) for k in ("threshold", "sensitivity", "sensitivity_low",
                                                              "sensitivity_high", "specificity", "specificity_low",
                                                              "specificity_high")}
                                 for name, op in (metrics.get("operating_points") or {}).items()},
            "val_balanced_accuracy": live["best/val_balanced_accuracy"],
            # cv.folds K: each fold model's own test figures (mean, sd) and the out-of-fold ones
            "ensemble_of": metrics.get("ensemble_of", 1), "cv": metrics.get("cv"),
            # the raw weights' validation balanced accuracy, epoch by epoch
            "val_curve": val_curve,
            "best_epoch": live["best/epoch"], "kept_weights": meta.get("kept_weights", "raw"),
            "train_seconds": train_seconds, "train_images_per_second": speed,
            # the training loop alone (median epoch), as the notebook row's figure: no start-up, no validation
            "loop_images_per_second": meta.get("train_images_per_second")}


def _split_count(data: Path, name: str) -> int:
    import pandas as pd
    return int((pd.read_csv(data / "split.csv")["split"] == name).sum())


def notebook_data(size: int, archive: Path, data: Path):
    """The notebook's tensors: PIL-resized images normalised by the train images' own mean and
    sd, and its class weights ((1/frequency)^0.5, mean sample weight 1)."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from hmnist.config import CLASSES as classes
    split = pd.read_csv(data / "split.csv", dtype=str)
    pixels = {}
    with zipfile.ZipFile(archive) as z:
        names = {Path(n).stem: n for n in z.namelist() if n.startswith("HAM10000_images_part_") and n.endswith(".jpg")}
        for image_id in split["image_id"]:
            with Image.open(io.BytesIO(z.read(names[image_id]))) as image:
                pixels[image_id] = np.asarray(image.convert("RGB").resize((size, size)))  # PIL's default filter

    def tensors(name: str):
        part = split[split["split"] == name]
        x = torch.from_numpy(np.stack([pixels[i] for i in part["image_id"]])).permute(0, 3, 1, 2).float() / 255
        y = torch.tensor([classes.index(d) for d in part["dx"]])
        return x, y

    (x_train, y_train), (x_test, y_test) = tensors("train"), tensors("test")
    mean, std = x_train.mean(dim=(0, 2, 3), keepdim=True), x_train.std(dim=(0, 2, 3), keepdim=True)
    counts = torch.bincount(y_train, minlength=len(classes)).float()
    weights = (counts.sum() / counts.clamp(min=1)) ** 0.5
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, weights / weights[y_train].mean()


def random_flips(x):
    """Each NCHW image flipped left-right, then up-down, each with probability 1/2: the peers'
    only augmentation, drawn from torch's global generator as the notebooks do."""
    import torch
    flip_h, flip_v = torch.rand(len(x)) < 0.5, torch.rand(len(x)) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(3), x)
    return torch.where(flip_v.view(-1, 1, 1, 1), x.flip(2), x)


def notebook_train(x_train, y_train, weights, seed: int, epochs: int):
    """The notebook's loop; returns the model, the loop's seconds and its images per second."""
    import timm
    import torch
    import torch.nn as nn

    import hmnist.models  # noqa: F401  registers resnet9 with timm
    torch.manual_seed(seed)
    model = timm.create_model("resnet9", num_classes=len(weights))
    batch = 128
    steps = len(x_train) // batch
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, epochs=epochs, steps_per_epoch=steps)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(steps):
            rows = order[i * batch:(i + 1) * batch]
            x = random_flips(x_train[rows])
            loss = criterion(model(x), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_value_(model.parameters(), 0.1)
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - started
    return model, seconds, steps * batch * epochs / seconds


def peer_finetune(seed: int, size: int, epochs: int, archive: Path, data: Path, peer: Path, lr: float,
                  out: Path, reuse: bool = True) -> dict:
    """The plain fine-tuning loop `peer` (plain_finetune.py) run as its header says, on the same
    archive and split; its test predictions scored with the evaluate stage's definitions."""
    import numpy as np
    import pandas as pd

    from hmnist.config import CLASSES
    from hmnist.metrics import compute_metrics, expected_calibration_error
    if not peer.is_file():
        raise SystemExit(f"the plain fine-tuning loop {peer} is not there: give its path with --peer")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    if reuse and (out / "test_predictions.csv").is_file() and "img/s" in (log.read_text() if log.is_file() else ""):
        # a run of the script made by hand (its stdout saved as log.txt), scored here: the script
        # is deterministic per seed on a CPU, so running it again would only cost 10 minutes
        stdout, seconds = log.read_text(), None
    else:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(peer), str(archive), str(data / "split.csv"), str(out),
                                 "--size", str(size), "--epochs", str(epochs), "--lr", str(lr), "--seed", str(seed)],
                                capture_output=True, text=True)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"{peer} failed: see {log}")
        stdout, seconds = result.stdout, time.perf_counter() - started
    speed = float(stdout.rsplit("training ", 1)[1].split(" img/s")[0])
    frame = pd.read_csv(out / "test_predictions.csv")
    # with each image's lesion, as predictions/test.csv has it: `hmnist compare` then resamples
    # lesions, not images (a lesion's images go right or wrong together)
    lesions = pd.read_csv(data / "split.csv").set_index("image_id")["lesion_id"]
    frame.assign(lesion_id=lesions.loc[frame["image"]].to_numpy()).to_csv(out / "predictions.csv", index=False)
    probs = frame[[c.upper() for c in CLASSES]].to_numpy(np.float64)
    labels = frame["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    metrics = compute_metrics(labels, probs)
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"],
            "macro_auc": metrics["macro_auc"], "melanoma_sensitivity": metrics["melanoma_sensitivity"],
            "ece": expected_calibration_error(labels, probs), "val_balanced_accuracy": None, "best_epoch": epochs,
            "train_seconds": seconds, "train_images_per_second": speed, "loop_images_per_second": speed}


def notebook_run(seed: int, size: int, epochs: int, archive: Path, data: Path) -> dict:
    """ResNet9's peer: a plain loop as the Kaggle notebooks write it, on the same split's images."""
    import torch

    from hmnist.metrics import compute_metrics, expected_calibration_error
    x_train, y_train, x_test, y_test, weights = notebook_data(size, archive, data)
    model, seconds, speed = notebook_train(x_train, y_train, weights, seed, epochs)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x_test[i:i + 256]).softmax(1) for i in range(0, len(x_test), 256)]).numpy()
    metrics = compute_metrics(y_test.numpy(), probs)  # the evaluate stage's definitions
    metrics["ece"] = expected_calibration_error(y_test.numpy(), probs)
    return {"balanced_accuracy": metrics["balanced_accuracy"], "accuracy": metrics["accuracy"],
            "macro_auc": metrics["macro_auc"], "melanoma_sensitivity": metrics["melanoma_sensitivity"],
            "ece": metrics["ece"], "val_balanced_accuracy": None, "best_epoch": epochs, "train_seconds": seconds,
            "train_images_per_second": speed, "loop_images_per_second": speed}


def speed_rounds(configs: dict[str, dict], rounds: int, epochs: int, archive: Path, data: Path,
                 peer: Path = PEER, peer_lr: float = 2e-3) -> dict[str, list[float]]:
    """Training speed of each configuration's stage loop and of the notebook's, in the same
    process, taking turns `rounds` times (whatever else the machine runs slows all alike):
    images per second of the training loop, `epochs` epochs each, per round. A stage's figure
    is its median epoch, without validation; the notebook's, its whole loop."""
    import numpy as np

    from hmnist.config import parse_params
    from hmnist.data import load_prepared, load_split
    from hmnist.trainer import train

    first = next(iter(configs.values()))
    model = first["model"]
    images, index = load_prepared(data / "prepared")
    images, split = np.asarray(images), load_split(data / "split.csv")
    size = first["prepare"]["size"]
    if model == "lite0":  # the plain loop's own figure: its training loop alone, as it prints it
        loop = lambda r: peer_finetune(r, size, epochs, archive, data, peer, peer_lr,  # noqa: E731
                                       data.parent / "peer-speed", reuse=False)["train_images_per_second"]
    else:
        x_train, y_train, _, _, weights = notebook_data(size, archive, data)
        loop = lambda r: notebook_train(x_train, y_train, weights, r, epochs)[2]  # noqa: E731
    results: dict[str, list[float]] = {name: [] for name in [*configs, "notebook"]}
    for r in range(rounds):
        for name, params in configs.items():
            params = copy.deepcopy(params)
            params["models"][model]["epochs"] = epochs
            _, meta = train(parse_params(params), images, index, split)
            results[name].append(meta["train_images_per_second"])
        results["notebook"].append(loop(r))
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f} img/s" for name, v in results.items()),
              file=sys.stderr, flush=True)
    return results


def table(results: list[dict]) -> str:
    def cell(values: list[float], digits: int = 3) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    rows = ["| configuration | seeds | test balanced accuracy | test accuracy | test macro AUC | "
            "melanoma sensitivity | ECE | val bal. acc. (kept epoch) − test | train img/s (stage) | train img/s (loop) |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    names = list(dict.fromkeys(r["config"] for r in results))
    for name in names:
        runs = [r for r in results if r["config"] == name]
        gap = [r["val_balanced_accuracy"] - r["balanced_accuracy"] for r in runs if r["val_balanced_accuracy"] is not None]
        rows.append(f"| {name} | {len(runs)} | {cell([r['balanced_accuracy'] for r in runs])} | "
                    f"{cell([r['accuracy'] for r in runs])} | {cell([r['macro_auc'] for r in runs])} | "
                f"{cell([r['melanoma_sensitivity'] for r in runs])} | {cell([r.get('ece') for r in runs])} | "
                    f"{cell(gap)} | {cell([r['train_images_per_second'] for r in runs], 0)} | "
                    f"{cell([r.get('loop_images_per_second') for r in runs], 0)} |")
    return "\n".join(rows)


def calibration_table(results: list[dict]) -> str:
    """Per configuration: test ECE and Brier before and after calibration, and each operating
    point's test sensitivity and specificity (mean ± sd over seeds; "-" for runs without them)."""
    def cell(values: list[float | None]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    points = list(dict.fromkeys(n for r in results for n in r.get("operating_points") or {}))
    rows = ["| configuration | seeds | ECE before | ECE after | Brier before | Brier after | "
            + "".join(f"{n} sensitivity | {n} specificity | " for n in points),
            "|---|--:|--:|--:|--:|--:|" + "--:|--:|" * len(points)]
    for name in dict.fromkeys(r["config"] for r in results):
        runs = [r for r in results if r["config"] == name]
        cells = [cell([r.get("ece_uncalibrated") for r in runs]), cell([r.get("ece") if r.get("ece_uncalibrated")
                                                                         is not None else None for r in runs]),
                 cell([r.get("brier_uncalibrated") for r in runs]), cell([r.get("brier") for r in runs])]
        for point in points:
            for key in ("sensitivity", "specificity"):
                cells.append(cell([(r.get("operating_points") or {}).get(point, {}).get(key) for r in runs]))
        rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="a HAM10000 zip in the Kaggle layout (real images)")
    parser.add_argument("--configs", default="today,notebook", help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="define or extend a configuration with a params override (YAML value), repeatable")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (the split stays the same)")
    parser.add_argument("--budget", choices=BUDGETS, default="resnet9",
                        help="resnet9: from scratch at 32 px, 12 epochs; lite0: ImageNet-pretrained at 128 px, 8 epochs")
    parser.add_argument("--size", type=int, help="prepare.size and the model's resize (default: the budget's)")
    parser.add_argument("--epochs", type=int, help="(default: the budget's)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the hmnist source tree to run")
    parser.add_argument("--params", type=Path, help="base params.yaml (default: the one beside --src)")
    parser.add_argument("--workdir", type=Path, default=Path.home() / "hmnist-quality")
    parser.add_argument("--tag", default="", help="appended to each configuration's name in the results")
    parser.add_argument("--table-only", action="store_true", help="print the table of the results so far")
    parser.add_argument("--tta", choices=("flips", "dihedral"),
                        help="instead of training: evaluate the finished runs of --configs again with their checkpoints' TTA "
                             "set to this (rows named CONFIG+tta-MODE)")
    parser.add_argument("--speed", type=int, metavar="ROUNDS", default=0,
                        help="instead of quality runs: the training speed of each configuration's stage loop "
                             "and of the notebook's, taking turns ROUNDS times in one process")
    parser.add_argument("--peer", type=Path, default=PEER,
                        help="the plain fine-tuning loop, the lite0 budget's `notebook` (default: %(default)s)")
    parser.add_argument("--peer-lr", type=float, default=2e-3, help="its --lr (default: %(default)s)")
    parser.add_argument("--speed-epochs", type=int, default=2, help="epochs of each loop per --speed round")
    args = parser.parse_args(argv)
    args.size = args.size or BUDGETS[args.budget]["size"]
    args.epochs = args.epochs or BUDGETS[args.budget]["epochs"]

    def same_budget(r: dict) -> bool:  # results from before budgets had one: ResNet9's
        return r.get("model", "resnet9") == args.budget and r["size"] == args.size and r["epochs"] == args.epochs

    configs = {name: dict(overrides) for name, overrides in CONFIGS.items()}
    for item in args.set:
        name, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        configs.setdefault(name, {})[key] = yaml.safe_load(value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    if not args.table_only:
        base_file = args.params or args.src.parent / "params.yaml"
        base = yaml.safe_load(base_file.read_text())
        commit = subprocess.run(["git", "-C", str(args.src), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        if args.tta:
            for name in args.configs.split(","):
                for run in [r for r in done if r["config"] == name + args.tag and same_budget(r)]:
                    label = f"{run['config']}+tta-{args.tta}"
                    if any(r["config"] == label and r["seed"] == run["seed"] for r in done):
                        continue
                    result = tta_run(args.workdir, run, args.tta, args.src.resolve())
                    result.update(config=label, seed=run["seed"], model=args.budget, size=args.size,
                                  epochs=args.epochs, commit=commit,
                                  overrides={**run.get("overrides", {}), "tta": args.tta},
                                  date=time.strftime("%Y-%m-%d"))
                    done.append(result)
                    with open(results_file, "a") as f:
                        f.write(json.dumps(result) + "\n")
            print(table([r for r in done if same_budget(r)]))
            print()
            print(calibration_table([r for r in done if same_budget(r)]))
            return
        if args.speed:
            runs = {name + args.tag: budget(base, args.archive.resolve(), args.size, args.epochs, 0, configs[name],
                                            args.budget)
                    for name in args.configs.split(",")}
            data = data_stages(args.workdir, next(iter(runs.values())), args.src.resolve())
            speeds = speed_rounds(runs, args.speed, args.speed_epochs, args.archive.resolve(), data, args.peer, args.peer_lr)
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
            print("| loop | img/s per round | mean ± sd | / notebook, per round |\n|---|--:|--:|--:|")
            for name, values in speeds.items():
                ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(values, speeds["notebook"]))
                print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | "
                      f"{statistics.mean(values):.1f} ± {sd(values):.1f} | {ratios} |")
            return
        for name in args.configs.split(","):
            if name not in configs:
                parser.error(f"unknown configuration {name!r}: {', '.join(configs)} (or define it with --set)")
            for seed in (int(s) for s in args.seeds.split(",")):
                label = name + args.tag
                params = budget(base, args.archive.resolve(), args.size, args.epochs, seed, configs[name], args.budget)
                finished = [r for r in done if r["config"] == label and r["seed"] == seed and same_budget(r)]
                removed = label + "+no-metadata"
                if finished and uses_metadata(params) and not any(
                        r["config"] == removed and r["seed"] == seed and same_budget(r) for r in done):
                    result = no_metadata_run(args.workdir, finished[0], args.src.resolve())
                    result.update(config=removed, seed=seed, model=args.budget, size=args.size, epochs=args.epochs,
                                  commit=commit, overrides={**configs[name], "evaluate.remove_metadata": FIELDS},
                                  date=time.strftime("%Y-%m-%d"))
                    done.append(result)
                    with open(results_file, "a") as f:
                        f.write(json.dumps(result) + "\n")
                if finished:
                    continue
                data = data_stages(args.workdir, params, args.src.resolve())
                print(f"== {label} seed {seed}", file=sys.stderr, flush=True)
                if name == "notebook" and args.budget == "lite0":  # the plain fine-tuning loop
                    result = peer_finetune(seed, args.size, args.epochs, args.archive.resolve(), data, args.peer,
                                           args.peer_lr, args.workdir / "runs" / f"{label}-{seed}")
                    configs[name] = {"peer": str(args.peer), "lr": args.peer_lr}
                elif name == "notebook":
                    result = notebook_run(seed, args.size, args.epochs, args.archive, data)
                else:
                    result = stage_run(args.workdir, label, seed, params, data, args.src.resolve())
                result.update(config=label, seed=seed, model=args.budget, size=args.size, epochs=args.epochs,
                              commit=commit,
                              overrides=configs[name], date=time.strftime("%Y-%m-%d"))
                done.append(result)
                with open(results_file, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result), file=sys.stderr, flush=True)
                if uses_metadata(params) and name != "notebook":  # the same model without its metadata
                    result = no_metadata_run(args.workdir, {**result, "config": label}, args.src.resolve())
                    result.update(config=label + "+no-metadata", seed=seed, model=args.budget, size=args.size,
                                  epochs=args.epochs, commit=commit,
                                  overrides={**configs[name], "evaluate.remove_metadata": FIELDS},
                                  date=time.strftime("%Y-%m-%d"))
                    done.append(result)
                    with open(results_file, "a") as f:
                        f.write(json.dumps(result) + "\n")
                    print(json.dumps(result), file=sys.stderr, flush=True)
    print(table([r for r in done if same_budget(r)]))
    print()
    print(calibration_table([r for r in done if same_budget(r)]))


if __name__ == "__main__":
    main()
