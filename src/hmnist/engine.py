"""Device, precision, determinism and random state: what every stage and command that runs a
model shares. The device is decided here (`resolve_device`), never in a stage; the forward pass
runs under `autocast`, bf16 on the GPU, fp32 on the CPU. The training step's pieces are in
`hmnist.training`, inference in `hmnist.inference`.
"""
from __future__ import annotations

import contextlib
import logging
import os
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator

import numpy as np
import torch

from hmnist.errors import UserError, first_line

log = logging.getLogger(__name__)


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """`auto` is CUDA when present; `cuda:K` the K-th visible GPU; `setting` names where the
    choice came from, for the error."""
    if name.startswith("cuda:") and name[5:].isdigit():
        if int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"{setting} is {name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        return torch.device(name)
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"{setting} must be one of auto, cuda, cuda:K, cpu, got {name!r}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"{setting} is cuda but no CUDA GPU is visible: set {setting} to auto or cpu")
        return torch.device("cuda")
    if name == "auto":
        log.info("notice: no CUDA GPU found, running on the CPU (slow for the transformers)")
    return torch.device("cpu")


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on the GPU (no loss scaler needed); fp32 on the CPU, where bf16 is slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The uint8 NHWC cache as a tensor on `device`, copied once."""
    # a slice of the read-only memory-mapped cache is copied here; a gathered subset already is one
    images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    tensor = torch.from_numpy(images)
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """With `enabled`, only deterministic kernels (PyTorch raises on an op that has none), so
    two GPU runs of the same params give the same weights; the previous settings come back
    after. cuBLAS reads its workspace setting when it starts, so this must wrap the first CUDA
    work of the process to take effect there."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except RuntimeError as e:
        if "deterministic" not in str(e):
            raise
        raise UserError(f"an operation of this model has no deterministic implementation on this device "
                        f"({first_line(e, type(e).__name__)}): set train.deterministic to false") from None
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every random generator a training run draws from: torch's CPU generator (weight init,
    dropout and drop path on the CPU), each CUDA device's (dropout and drop path on the GPU),
    numpy's (timm's Mixup) and the given ones (sampling, augmentation). A resume restores them
    all, so it continues exactly as the uninterrupted run would have."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                             "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    _set_numpy_state(state["numpy"])
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved.cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _numpy_state() -> dict[str, Any]:
    # as tensors and plain numbers, so that the resume file loads with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))
