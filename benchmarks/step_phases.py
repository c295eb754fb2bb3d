"""Where a CPU training step of the train stage goes: ResNet9 at 32 px, the stage's own pieces
(ModelInput with flips-only Augment, SmoothedCrossEntropy with class weights, timm's value
clipping, AdamW over timm's parameter groups) against the notebook's optimizer (Adam with L2),
milliseconds per step by phase, on random uint8 images.

    python benchmarks/step_phases.py                 # batch 128, 15 steps (3 warm-up), 2 rounds
    python benchmarks/step_phases.py --batch 32
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from timm.utils import dispatch_clip_grad

import hmnist.models  # noqa: F401  registers resnet9 with timm
from hmnist.augment import Augment, ModelInput
from hmnist.training import SmoothedCrossEntropy, class_weights, param_groups

PHASES = ("input", "forward", "loss", "backward", "clip", "optimizer")


def phases(optimizer_kind: str, batch: int, steps: int, warmup: int, images: torch.Tensor,
           labels: torch.Tensor) -> tuple[dict[str, float], float]:
    model = timm.create_model("resnet9", num_classes=7)
    model_input = ModelInput(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.device("cpu"))
    augment = Augment(torch.Generator().manual_seed(1), (1.0, 1.0), 0.0, 0.0)
    weights = class_weights(labels.numpy(), 0.5)
    criterion = SmoothedCrossEntropy(weights, 0.1)
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(param_groups(model, 4e-3, 5e-4, 1.0), lr=4e-3)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=4e-3, weight_decay=1e-4)
    totals = dict.fromkeys(PHASES, 0.0)
    for i in range(warmup + steps):
        rows = torch.randint(0, len(images), (batch,))
        marks = [time.perf_counter()]
        x = model_input(images[rows], augment)
        marks.append(time.perf_counter())
        logits = model(x)
        marks.append(time.perf_counter())
        loss = criterion(logits.float(), labels[rows]).sum() / weights[labels[rows]].sum()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        dispatch_clip_grad(model.parameters(), 0.1, mode="value")
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if i >= warmup:
            for name, start, end in zip(PHASES, marks, marks[1:]):
                totals[name] += end - start
    return {k: 1000 * v / steps for k, v in totals.items()}, batch * steps / sum(totals.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1024, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 7, (1024,))
    print(f"| round | optimizer | img/s | {' | '.join(f'{p} ms' for p in PHASES)} |")
    print("|--:|---|--:|" + "--:|" * len(PHASES))
    for r in range(args.rounds):
        for kind in ("adamw", "adam"):
            ms, speed = phases(kind, args.batch, args.steps, args.warmup, images, labels)
            print(f"| {r + 1} | {kind} | {speed:.1f} | {' | '.join(f'{ms[p]:.1f}' for p in PHASES)} |", flush=True)


if __name__ == "__main__":
    main()
