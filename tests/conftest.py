"""Shared fixtures: a synthetic archive in the Kaggle layout and a throwaway DVC project.

Tests shrink the real params.yaml (lightning-hydra-template style) instead of inventing one.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from hmnist.errors import LOG_LEVEL, configure_logging
from synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # dvc and python of the environment running the tests


def pytest_configure(config):
    """Under pytest-xdist (the default: `-n auto` in pyproject.toml) each worker gets its share of
    the cores, and so do the stages and commands it starts (they inherit OMP_NUM_THREADS): N
    workers at torch's default of one thread per core would oversubscribe the machine N times."""
    from hmnist.distributed import cpu_cores

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, cpu_cores() // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


# The test files that take longest, longest first (`--durations` on an idle 2-core machine,
# BENCHMARKS.md "The test suite's time"). Under `--dist loadfile` a file runs whole on one worker
# and the workers take files in this order: xdist's own order (most tests first, its
# --loadscope-reorder, which pyproject.toml turns off) left the longest files, which hold one or
# two end-to-end tests, for last, one worker running them while the other had nothing left. Longest
# first, the short files fill in around them. A file not listed keeps its place after these.
LONGEST_FIRST = ("test_pipeline.py", "test_distributed.py", "test_export.py", "test_cv.py", "test_train.py",
                 "test_report.py", "test_predict.py", "test_download.py", "test_lite0.py", "test_metadata.py",
                 "test_models.py", "test_hub.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture(autouse=True)
def notices_on_stderr(monkeypatch):
    """The modules log their notices and the entry points (`hmnist.errors.cli`) show them on
    stderr. Tests call the modules directly and read stderr as a user of the stage would, so
    they get the same output, at the default level whatever the developer's shell sets."""
    monkeypatch.delenv(LOG_LEVEL, raising=False)
    configure_logging()


@pytest.fixture(scope="session")
def synthetic_zip(tmp_path_factory) -> Path:
    """84 lesions, 1-3 images each, all 7 classes, duplicate folders; 60x45 JPEGs."""
    path = tmp_path_factory.mktemp("kaggle") / "skin-cancer-mnist-ham10000.zip"
    write_dataset(path, n_lesions=84, images_per_lesion=(1, 3), size=(60, 45), seed=1)
    return path


# The network of tests where the architecture does not matter (the pipeline's plumbing, resume,
# cross-validation, DDP, reports): timm's 0.4M-parameter test_resnet takes 0.05 s a training step
# of 32 images at 32 px on one core, ResNet9 (6.6M) 1 s. It learns the synthetic classes too,
# given 20 epochs (test_train's LEARNED); tests of ResNet9 itself ask for arch="resnet9".
TINY_ARCH = "test_resnet"

# dvc.yaml's stages of a one-model run (cv.folds 1), in the order `dvc repro` runs them
PIPELINE = ("check_params", "download", "prepare", "split", "train", "evaluate", "export")


def tiny_params(source: Path | str, arch: str = TINY_ARCH) -> dict:
    """The real params.yaml, shrunk to seconds on a CPU: the selected entry `models.resnet9`
    trains `arch` (its name stays: the tests and DVC address it as resnet9)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    params["prepare"]["size"] = 32
    params["train"]["device"] = "cpu"
    params["train"]["warmup_epochs"] = 0
    params["evaluate"]["batch_size"] = 64
    for model in params["models"].values():
        model.update(resize=32, batch_size=32, epochs=2, pretrained=False, pretrained_path=None)
    params["models"]["resnet9"]["arch"] = arch
    params["model"] = "resnet9"
    return params


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # CI machines have no git identity; dvc exp commits need one
        "GIT_AUTHOR_NAME": "hmnist-tests", "GIT_AUTHOR_EMAIL": "tests@hmnist.invalid",
        "GIT_COMMITTER_NAME": "hmnist-tests", "GIT_COMMITTER_EMAIL": "tests@hmnist.invalid",
        **(env or {}),
    }
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_here(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """run(cmd, cwd) for an `hmnist ...` command line, in this process: the console script's
    main() (its error handling included) in `cwd`, its stdout, stderr and exit code. A process of
    its own spends seconds importing torch again; the tests keep a console-script run of their
    own where the process boundary is the point."""
    import contextlib
    import io

    from hmnist.commands.cli import main

    assert Path(cmd[0]).name == "hmnist", cmd
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in cmd[1:]])
            code = 0
        except SystemExit as e:
            code = e.code
    result = subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{cmd} failed ({code}):\n{result.stdout}\n{result.stderr}")
    return result


def run_stages(root: Path, stages: tuple[str, ...] | list[str]) -> str:
    """Each stage's main() in this process, in `root`, as `python -m hmnist.stages.NAME` runs it
    there (its @cli wrapper included); what they printed on stdout. For the module fixtures that
    stage a trained project: a subprocess per stage spends about 5 s of CPU importing torch, timm
    and scikit-learn again, more than a tiny stage itself. The stages as processes, through DVC,
    are test_pipeline's."""
    import contextlib
    import importlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for stage in stages:
            try:
                importlib.import_module(f"hmnist.stages.{stage}").main()
            except SystemExit as e:  # a UserError, as the stage's process would exit with
                raise AssertionError(f"stage {stage} exited {e.code}:\n{out.getvalue()}\n{err.getvalue()}") from None
    return out.getvalue()


# Importing timm (torch and torchvision first) is most of a check's time: a process that has
# imported torch and torchvision, which read none of the hub's settings, forks a child per check.
# The child takes the check's environment and only then imports huggingface_hub (through timm),
# as a new interpreter would; its exit code and output are those `python -c CODE` would give.
WARM = r"""
import json, os, sys, traceback
import torch, torchvision  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        code = 0
        try:
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class WarmPython:
    """`python -c CODE` in a fresh environment, forked from WARM."""

    def __init__(self):
        # the package under test, where it is not the one installed (a worktree's src/)
        self.keep = {k: v for k, v in os.environ.items() if k == "PYTHONPATH"}
        self.proc = subprocess.Popen([sys.executable, "-c", WARM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={"PATH": "/usr/bin:/bin", **self.keep})
        self.ready = False

    def run(self, code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
        if not self.ready:  # its own imports: as slow as the machine is busy, so not under the check's limit
            self.ready = self.proc.stdout.readline() == "ready\n"
            assert self.ready, "the warm interpreter did not start"
        out, err = tmp_path / "check.stdout", tmp_path / "check.stderr"
        base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path), **self.keep}
        job = {"code": code, "env": {**base, **env}, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], 300)[0]:  # a hang, not a busy machine
            self.proc.kill()  # the next check must not read this one's answer
            raise AssertionError(f"the check did not end in 300 s: {code}")
        returncode = int(self.proc.stdout.readline())
        return subprocess.CompletedProcess(code, returncode, out.read_text(), err.read_text())

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def warm_python():
    python = WarmPython()
    yield python
    python.close()


@pytest.fixture
def project(tmp_path, synthetic_zip) -> Path:
    """A git + DVC project with this repo's pipeline and tiny params, reading the synthetic zip."""
    return make_project(tmp_path / "project", synthetic_zip)


def make_project(root: Path, synthetic_zip: Path) -> Path:
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(synthetic_zip), sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root


class LimitedGpu(nn.Module):
    """A model on a pretend small GPU: CUDA's out-of-memory error for training batches larger
    than `max_batch` and inference batches larger than `max_eval_batch`."""

    def __init__(self, inner: nn.Module, max_batch: int = 10**9, max_eval_batch: int = 10**9):
        super().__init__()
        self.inner, self.max_batch, self.max_eval_batch = inner, max_batch, max_eval_batch

    def forward(self, x):
        if len(x) > (self.max_batch if self.training else self.max_eval_batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def balanced_accuracy_of(project: Path) -> float:
    """The balanced accuracy of a finished run's own test predictions (predictions/test.csv),
    by scikit-learn: what its metrics.json must say."""
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score

    from hmnist.config import CLASS_COLUMNS, CLASS_INDEX

    predictions = pd.read_csv(project / "predictions/test.csv")
    return balanced_accuracy_score(predictions["dx"].map(CLASS_INDEX), predictions[CLASS_COLUMNS].to_numpy().argmax(1))


def prepared_split(folder: Path, archive: Path):
    """An archive prepared at 32 px into `folder` and split as the split stage does with
    tiny_params: (images, index, split)."""
    import numpy as np

    from hmnist.config import parse_params
    from hmnist.data import load_prepared
    from hmnist.stages.prepare import prepare
    from hmnist.stages.split import split_lesions

    prepare(archive, folder, size=32, workers=1, progress=False)
    images, index = load_prepared(folder)
    return np.asarray(images), index, split_lesions(index.astype(str), parse_params(tiny_params(archive)).split)
