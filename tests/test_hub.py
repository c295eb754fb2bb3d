"""Hub reachability: the pretrained-weights check honours the settings huggingface_hub honours.

Each check runs in a fresh process with a controlled environment, because huggingface_hub
reads HF_ENDPOINT, HF_HUB_OFFLINE and friends at import (forked before that import:
conftest.warm_python). Only loopback addresses are used.
"""
from __future__ import annotations

import http.server
import socket
import subprocess
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
