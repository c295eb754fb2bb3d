"""Data-parallel training on CPU processes (gloo), and one GPU per run (fake GPUs, real locks).

Every multi-process test keeps to tiny models and one thread per process: CI has few cores.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import yaml

from conftest import BIN, balanced_accuracy_of, prepared_split, run, tiny_params
from hmnist import collectives, distributed, gpus
from hmnist.config import parse_params
from hmnist.data import load_prepared
from hmnist.collectives import Ranks
from hmnist.training import SmoothedCrossEntropy, backward_batch, class_weights
from hmnist.errors import UserError
from hmnist.stages.prepare import prepare
from hmnist.stages.split import assign_folds, split_lesions, write_split
from hmnist.stages.train import main as train_main
from hmnist.trainer import train


def small_params(synthetic_zip, model: str, **settings):
    raw = tiny_params(synthetic_zip)
    raw["model"] = model
    # 15: shares of 8 and 7, so unequal shards (and, with class weights, unequal normalisers) are covered
    raw["models"][model].update(batch_size=15, epochs=1, lr=1e-3)
    raw["models"][model].update(settings)
    return parse_params(raw)


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_zip):
    images, index, split = prepared_split(tmp_path_factory.mktemp("prepared"), synthetic_zip)
    # 45 training images: 3 steps of 15 an epoch are enough to tell, and float64 is slow
    split.loc[split.index[split["split"] == "train"][45:], "split"] = "unused"
    return images, index, split


def _train_in_ranks(rank, world, init, jobs, data, out):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = {}
        for name, params, unsynced in jobs:
            if unsynced:  # the control: each rank's batch norm sees only its own shard
                collectives.sync_batchnorm = lambda model, device: model
            model, _ = train(params, *data)
            results[name] = model.state_dict()
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def difference(a: dict, b: dict) -> float:
    """The largest difference between two state dicts, relative to each tensor's largest value."""
    return max(((x.double() - y.double()).abs().max() / x.double().abs().max().clamp(min=1e-30)).item()
               for x, y in zip(a.values(), b.values(), strict=True))


def test_two_processes_train_like_one(data, synthetic_zip, tmp_path):
    """A ViT in the deit entry (timm's test_vit: no batch statistics) and ResNet9's entry (timm's
    test_resnet, synchronised batch norm), with augmentation and class weights: 2 gloo processes
    end at the weights of 1 process with the same global batch. The control, ResNet9's entry
    with each rank's batch norm on its own shard, does not.

    In float64: in float32 the two agree at first (the first gradients to ~1e-6), but a batch-
    norm network under Adam amplifies last-bit differences of reordered float sums step after
    step (as another thread count does), so a float32 comparison would measure that chaos."""
    deit = small_params(synthetic_zip, "deit", arch="test_vit")
    resnet9 = small_params(synthetic_zip, "resnet9")
    jobs = [("deit", deit, False), ("resnet9", resnet9, False), ("unsynced", resnet9, True)]
    mp.spawn(_train_in_ranks, args=(2, tmp_path / "init", jobs, data, tmp_path / "out.pt"), nprocs=2)
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        one = {name: train(params, *data)[0].state_dict() for name, params in (("deit", deit), ("resnet9", resnet9))}
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    assert difference(one["deit"], two["deit"]) < 1e-6
    assert difference(one["resnet9"], two["resnet9"]) < 1e-6
    assert difference(one["resnet9"], two["unsynced"]) > 1e-2  # the comparison can tell


def test_shards_add_up_to_the_whole_batch_gradient():
    """What DDP averages over 2 ranks, each backward_batch of its share, equals the gradient of
    the whole batch, with class weights (each shard's own normaliser would differ) and 7 rows
    shared 4 + 3."""
    torch.manual_seed(0)
    model = nn.Linear(5, 7)
    features, targets = torch.randn(7, 5), torch.tensor([0, 1, 1, 1, 2, 5, 6])
    weights = class_weights(np.array([0, 1, 1, 1, 1, 1, 2, 5, 6]), 1.0)
    criterion = SmoothedCrossEntropy(weights, 0.1)

    def grad(ranks: Ranks) -> torch.Tensor:
        model.zero_grad()
        backward_batch(model, lambda rows: features[rows], targets, criterion, 1, torch.device("cpu"), ranks)
        return model.weight.grad.clone()

    whole = grad(Ranks())
    averaged = (grad(Ranks(0, 2)) + grad(Ranks(1, 2))) / 2
    assert torch.allclose(averaged, whole, atol=1e-6)
    positions = torch.arange(7)
    assert Ranks(0, 2).shard(positions).tolist() == [0, 1, 2, 3] and Ranks(1, 2).shard(positions).tolist() == [4, 5, 6]


# -- the train stage under torchrun -------------------------------------------------------------

