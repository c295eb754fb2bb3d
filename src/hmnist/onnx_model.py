"""Reading an hmnist ONNX export back (onnx_export.py makes it), for `hmnist predict` and
`hmnist.load`: its format (what the graph takes and returns, a metadata model's second input
included, the hmnist metadata keys), the checks that a file is such an export, and ONNX Runtime
running it on the CPU after the same decode and resize as evaluation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hmnist.errors import UserError, first_line

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from hmnist.fusion import Encoding

FORMAT = "hmnist-onnx"
# the export's own format: what the graph takes and returns, and the metadata keys below.
# Raise it when either changes; readers refuse versions not in READS with a one-line error.
# 2: a metadata model's graph has a second input, METADATA (key "metadata_input"); an
# image-only export is laid out as in 1, so 1 is still read.
VERSION = 2
READS = ("1", "2")
INPUT, OUTPUT, CALIBRATED = "pixels", "probabilities", "calibrated_probabilities"
METADATA = "metadata"


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  torch's ONNX exporter
    except ImportError as e:
        raise UserError(f"ONNX export and inference need the onnx, onnxruntime and onnxscript packages "
                        f"({first_line(e)}): pip install -e . (they are hmnist dependencies)") from None


# -- the metadata input of a metadata model's graph ---------------------------------------------

def input_encoding(checkpoints: Sequence[dict[str, Any]]) -> Encoding | None:
    """The graph's `metadata` input: every field some member reads, each categorical one-hot
    over the values any member saw in training (plus unknown), the age in years (0 when
    missing) and its missing indicator: fusion.Encoding with mean 0 and scale 1. None when no
    member reads metadata."""
    from hmnist.fusion import Encoding, check_fields, checkpoint_encoding

    own = [e for e in map(checkpoint_encoding, checkpoints) if e is not None]
    if not own:
        return None
    fields = check_fields([f for e in own for f in e.fields])  # each once, in the canonical order
    vocabularies = tuple((f, tuple(sorted({v for e in own for v in dict(e.vocabularies).get(f, ())})))
                         for f in fields if f != "age")
    return Encoding(fields, 0.0, 1.0, vocabularies)


def metadata_columns(given: Encoding) -> list[str]:
    """What each column of the graph's metadata input holds, for a user without hmnist."""
    names = []
    for name in given.fields:
        if name == "age":
            names += ["age in years (0 when unknown)", "age unknown (1 or 0)"]
        else:
            names += [f"{name} = {value}" for value in dict(given.vocabularies)[name]] + [f"{name} unknown"]
    return names


# -- reading an export ---------------------------------------------------------------------------

