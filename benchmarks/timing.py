"""Timing helpers of the benchmark scripts: steps timed in interleaved rounds, profiled, the
machine described, the result written."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


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


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    import timm
    info["timm"] = timm.__version__
    return info


def write_result(result: dict[str, Any], path: Path | None) -> None:
    """The result as JSON on stdout, and in `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