def stage_env(**extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **extra}


def start_stage(cwd: Path) -> subprocess.Popen:
    # its own session, as a terminal's foreground job: Ctrl-C is SIGINT to it, not to pytest
    return subprocess.Popen([sys.executable, "-m", "hmnist.stages.train"], cwd=cwd, env=stage_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_for(condition, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended ({proc.returncode}) too early:\n{proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_repro_on_two_processes_with_ctrl_c_and_resume(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["devices"] = 2
    params["models"]["resnet9"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "split"], project)

    stage = start_stage(project)
    resume = project / "models/.resume"
    wait_for(lambda: resume.exists() and any(resume.glob("*.pt")), 240, stage)  # epoch 1 is saved
    os.killpg(stage.pid, signal.SIGINT)
    _, err = stage.communicate(timeout=60)
    assert stage.returncode == 130, err
    assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    assert not (project / "models/model.pt").exists() and len(list(resume.glob("*.pt"))) == 1

    # train resumes, then evaluate (export, which reads neither the resume nor the processes, left out)
    result = run(["dvc", "repro", "evaluate"], project)
    output = result.stdout + result.stderr
    assert "resuming after epoch" in output and "training in 2 CPU processes (gloo)" in output
    assert output.count("resuming after epoch") == 1  # rank 0 alone speaks
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["model"] == "resnet9"
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_of(project))  # of its own predictions
    checkpoint = torch.load(project / "models/model.pt", weights_only=True)
    assert checkpoint["processes"] == 2
    curve = (project / "dvclive/plots/metrics/val/balanced_accuracy.tsv").read_text().splitlines()
    assert len(curve) == 1 + 3  # header + every epoch once: rank 0 alone logs
    assert list(resume.iterdir()) == []


@pytest.fixture
def stage_dir(tmp_path, synthetic_zip) -> Path:
    raw = tiny_params(synthetic_zip)
    raw["train"]["devices"] = 2
    raw["models"]["resnet9"]["epochs"] = 50  # long enough to be killed in the middle
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    prepare(synthetic_zip, tmp_path / "data/prepared", size=32, workers=1, progress=False)
    _, index = load_prepared(tmp_path / "data/prepared")
    split = split_lesions(index.astype(str), parse_params(raw).split)
    write_split(split, tmp_path / "data/split.csv", tmp_path / "metrics/split.json")
    assign_folds(split, 1, seed=0).to_csv(tmp_path / "data/folds.csv", index=False)  # as the split stage writes
    return tmp_path


def test_a_killed_rank_ends_the_stage_with_one_line(stage_dir):
    import psutil

    stage = start_stage(stage_dir)
    workers = lambda: [p for p in psutil.Process(stage.pid).children(recursive=True)  # noqa: E731
                       if p.environ().get("RANK") == "1"]
    wait_for(lambda: any((stage_dir / "models/.resume").glob("*.pt")), 240, stage)  # training is under way
    victim = workers()[0]
    victim.kill()
    # seconds when it works; a launcher that missed the death would wait out the 30-minute
    # collective TIMEOUT. The limit only tells the two apart, so a busy machine cannot trip it.
    _, err = stage.communicate(timeout=300)
    assert stage.returncode == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: training process rank 1 (pid {victim.pid}) was killed by SIGKILL"], err
    assert "Traceback" not in err


def test_a_user_error_in_every_worker_is_reported_once(stage_dir):
    shutil.rmtree(stage_dir / "data/prepared")  # the split is there (the launcher checks it), the cache is not (its index is looked for first)
    stage = start_stage(stage_dir)
    _, err = stage.communicate(timeout=120)
    assert stage.returncode == 2
    assert "training in 2 CPU processes (gloo)" in err  # the workers found it, not the launcher
    assert [line for line in err.splitlines() if "error" in line.lower()] == \
        ["error: data/prepared/index.csv not found: run the prepare stage first (dvc repro prepare)"], err


def test_workers_die_with_a_killed_launcher(stage_dir):
    import psutil

    stage = start_stage(stage_dir)
    workers = lambda: [p for p in psutil.Process(stage.pid).children(recursive=True) if "RANK" in p.environ()]  # noqa: E731
    wait_for(lambda: any((stage_dir / "models/.resume").glob("*.pt")), 240, stage)  # training is under way
    found = workers()
    assert len(found) == 2 and {p.ppid() for p in found} == {stage.pid}  # torchrun's workers: the launcher's children
    stage.kill()  # as the out-of-memory killer would: no chance to stop the workers
    stage.wait()
    gone, alive = psutil.wait_procs(found, timeout=15)
    for p in alive:
        p.kill()
    assert alive == [], f"workers outlived their launcher: {[p.pid for p in alive]}"


@pytest.mark.parametrize("setting, message", [
    ({"train": {"devices": 64}}, "train.devices is 64 but this machine has 2 CPU core(s): on the CPU, use at most "
                                 "one process per core (train.devices: 2 or less)"),
    ({"models": {"resnet9": {"batch_size": 1}}}, "a batch of 1 cannot be shared by 2 processes: raise "
                                                "models.resnet9.batch_size or lower train.devices"),
])
def test_a_run_that_cannot_work_stops_before_any_worker_starts(setting, message, stage_dir, monkeypatch, capsys):
    import torch.distributed.run

    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    for section, values in setting.items():
        target = raw[section] if section != "models" else raw["models"]["resnet9"]
        target.update(values if section != "models" else values["resnet9"])
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(stage_dir)
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 2)
    monkeypatch.setattr(torch.distributed.run, "run", lambda args: pytest.fail("workers were started"))
    with pytest.raises(SystemExit) as exit:
        train_main([])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_user_errors_of_the_devices_setting(synthetic_zip, monkeypatch):
    raw = tiny_params(synthetic_zip)
    raw["train"]["devices"] = 0
    with pytest.raises(UserError, match="train.devices must be a number of processes"):
        parse_params(raw)
    raw["train"]["devices"] = "every"
    with pytest.raises(UserError, match="train.devices must be a number of processes .* got 'every'"):
        parse_params(raw)
    raw["train"]["devices"], raw["train"]["device"] = "all", "cuda:x"
    with pytest.raises(UserError, match="train.device must be one of auto, cuda, cpu or cuda:K"):
        parse_params(raw)
    with pytest.raises(UserError, match="train.devices is all but no CUDA GPU is visible"):
        distributed.process_count("all", "cpu")
    monkeypatch.setattr(distributed, "cpu_cores", lambda: 3)
    assert distributed.process_count(3, "cpu") == 3
    with pytest.raises(UserError, match="train.devices is 4 but this machine has 3 CPU core"):
        distributed.process_count(4, "cpu")


# -- one GPU per run ------------------------------------------------------------------------

def test_runs_take_different_gpus(tmp_path, monkeypatch, capsys):
    """Fake GPUs, real locks: two runs in this process take GPUs 0 and 1, `cuda:K` pins K."""
    monkeypatch.setenv("HMNIST_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    first = gpus.device("auto", Ranks(), torch.device("cuda"))
    second = gpus.device("cuda", Ranks(), torch.device("cuda"))
    assert (first, second) == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert "using GPU 1 (cuda:1)" in capsys.readouterr().err
    assert gpus.device("cuda:2", Ranks(), torch.device("cuda:2")) == torch.device("cuda", 2)
    assert gpus.device("auto", Ranks(1, 2, local=1), torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")  # locked by the names the machine gives them
    assert gpus.device("auto", Ranks(), torch.device("cuda")) == torch.device("cuda", 0)
    assert gpus.device("auto", Ranks(), torch.device("cuda")) == torch.device("cuda", 1)
    assert (tmp_path / "gpu-6.lock").read_text() == f"{os.getpid()}\n"


CLAIM = """
import sys
from hmnist.errors import configure_logging
from hmnist.gpus import claim_gpus
configure_logging()  # what the train stage's entry point does: its notices on stderr
(name, _), = claim_gpus(1, ["0", "1"], poll=0.1)
print(name, flush=True)
sys.stdin.read()  # hold the GPU until the test closes stdin
"""


def test_concurrent_runs_spread_over_gpus_and_the_rest_wait(tmp_path):
    env = stage_env(HMNIST_LOCK_DIR=str(tmp_path))
    start = lambda: subprocess.Popen([sys.executable, "-c", CLAIM], env=env, text=True,  # noqa: E731
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = [start(), start()]
    taken = [r.stdout.readline().strip() for r in runs]
    assert sorted(taken) == ["0", "1"]
    third = start()
    # said once it found none free; then it takes the first GPU that comes free
    assert "all GPUs are in use by other hmnist runs" in third.stderr.readline()
    runs[0].kill()  # a crash frees its GPU too: the kernel drops the lock with the process
    runs[0].wait()
    assert third.stdout.readline().strip() == taken[0]
    for r in (runs[1], third):
        r.stdin.close()
        assert r.wait(timeout=30) == 0


def test_only_a_lost_peer_counts_as_one():
    lost = [torch.distributed.DistNetworkError("connection to rank 1 lost"),
            RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234"),
            RuntimeError("[gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:2: Connection reset by peer")]
    bugs = [RuntimeError("gloo does not support this dtype"), RuntimeError("NCCL error: invalid argument"),
            ValueError("Connection closed by peer")]
    assert [distributed._peer_lost(e) for e in lost] == [True] * 3
    assert [distributed._peer_lost(e) for e in bugs] == [False] * 3
