import json

from hmnist.bench import main


def test_bench_three_ways_on_cpu(tmp_path, monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)  # reads the repo's params.yaml for the model's settings
    out = tmp_path / "bench.json"
    main(["--model", "resnet9", "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "32",
          "--size", "32", "--resize", "32", "--batch-size", "4", "--notebook-images", "48",
          "--notebook-workers", "0", "--workdir", str(tmp_path), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["bench"]["arch"] == "resnet9" and result["bench"]["batch_size"] == 4
    for way in ("model", "pipeline", "notebook"):
        assert result[way]["images_per_second"] > 0
    assert result["pipeline_over_model"] > 0 and result["pipeline_over_notebook"] > 0
    assert (tmp_path / "imagefolder" / "nv").is_dir()  # ImageFolder layout, one folder per class
