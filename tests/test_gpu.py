"""CUDA-only checks, skipped where there is no GPU (CI never has one); run on a lent GPU."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_params
from hmnist.config import CLASSES, parse_params
from hmnist.trainer import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def synthetic_cache(n: int, size: int, learnable: bool = False):
    """n images, 1 per lesion, every 5th in val. `learnable`: each class drawn as its own
    coloured lesion (tests/synthetic.py), else random pixels."""
    from synthetic import lesion_image

    rng = np.random.default_rng(0)
    labels = np.arange(n) % len(CLASSES)
    index = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(n)],
                          "lesion_id": [f"HAM_{i:07d}" for i in range(n)],
                          "dx": [CLASSES[l] for l in labels], "label": labels})
    if learnable:
        images = np.stack([np.asarray(lesion_image(row.dx, row.lesion_id, row.image_id, (size, size)))
                           for row in index.itertuples()])
    else:
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    split = index[["image_id", "lesion_id", "dx"]].assign(split=np.where(np.arange(n) % 5 == 0, "val", "train"))
    return images, index, split


def cuda_params(model: str, **settings):
    raw = tiny_params("unused")
    raw["model"] = model
    raw["train"]["device"] = "cuda"
    raw["models"][model].update(settings)
    return parse_params(raw)


def test_real_out_of_memory_falls_back_to_micro_batches(capsys):
    """Cap this process at 4 GiB: Swin-tiny at batch 256 (~15 GiB of activations) must OOM and
    go on in micro-batches with the same effective batch."""
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        images, index, split = synthetic_cache(640, 224)
        _, meta = train(cuda_params("swin", resize=224, batch_size=256, epochs=1), images, index, split)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert meta["micro_batches"] > 1 and meta["effective_batch_size"] == 256
    assert "out of GPU memory at batch 256" in capsys.readouterr().err


def test_cuda_training_under_bf16_learns():
    """A learnable task (each class its own colour and shape) under bf16 autocast: well above
    chance (1/7) on held-out images, so a broken forward, loss or optimizer step shows."""
    images, index, split = synthetic_cache(700, 64, learnable=True)
    model, meta = train(cuda_params("resnet9", resize=64, batch_size=64, epochs=4), images, index, split)
    assert next(model.parameters()).is_cuda
    assert meta["val_balanced_accuracy"] >= 0.85, meta


def test_deterministic_gpu_runs_are_identical():
    images, index, split = synthetic_cache(512, 64, learnable=True)
    params = cuda_params("swin", resize=64, batch_size=32, epochs=1, drop_path_rate=0.1)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, deterministic=True))
    first, _ = train(params, images, index, split)
    second, _ = train(params, images, index, split)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_cuda_augment_matches_its_definition():
    from hmnist.augment import Augment, ModelInput, colour_affine
    from test_augment import PIXEL_HIGH, PIXEL_LOW, jitter_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    batch = torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8, device="cuda", generator=g)
    augment = Augment(torch.Generator(device="cuda").manual_seed(1))
    u = augment.draw(len(batch))
    warped = augment.geometry(batch.permute(0, 3, 1, 2).float(), u)
    matrix, offset = augment.colour(warped, u)
    fused = colour_affine(warped, matrix, offset, PIXEL_LOW.cuda(), PIXEL_HIGH.cuda())
    b, c, s = (factor[:, 0].double() for factor in (u.brightness, u.contrast, u.saturation))
    reference = jitter_reference(warped.double(), b, c, s)
    assert ((fused.double() - reference).norm() / reference.norm()) < 1e-5
    x = ModelInput(224, (0.5,) * 3, (0.25,) * 3, torch.device("cuda"))(batch, augment)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
