import json

from hmnist.commands.bench import main


def test_bench_three_ways_on_cpu(tmp_path, monkeypatch):
    from conftest import REPO
    monkeypatch.chdir(REPO)  # reads the repo's params.yaml for the model's settings
    out = tmp_path / "bench.json"
    main(["--model", "resnet9", "--ways", "model,pipeline,input,notebook", "--rounds", "2", "--profile", "1",
          "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "32",
          "--size", "32", "--resize", "32", "--batch-size", "4", "--notebook-images", "48",
          "--notebook-workers", "0", "--workdir", str(tmp_path), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["bench"]["arch"] == "resnet9" and result["bench"]["batch_size"] == 4
    for way in ("model", "pipeline", "input", "notebook"):
        assert len(result[way]["rounds"]) == 2 and result[way]["images_per_second"] > 0
    assert len(result["pipeline_over_model_rounds"]) == 2
    assert result["pipeline_over_model"] > 0 and result["pipeline_over_notebook"] > 0
    assert (tmp_path / "imagefolder" / "nv").is_dir()  # ImageFolder layout, one folder per class


def test_bench_rejects_an_unknown_way(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--ways", "model,notebok"])
    assert "unknown way 'notebok'" in capsys.readouterr().err
