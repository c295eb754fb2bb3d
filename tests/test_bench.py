"""benchmarks/train_step.py: its "pipeline" way must time the train stage's own step."""
import json
import sys

import pytest
import torch
import yaml

from conftest import REPO, prepared_split, tiny_params
from hmnist.config import parse_params
from hmnist.trainer import _setup, train

sys.path.insert(0, str(REPO / "benchmarks"))
import train_step  # noqa: E402  (a script beside the other benchmarks, not a package module)


def test_bench_step_is_the_stages_step(tmp_path, synthetic_zip):
    """The bench's step, N times from the stage's set-up, leaves the weights the stage's own
    epoch of N steps leaves, bit for bit: a bench that rebuilt the step (another augmentation,
    loss, optimizer or schedule, another batch order) would leave other weights."""
    images, index, split = prepared_split(tmp_path / "prepared", synthetic_zip)
    raw = tiny_params(synthetic_zip)
    raw["models"]["resnet9"]["epochs"] = 1
    params = parse_params(raw)
    assert params.train.select == "last" and params.train.ema_decay == 0  # the epoch's raw weights are kept
    stage_model, _ = train(params, images, index, split)

    run = _setup(params, images, index, split)
    step = train_step.stage_step(run)
    assert run.steps_per_epoch >= 2
    for _ in range(run.steps_per_epoch):
        step()
    bench_weights = run.optimisation.model.state_dict()
    for name, weights in stage_model.state_dict().items():
        assert torch.equal(weights, bench_weights[name]), name


def test_bench_runs_the_params_own_step(tmp_path):
    """The whole bench, tiny, on CPU: the step it times is built from the params file it names."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(rotation=30, color_jitter=0.1)  # not the file's flips-only default
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "bench.json"
    train_step.main(["--model", "resnet9", "--ways", "model,pipeline,input,notebook", "--rounds", "2",
                     "--profile", "1", "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "32",
                     "--size", "32", "--resize", "32", "--batch-size", "4", "--notebook-images", "48",
                     "--notebook-workers", "0", "--workdir", str(tmp_path), "--params", str(params_file),
                     "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["bench"]["arch"] == "resnet9" and result["bench"]["batch_size"] == 4
    assert result["bench"]["augment"] == {"augment": True, "crop_area_min": 1.0, "rotation": 30, "color_jitter": 0.1}
    for way in ("model", "pipeline", "input", "notebook"):
        assert len(result[way]["rounds"]) == 2
    assert result["pipeline_over_model_rounds"] == pytest.approx(
        [p / m for p, m in zip(result["pipeline"]["rounds"], result["model"]["rounds"])])
    assert (tmp_path / "imagefolder" / "nv").is_dir()  # ImageFolder layout, one folder per class


def test_bench_rejects_an_unknown_way(capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--ways", "model,notebok"])
    assert "unknown way 'notebok'" in capsys.readouterr().err
