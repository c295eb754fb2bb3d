"""CPU inference speed, PyTorch eager against ONNX Runtime, of the model `dvc repro` trains.

    python benchmarks/onnx_speed.py [--checkpoint models/model.pt] [--batches 1,64] [--rounds 5]
                                    [--seconds 10] [--threads N] [--json out.json]
    python benchmarks/onnx_speed.py --quick      (seconds: a check that it runs, not a measurement)

Both ways do what `hmnist predict` does with a batch of decoded images (uint8, at the cache size
prepare.size): resize to the model's input and normalise, the checkpoint's test-time
augmentation views, softmax and their mean, and the calibration. PyTorch eager: engine's
predict_probs and calibration.apply, fp32, the model in the layout the CPU inference uses.
ONNX Runtime: the export stage's graph (onnx_export.export) through onnx_model.OnnxModel,
whose resize to the input size is torch's, as predict's. Both use the same number of threads.
The two take turns, batch by batch, for `--seconds` each per round, so whatever else the
machine runs slows both alike; each reports its median round, in images per second.

Without --checkpoint the model is the params.yaml's selected model (lite0 by default), built
with random weights at its resize, TTA and a temperature calibration: weights' values do not
change the speed. The results go in BENCHMARKS.md ("ONNX export: CPU inference"); run it on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hmnist.calibration import apply
from hmnist.config import CLASSES, load_params
from hmnist.inference import inference_model, predict_probs
from hmnist.models import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, create_model, data_config, load_checkpoint
from hmnist.onnx_export import export
from hmnist.onnx_model import OnnxModel

REPO = Path(__file__).resolve().parents[1]


def random_checkpoint(params_file: Path, resize: int | None = None, prepare_size: int | None = None) -> dict:
    """The selected model of `params_file` as a checkpoint with random weights (no download)."""
    params = load_params(params_file)
    config = params.model_config
    if resize:
        config = type(config)(**{**asdict(config), "resize": resize})
    torch.manual_seed(0)
    model = create_model(config, pretrained=False).eval()
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_name": params.model,
            "arch": config.arch, "model_config": asdict(config), "classes": list(CLASSES),
            "input_size": config.resize, "prepare_size": prepare_size or params.prepare.size,
            **{k: list(v) for k, v in data_config(model).items()}, "tta": config.tta,
            "calibration": {"method": "temperature", "temperature": 1.5, "bias": [0.0] * len(CLASSES)},
            "operating_points": [], "state_dict": model.state_dict()}


def timed(work, images: np.ndarray, seconds: float) -> float:
    """Images per second of `work(images)`, repeated for at least `seconds` (and twice)."""
    work(images)  # the first call allocates and, for ONNX Runtime, plans: not timed
    done, started = 0, time.perf_counter()
    while done < 2 * len(images) or time.perf_counter() - started < seconds:
        work(images)
        done += len(images)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained checkpoint (.pt); default: params.yaml's model, random weights")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="without --checkpoint: whose model")
    parser.add_argument("--batches", default="1,64", help="batch sizes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="per way, batch size and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run that only shows the script works: 32 px, batches 1 and 4, one short round")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds, args.seconds = "1,4", 1, 0.0
    torch.set_num_threads(args.threads)  # OnnxModel gives ONNX Runtime as many

    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
    else:
        checkpoint = random_checkpoint(Path(args.params), *((32, 48) if args.quick else ()))
    device = torch.device("cpu")
    model, model_input = inference_model(checkpoint, device)
    onnx_model = OnnxModel(export([checkpoint], [args.checkpoint or "random weights"]), "model.onnx")
    tta, calibration = str(checkpoint.get("tta") or "none"), checkpoint.get("calibration")
    side = int(checkpoint["prepare_size"])
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)

    def eager(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probs = predict_probs(model, torch.from_numpy(images), model_input, len(images), device, tta=tta)
        return apply(probs, calibration)

    def onnx(images: np.ndarray) -> np.ndarray:
        return onnx_model.run_cache(images, len(images))[1]

    import onnxruntime

    header = (f"{checkpoint['model_name']} ({checkpoint['arch']}) at {checkpoint['input_size']}px from "
              f"{side}px images, TTA {tta}; {args.threads} threads; torch {torch.__version__}, onnxruntime "
              f"{onnxruntime.__version__}; {platform.processor() or platform.machine()}")
    print(header)
    print("| batch | PyTorch eager img/s | ONNX Runtime img/s | ONNX / eager | rounds |")
    print("|--:|--:|--:|--:|--:|")
    results = []
    for batch in batches:
        images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        # the same probabilities, or the speeds would compare different work
        np.testing.assert_allclose(onnx(images), eager(images), atol=1e-4)
        speeds: dict[str, list[float]] = {"eager": [], "onnx": []}
        for round_ in range(args.rounds):
            ways = (("eager", eager), ("onnx", onnx)) if round_ % 2 == 0 else (("onnx", onnx), ("eager", eager))
            for name, work in ways:
                speeds[name].append(timed(work, images, args.seconds))
        eager_speed, onnx_speed = statistics.median(speeds["eager"]), statistics.median(speeds["onnx"])
        print(f"| {batch} | {eager_speed:.1f} | {onnx_speed:.1f} | {onnx_speed / eager_speed:.2f} | {args.rounds} |",
              flush=True)
        results.append({"batch": batch, "eager_images_per_second": eager_speed,
                        "onnx_images_per_second": onnx_speed, "rounds": speeds})
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": header, "quick": args.quick, "results": results}, indent=2))


if __name__ == "__main__":
    main()
