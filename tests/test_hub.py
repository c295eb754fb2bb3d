"""Hub reachability: the pretrained-weights check honours the settings huggingface_hub honours.

Each check runs in a fresh process with a controlled environment, because huggingface_hub
reads HF_ENDPOINT, HF_HUB_OFFLINE and friends at import (forked before that import: WARM). Only loopback addresses are used.
"""
from __future__ import annotations

import http.server
import json
import os
import select
import socket
import subprocess
import sys
import threading

import pytest
import timm
import torch
from safetensors.torch import save_file

ARCH = "deit_tiny_patch16_224"
# prints how long the check itself took (imports excluded), then whether it passed
CHECK = f"""
import time
from hmnist.errors import cli
from hmnist.weights import _check_hub
start = time.monotonic()
try:
    cli(lambda: _check_hub({ARCH!r}))()
finally:
    print(f"{{time.monotonic() - start:.1f}}s")
print("reachable")
"""


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


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "pretrained_path" in lines[0]
    return lines[0]


@pytest.fixture
def loopback_server():
    """A threaded HTTP server on 127.0.0.1 answering 404 to anything, as a forward proxy or as
    a hub would; it records each request line (a proxy sees absolute URLs)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(self.requestline)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_reached_through_proxy(tmp_path, loopback_server, warm_python):
    proxy, seen = loopback_server
    # hub.invalid never resolves: only a request sent through the proxy can get an answer
    result = warm_python.run(CHECK, tmp_path, HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    assert result.returncode == 0 and result.stdout.endswith("reachable\n"), result.stderr
    assert any(line.startswith("HEAD http://hub.invalid/timm/") for line in seen), seen

    # the same hub without the proxy: a quick one-line error
    result = warm_python.run(CHECK, tmp_path, HF_ENDPOINT="http://hub.invalid")
    assert "cannot reach the Hugging Face hub (hub.invalid:80" in one_line_error(result)
    assert float(result.stdout.strip().removesuffix("s")) < 15


def test_dead_proxy_is_named(tmp_path, loopback_server, warm_python):
    # the hub itself answers, but the download would go through the proxy, which is down
    hub, seen = loopback_server
    dead = f"http://user:secret@127.0.0.1:{closed_port()}"
    result = warm_python.run(CHECK, tmp_path, HF_ENDPOINT=hub, HTTP_PROXY=dead, HTTPS_PROXY=dead)
    line = one_line_error(result)
    assert f"via proxy http://127.0.0.1:{dead.rsplit(':', 1)[1]}" in line and "secret" not in line
    assert not seen

    # NO_PROXY exempts the hub, as it would for the real download
    result = warm_python.run(CHECK, tmp_path, HF_ENDPOINT=hub, HTTP_PROXY=dead, HTTPS_PROXY=dead, NO_PROXY="127.0.0.1")
    assert result.returncode == 0 and result.stdout.endswith("reachable\n"), result.stderr
    assert any(line.startswith("HEAD /timm/") for line in seen), seen


def test_offline_cache_hit_loads_weights(tmp_path, warm_python):
    hub_id = timm.models.get_pretrained_cfg(ARCH).hf_hub_id
    repo, _, revision = hub_id.partition("@")
    torch.manual_seed(3)
    source = timm.create_model(ARCH, num_classes=1000)
    # the layout huggingface_hub's cache uses: a ref names the commit, the snapshot holds the file
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / (revision or "main")).write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    expected = tmp_path / "backbone.pt"  # every tensor but the 1000-class head, which is replaced
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, expected)

    code = ("import torch; from hmnist.models import create_model; from hmnist.config import ModelConfig; "
            "from hmnist.errors import cli; "
            f"m = cli(lambda: create_model(ModelConfig(arch={ARCH!r}, pretrained=True, resize=224)))(); "
            f"e = torch.load({str(expected)!r}); s = m.state_dict(); "
            "assert len(e) > 100 and all(torch.equal(s[k], v) for k, v in e.items()); "
            "assert m.head.out_features == 7; print('loaded')")
    # an unreachable endpoint too: the cache alone must be enough
    result = warm_python.run(code, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0 and result.stdout.strip().endswith("loaded"), result.stderr
