"""ONNX export of trained checkpoints: the graph, its hmnist metadata and its self-check against
PyTorch. Reading an export back, for `hmnist predict`, is onnx_model.py's.

The graph takes what an image library gives, the whole image already resized to the model's
input side S (squashed, not cropped, as `data.decode_image` does), and returns probabilities:

    pixels                    float32 [N, S, S, 3], RGB, 0..255 (uint8 values cast to float)
    metadata                  float32 [N, W], a metadata model's only (fusion.py): its fields
                              one-hot and age in years, as onnx_model.input_encoding lays them out
    probabilities             float32 [N, 7], the ISIC 2018 classes in order (CLASSES)
    calibrated_probabilities  float32 [N, 7], the checkpoint's calibration applied

Everything between is inside: the normalisation (the checkpoint's mean and std), the
checkpoint's test-time augmentation views (key "tta", absent = none) averaged after the
softmax as `engine.predict_probs` averages them, and the calibration (key "calibration",
absent = none): softmax(log(p) / T + b) of the view-averaged probabilities p, as
`calibration.apply` computes it. Several
checkpoints (the folds of cv.folds) are one graph whose outputs are the mean of theirs, as
`hmnist predict --checkpoint a.pt --checkpoint b.pt` averages them. N is dynamic.

A metadata model's checkpoint encodes its fields with statistics of its own train rows (the
age's mean and sd, the sites seen), which differ between the folds of cv.folds. The graph's
`metadata` input is one encoding for all members, in plain units (onnx_model.input_encoding): the
fields one-hot over every value any member saw (plus unknown) and the age in years with a
missing indicator (the layout is in the file's metadata, key "metadata_input"). Inside the
graph each member maps it to its own encoding, an affine map (`member_map`), so a user or
another runtime never needs a member's statistics.

The resize to S stays outside the graph: hmnist itself decodes each image to the cache size
(`prepare_size`, PIL) and resizes that on the device with torch's antialiased bilinear filter
(`augment.ModelInput`); `OnnxModel` does exactly that before ONNX Runtime, so `hmnist predict`
gives the same CSV with the .onnx as with the .pt (within TOLERANCE on the CPU).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hmnist.errors import UserError
from hmnist.onnx_model import (CALIBRATED, FORMAT, INPUT, METADATA, OUTPUT, VERSION, OnnxModel, input_encoding,
                               metadata_columns, require_onnx)

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from hmnist.fusion import Encoding

# ONNX opset 18: ONNX Runtime 1.14 (2023) and later run it
OPSET = 18
# The largest difference allowed between ONNX Runtime's probabilities and PyTorch's, both fp32
# on the CPU (a fused convolution adds in another order). Measured, untrained models at 32 px
# with the 8 dihedral views and a calibration: 3e-8 (ResNet9, Lite0, DeiT-tiny), 1.2e-7
# (Swin-tiny); on a trained test-split run 3e-8. A wrong normalisation, view or calibration
# moves them by 1e-3 and more (tests/test_export.py).
TOLERANCE = 1e-4
# the export checks itself on at most this many test images (all of a small test split)
CHECK_IMAGES = 512


# -- the graph -------------------------------------------------------------------------------

def _graph(checkpoints: Sequence[dict[str, Any]], sources: Sequence[str], given: Encoding | None = None
           ) -> torch.nn.Module:
    """The checkpoints' models, normalisation, views and calibration as one module: pixels
    (N, S, S, 3) float 0..255 [and metadata (N, given.width), `given` encoded] ->
    (probabilities, calibrated probabilities), each (N, classes)."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(_member(c, s, given) for c, s in zip(checkpoints, sources))

        def forward(self, pixels: torch.Tensor, metadata: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            planes = pixels.permute(0, 3, 1, 2)
            outputs = [member(planes, metadata) for member in self.members]
            if len(outputs) == 1:
                return outputs[0]
            return (torch.stack([p for p, _ in outputs]).mean(0), torch.stack([c for _, c in outputs]).mean(0))

    graph = Graph().eval()
    # In-place activations (timm's EfficientNet-Lite builds its ReLU6 with inplace=True) save
    # memory in training only; the exporter's functionalisation rewrites each in-place op, a
    # third of Lite0's export (10.8 -> 7.8 s without, the same ONNX nodes and outputs:
    # BENCHMARKS.md, "ONNX export: the stage's time").
    for module in graph.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    return graph


def _member(checkpoint: dict[str, Any], source: str, given: Encoding | None) -> torch.nn.Module:
    """One checkpoint's model, normalisation, views and calibration: planes (N, 3, S, S) float
    0..255 [and the graph's metadata rows, `given` encoded] -> (probabilities, calibrated
    probabilities)."""
    import torch

    from hmnist.inference import tta_views
    from hmnist.models import damaged_checkpoint, model_from_checkpoint

    class Member(torch.nn.Module):
        def __init__(self, checkpoint: dict[str, Any], source: str):
            super().__init__()
            self.model = model_from_checkpoint(checkpoint, source)
            self.reads_metadata = _register_map(self, given, checkpoint)
            try:
                mean, std = torch.tensor(checkpoint["mean"]), torch.tensor(checkpoint["std"])
                calibration = checkpoint.get("calibration")
                self.tta = str(checkpoint.get("tta") or "none")
                scale, bias = calibration_terms(calibration, len(checkpoint["classes"]))
            except (KeyError, TypeError, ValueError) as e:
                raise damaged_checkpoint(source, e) from None
            tta_views(torch.zeros(1, 3, 2, 2), self.tta)  # an unknown mode is a UserError now, not at export
            self.register_buffer("mean", (mean * 255).view(1, 3, 1, 1).float())
            self.register_buffer("std", (std * 255).view(1, 3, 1, 1).float())
            self.calibrated = calibration is not None
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
            self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(1, -1))

        def forward(self, planes: torch.Tensor, metadata: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            x = (planes - self.mean) / self.std
            views = tta_views(x, self.tta)
            # all views as one batch: in eval mode no layer mixes images, so this equals
            # predict_probs' one pass per view, in one call of the network
            # a metadata model: its own encoding of each image's row, the same row for every view
            extra = (((metadata @ self.meta_weight + self.meta_shift).repeat(len(views), 1),)
                     if self.reads_metadata else ())
            logits = self.model(torch.cat(views) if len(views) > 1 else x, *extra)
            probs = logits.float().softmax(1).reshape(len(views), -1, logits.shape[1]).mean(0)
            if not self.calibrated:
                return probs, probs
            # the clamp: calibration.log_probs counts a probability that underflowed to 0 as 1e-12
            return probs, (probs.clamp_min(1e-12).log() * self.scale + self.bias).softmax(1)

    return Member(checkpoint, source)


def _register_map(member: torch.nn.Module, given: Encoding | None, checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint's model reads metadata; if so, `member` gets the buffers of
    `member_map` (meta_weight, meta_shift) from the graph's input to its own encoding."""
    import torch

    from hmnist.fusion import checkpoint_encoding

    own = checkpoint_encoding(checkpoint)  # None: an image-only member ignores the metadata
    if own is None:
        return False
    weight, shift = member_map(given, own)
    member.register_buffer("meta_weight", torch.from_numpy(weight))
    member.register_buffer("meta_shift", torch.from_numpy(shift).view(1, -1))
    return True


def calibration_terms(calibration: dict[str, Any] | None, classes: int) -> tuple[float, list[float]]:
    """(1 / temperature, bias) of a checkpoint's "calibration" (None: 1 and zeros)."""
    if calibration is None:
        return 1.0, [0.0] * classes
    temperature = float(calibration["temperature"])
    bias = [float(b) for b in (calibration.get("bias") or [0.0] * classes)]
    if not (temperature > 0 and math.isfinite(temperature)) or len(bias) != classes:
        raise ValueError(f"calibration {calibration!r}: needs a temperature > 0 and {classes} biases")
    return 1.0 / temperature, bias


def member_map(given: Encoding, own: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with own.encode(rows) == given.encode(rows) @ W + b for any rows: a member's own
    encoding from the graph's input. The age column is (years - mean) / sd when known and 0
    when missing: years / sd - mean / sd * (1 - missing), affine because years is 0 when
    missing; a one-hot value goes to the member's slot for it, or to its unknown slot when
    its training never saw the value."""
    weight = np.zeros((given.width, own.width), np.float32)
    shift = np.zeros(own.width, np.float32)
    ins, outs = given.layout(), own.layout()
    given_values, own_values = dict(given.vocabularies), dict(own.vocabularies)
    for name in own.fields:  # input_encoding's fields include every member's
        src, dst = ins[name], outs[name]
        if name == "age":
            weight[src.start, dst.start] = 1.0 / own.age_scale
            weight[src.start + 1, dst.start] = own.age_mean / own.age_scale
            shift[dst.start] = -own.age_mean / own.age_scale
            weight[src.start + 1, dst.start + 1] = 1.0
            continue
        slots = {v: i for i, v in enumerate(own_values[name])}
        unknown = dst.stop - 1
        for i, value in enumerate(given_values[name]):
            weight[src.start + i, dst.start + slots[value] if value in slots else unknown] = 1.0
        weight[src.stop - 1, unknown] = 1.0
    return weight, shift


# -- export ----------------------------------------------------------------------------------

def export(checkpoints: Sequence[dict[str, Any]], sources: Sequence[str], extra: dict[str, str] | None = None
           ) -> bytes:
    """The ONNX model of `checkpoints` (one, or a cross-validation run's folds, averaged), with
    hmnist's metadata and `extra` metadata, serialised. `sources` name them in errors."""
    require_onnx()
    import torch

    first = checkpoints[0]
    for checkpoint, source in zip(checkpoints[1:], sources[1:]):
        for key in ("input_size", "prepare_size", "classes"):
            if checkpoint.get(key) != first.get(key):
                raise UserError(f"{source} and {sources[0]} differ in {key}: one export holds checkpoints of one "
                                f"input size, cache size and class list")
    try:
        given = input_encoding(checkpoints)
    except (KeyError, TypeError, ValueError) as e:
        from hmnist.models import damaged_checkpoint

        raise damaged_checkpoint(sources[0], e) from None
    graph = _graph(checkpoints, sources, given)
    size = int(first["input_size"])
    example, names, dynamic = _example_inputs(size, given)
    # the exporter narrates each step on stdout; the stage says what matters itself. Both inputs
    # share the batch axis, which torch's exporter remarks on in a warning that asks nothing of a user.
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
        program = torch.onnx.export(graph, example, input_names=names, output_names=[OUTPUT, CALIBRATED],
                                    dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)
    proto = program.model_proto
    _describe(proto, checkpoints, given, extra)
    return proto.SerializeToString()


def _example_inputs(size: int, given: Encoding | None) -> tuple[tuple[torch.Tensor, ...], list[str], dict]:
    """The exporter's example inputs, their names and dynamic axes: pixels, and a metadata
    model's rows; the batch axis is dynamic and shared."""
    import torch

    batch = torch.export.Dim("batch")
    example, names, dynamic = (torch.rand(2, size, size, 3) * 255,), [INPUT], {"pixels": {0: batch}}
    if given is not None:
        example += (torch.from_numpy(given.encode(None, 2)),)
        names.append(METADATA)
        dynamic["metadata"] = {0: batch}
    return example, names, dynamic


def _describe(proto, checkpoints: Sequence[dict[str, Any]], given: Encoding | None, extra: dict[str, str] | None
              ) -> None:
    """The ONNX model's producer, doc string and metadata_props: hmnist's, then `extra`."""
    first, size = checkpoints[0], int(checkpoints[0]["input_size"])
    proto.producer_name = "hmnist"
    reads = "" if given is None else (f" Input {METADATA}: float32 [N, {given.width}], the patient metadata "
                                      f"laid out as metadata_props' metadata_columns says.")
    proto.doc_string = (f"HAM10000 skin-lesion classifier ({first['model_name']}: {first['arch']}). Input {INPUT}: "
                        f"float32 [N, {size}, {size}, 3], RGB 0..255, the whole image resized to {size}x{size}.{reads} "
                        f"Outputs {OUTPUT} and {CALIBRATED}: float32 [N, {len(first['classes'])}], classes "
                        f"{', '.join(first['classes'])}.")
    meta = metadata(checkpoints)
    if given is not None:
        meta["metadata_input"] = json.dumps(given.to_checkpoint())
        meta["metadata_columns"] = json.dumps(metadata_columns(given))
    meta.update(extra or {})
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def metadata(checkpoints: Sequence[dict[str, Any]]) -> dict[str, str]:
    """hmnist's metadata_props of an export (all strings, JSON for structures)."""
    from hmnist.models import CHECKPOINT_VERSION

    from hmnist.calibration import ensemble_operating_points

    first = checkpoints[0]
    ttas = sorted({str(c.get("tta") or "none") for c in checkpoints})
    return {
        "hmnist_format": FORMAT,
        "hmnist_version": str(VERSION),
        "checkpoint_version": str(first.get("version", CHECKPOINT_VERSION)),
        "model_name": str(first["model_name"]),
        "arch": str(first["arch"]),
        "classes": json.dumps(list(first["classes"])),
        "input_size": str(int(first["input_size"])),
        "prepare_size": str(int(first["prepare_size"])),
        "input_layout": "NHWC float32 RGB 0..255",
        "mean": json.dumps(list(first["mean"])),  # applied inside the graph; for reference
        "std": json.dumps(list(first["std"])),
        "tta": ttas[0] if len(ttas) == 1 else json.dumps([str(c.get("tta") or "none") for c in checkpoints]),
        # one entry per checkpoint (null: none), as each member's calibration is its own
        "calibration": json.dumps([c.get("calibration") for c in checkpoints]),
        # an ensemble's: those every member has, at the mean threshold, as predict takes them
        "operating_points": json.dumps(ensemble_operating_points(list(checkpoints))),
        "members": str(len(checkpoints)),
    }


def reference_probs(checkpoints: Sequence[dict[str, Any]], images: np.ndarray, batch_size: int = 64,
                    rows: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, calibrated probabilities) of uint8 NHWC cache `images`, computed the way
    evaluate and predict compute them (engine.inference_model, engine.predict_probs), on the CPU
    in fp32, each checkpoint with its own views, calibration and metadata encoding of `rows`
    (the images' metadata; None: every field missing), averaged over checkpoints."""
    import torch

    from hmnist.calibration import apply
    from hmnist.fusion import encoded_for
    from hmnist.inference import inference_model, predict_probs

    device = torch.device("cpu")
    probs, calibrated = [], []
    for checkpoint in checkpoints:
        model, model_input = inference_model(checkpoint, device)
        p = predict_probs(model, torch.from_numpy(np.ascontiguousarray(images)), model_input, batch_size, device,
                          tta=str(checkpoint.get("tta") or "none"),
                          metadata=encoded_for(checkpoint, rows, len(images)))
        probs.append(p)
        calibrated.append(apply(p, checkpoint.get("calibration")))
    return np.mean(probs, axis=0), np.mean(calibrated, axis=0)


def check(onnx_model: bytes, checkpoints: Sequence[dict[str, Any]], images: np.ndarray, what: str,
          rows: pd.DataFrame | None = None) -> float:
    """The largest |ONNX Runtime - PyTorch| over both outputs on uint8 NHWC cache `images` (at
    the checkpoints' prepare_size) and, for a metadata model, their metadata `rows` (None:
    every field missing), which must be within TOLERANCE: else a UserError."""
    model = OnnxModel(onnx_model, what)
    ort_probs, ort_calibrated = model.run_cache(images, metadata=model.encoded_metadata(rows, len(images)))
    ref_probs, ref_calibrated = reference_probs(checkpoints, images, rows=rows)
    worst = float(max(np.abs(ort_probs - ref_probs).max(), np.abs(ort_calibrated - ref_calibrated).max()))
    if not worst <= TOLERANCE:  # NaN fails too
        raise UserError(f"the ONNX export of {checkpoints[0]['arch']} is wrong: ONNX Runtime's probabilities differ "
                        f"from PyTorch's by up to {worst:.2g} on {len(images)} test images (tolerance {TOLERANCE:g}); "
                        f"nothing was written")
    return worst
