"""ResNet9's training step on the CPU at several batch sizes: images per second of the model
alone (forward, backward, Adam step on a batch already in memory), the ceiling any training
loop on this machine can reach at that batch.

    python benchmarks/cpu_batch.py                      # batches 16, 32, 64, 128 at 32 px
    python benchmarks/cpu_batch.py --batches 32,128 --size 32 --steps 12

Sizes take turns for `--rounds` rounds, so whatever else the machine runs slows all alike;
each figure is the median step of a size over all its rounds (the first steps of a size in a
round, `--warmup`, are not counted: allocator and oneDNN set-up).
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import hmnist.models  # noqa: F401  registers resnet9 with timm


def step_speeds(batch: int, size: int, steps: int, warmup: int, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> list[float]:
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 7, (batch,))
    speeds = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            speeds.append(batch / (time.perf_counter() - started))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,32,64,128")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model("resnet9", num_classes=7).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [int(b) for b in args.batches.split(",")]
    speeds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.rounds):
        for batch in batches:
            speeds[batch] += step_speeds(batch, args.size, args.steps, args.warmup, model, optimizer)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.size} px")
    print("| batch | img/s (median step) | steps per 12 epochs of 4,189 images |\n|--:|--:|--:|")
    for batch in batches:
        print(f"| {batch} | {statistics.median(speeds[batch]):.1f} | {12 * (4189 // batch):,} |")


if __name__ == "__main__":
    main()