class OnnxModel:
    """An hmnist ONNX export, ready for ONNX Runtime (on the CPU): `hmnist predict --checkpoint
    model.onnx` and `hmnist.load("model.onnx")`. It has a checkpoint's descriptive attributes
    (classes, model_name, arch, input_size, prepare_size, tta, calibration, operating_points)."""

    model = model_input = None  # no torch model: class-activation maps need the .pt

    def __init__(self, source: str | os.PathLike | bytes, name: str | None = None):
        require_onnx()
        import onnx

        if isinstance(source, bytes):
            data, self.path = source, Path(name or "model.onnx")
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise UserError(f"checkpoint {self.path} not found: export one with `dvc repro export`")
            data = self.path.read_bytes()
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file at all
            raise UserError(f"{self.path} is not a readable ONNX file (truncated or another format): "
                            f"{type(e).__name__}") from None
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        self._describe(self.metadata)
        self._check_graph(proto.graph)
        self.session = self._session(data)

    def _describe(self, props: dict[str, str]) -> None:
        """The checkpoint's attributes, from the export's hmnist metadata, once its versions are ours."""
        if props.get("hmnist_format") != FORMAT:
            raise UserError(f"{self.path} is not an hmnist export (no hmnist metadata in it): predict with the ONNX "
                            f"file the export stage writes (export/model.onnx), or with a checkpoint (.pt)")
        if props.get("hmnist_version") not in READS:
            raise UserError(f"{self.path} is hmnist export version {props.get('hmnist_version')}, this hmnist reads "
                            f"version {' or '.join(READS)}: export its checkpoint again (`dvc repro export`)")
        from hmnist.models import CHECKPOINT_VERSION

        if props.get("checkpoint_version") != str(CHECKPOINT_VERSION):
            raise UserError(f"{self.path} was exported from a version {props.get('checkpoint_version')} checkpoint, "
                            f"this hmnist reads version {CHECKPOINT_VERSION}: train and export it again")
        try:
            self.classes = [str(c) for c in json.loads(props["classes"])]
            self.model_name, self.arch = props["model_name"], props["arch"]
            self.input_size, self.prepare_size = int(props["input_size"]), int(props["prepare_size"])
            self.tta = props["tta"]
            self.calibration = json.loads(props["calibration"])
            self.operating_points = json.loads(props["operating_points"])
            self.members = int(props["members"])
            # a metadata model's: the encoding of its second input (fusion.Encoding, age in years)
            from hmnist.fusion import Encoding

            given = props.get("metadata_input")
            self.encoding = Encoding.from_checkpoint(json.loads(given)) if given else None
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.path} is a damaged hmnist export: {type(e).__name__} {first_line(e, '')}".rstrip()
                            ) from None
        self.state = {"operating_points": self.operating_points}  # what predict's ensemble_operating_points reads

    def _check_graph(self, graph) -> None:
        """The graph's input and outputs must be the ones its metadata describes."""
        inputs, outputs = _shapes(graph.input), _shapes(graph.output)
        expected_in = {INPUT: [None, self.input_size, self.input_size, 3]}
        if self.encoding is not None:
            expected_in[METADATA] = [None, self.encoding.width]
        expected_out = {OUTPUT: [None, len(self.classes)], CALIBRATED: [None, len(self.classes)]}
        if inputs != expected_in or outputs != expected_out:
            shown = lambda shapes: ", ".join(f"{k} {v}" for k, v in shapes.items()).replace("None", "N")  # noqa: E731
            raise UserError(f"{self.path}'s graph ({shown(inputs)} -> {shown(outputs)}) is not the one its hmnist "
                            f"metadata describes ({shown(expected_in)} -> [N, {len(self.classes)}]): another "
                            f"architecture's graph; export the checkpoint again")

    def _session(self, data: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # as many threads as torch uses (OMP_NUM_THREADS): ONNX Runtime alone would take every core
        import torch

        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers say nothing to a user
        try:
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime's own errors: a graph it cannot run
            raise UserError(f"ONNX Runtime cannot run {self.path}: {first_line(e)}") from None

    def __repr__(self) -> str:
        return f"OnnxModel({self.model_name}: {self.arch} at {self.input_size}px, from {self.path})"

    def encoded_metadata(self, rows: pd.DataFrame | None, count: int) -> np.ndarray | None:
        """As a checkpoint's member: a metadata model's second input for `rows` (`count`
        all-missing rows when None); None for an image-only export."""
        return None if self.encoding is None else self.encoding.encode(rows, count)

    def outputs(self, images: torch.Tensor, batch_size: Any, device: Any = None, tta: str | None = None,
                metadata: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """`hmnist predict`'s interface (as its checkpoints'): (probabilities, calibrated
        probabilities) of a uint8 NHWC cache-size batch, with the views built into the graph
        (predict refuses another `tta` before it gets here), and a metadata model's encoded
        rows. `batch_size`: a number or engine.BatchSize; ONNX Runtime runs on the CPU,
        whatever `device`."""
        return self.run_cache(images.numpy(), int(getattr(batch_size, "size", batch_size)), metadata)

    def run(self, pixels: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, calibrated probabilities) of float32 NHWC `pixels` at the input size,
        and for a metadata model the rows of its second input (None: every field missing)."""
        feeds = {INPUT: np.ascontiguousarray(pixels, np.float32)}
        if self.encoding is not None:
            if metadata is None:
                metadata = self.encoding.encode(None, len(pixels))
            feeds[METADATA] = np.ascontiguousarray(np.asarray(metadata), np.float32)
        probs, calibrated = self.session.run([OUTPUT, CALIBRATED], feeds)
        return probs, calibrated

    def run_cache(self, images: np.ndarray, batch_size: int = 64, metadata: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Both outputs for uint8 NHWC `images` at the cache size, resized as evaluation resizes
        them (augment.ModelInput.planes: torch's antialiased bilinear, on the CPU); `metadata`:
        a metadata model's encoded rows, one per image (None: every field missing)."""
        import torch

        from hmnist.augment import ModelInput

        probs, calibrated = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            planes = ModelInput.planes(batch, self.input_size)
            rows = None if metadata is None else np.asarray(metadata)[start:start + batch_size]
            p, c = self.run(planes.permute(0, 2, 3, 1).numpy(), rows)
            probs.append(p)
            calibrated.append(c)
        if not probs:
            empty = np.zeros((0, len(self.classes)), np.float32)
            return empty, empty
        return np.concatenate(probs), np.concatenate(calibrated)


def _shapes(values) -> dict[str, list[int | None]]:
    """name -> dims (None for a symbolic one) of a graph's inputs or outputs."""
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in values}


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"
