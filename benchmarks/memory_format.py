"""CPU train-step speed of each model in the default (NCHW) and channels_last memory layouts.

    python benchmarks/memory_format.py [--rounds 3] [--steps 4] [--threads 2]

A train step (forward, backward, AdamW) on random inputs at each model's CPU budget size, the
two layouts taking turns in one process, so whatever else the machine runs slows both alike.
Prints images per second per round and the channels_last / default ratio: the figures behind
augment.memory_format's choice (BENCHMARKS.md, "Memory layout on the CPU").
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hmnist.models  # noqa: F401  registers resnet9
import timm

# (arch, input size, batch): the sizes the CPU quality budgets train at, and DeiT's own
CASES = [("resnet9", 32, 32), ("resnet9", 128, 32), ("tf_efficientnet_lite0", 128, 32),
         ("deit_tiny_patch16_224", 224, 32)]


def images_per_second(model, x, y, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    for i in range(steps + 1):
        if i == 1:  # the first step allocates: not timed
            started = time.perf_counter()
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", default=",".join(sorted({a for a, _, _ in CASES})))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps per measurement")
    print("| model | input | batch | NCHW img/s | channels_last img/s | ratio per round | mean ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for arch, size, batch in CASES:
        if arch not in args.archs.split(","):
            continue
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=7)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 7, (batch,))
        speeds = {"nchw": [], "cl": []}
        for _ in range(args.rounds):
            for name, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
                model = model.to(memory_format=fmt)
                speeds[name].append(images_per_second(model, x.contiguous(memory_format=fmt), y, args.steps))
        ratios = [c / n for c, n in zip(speeds["cl"], speeds["nchw"])]
        print(f"| {arch} | {size} | {batch} | {statistics.mean(speeds['nchw']):.1f} | {statistics.mean(speeds['cl']):.1f} "
              f"| {', '.join(f'{r:.2f}' for r in ratios)} | {statistics.mean(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
