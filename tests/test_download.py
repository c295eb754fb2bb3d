"""Stage `download`, offline: the real kaggle client against a fake Kaggle on 127.0.0.1.

The fake implements the two calls the client makes (token introspection, DownloadDataset with its
302 to the file), and HMNIST_KAGGLE_ENDPOINT points the client at it. Every test runs with a
throwaway HOME and no KAGGLE_* variables, so the developer's own credentials are never read.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from hmnist.config import DataConfig
from hmnist.data import METADATA
from hmnist.stages.download import ENDPOINT_VARIABLE, download
from hmnist.errors import UserError
from synthetic import write_dataset

from faults import deny

REPO = Path(__file__).resolve().parents[1]
USERNAME = "hmnist-tester"
# Distinctive, so that finding them anywhere in the output means they leaked.
KEY = "hmnistFAKEkey-7c1e9b42d0aa"
TOKEN = "KGAT_hmnistFAKEtoken-3a8f61c2"
SECRETS = (KEY, TOKEN)
VALID_AUTH = {
    "Basic " + base64.b64encode(f"{USERNAME}:{KEY}".encode()).decode(),
    f"Bearer {TOKEN}",
}
DATASET = "kmader/skin-cancer-mnist-ham10000"
RULES_NOT_ACCEPTED = "someone/rules-not-accepted"  # the fake answers 403 for this one
NO_SUCH_DATASET = "someone/no-such-dataset"  # and 404 for this one
SERVER_ERROR = "someone/server-error"  # and 500 for this one


class FakeKaggle:
    """api.kaggle.com's download path, served from a thread; `file_mode` breaks the transfer."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.file_mode = "ok"  # "ok", "truncated" (connection drops halfway), "html" (not a zip)
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"kaggle": self}))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    kaggle: FakeKaggle

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_POST(self) -> None:
        self.kaggle.paths.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/v1/security.OAuthService/IntrospectToken":  # how the client vets a token
            active = body.get("token") == TOKEN
            return self._json(200, {"active": active, "username": USERNAME if active else ""})
        if self.path != "/v1/datasets.DatasetApiService/DownloadDataset":
            return self._json(404, {"code": 404, "message": "no such method"})
        if self.headers.get("Authorization") not in VALID_AUTH:
            return self._json(401, {"code": 401, "message": "Unauthenticated"})
        dataset = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
        if dataset == RULES_NOT_ACCEPTED:
            return self._json(403, {"code": 403, "message": "You must accept this dataset's rules"})
        if dataset == NO_SUCH_DATASET:
            return self._json(404, {"code": 404, "message": "Not found"})
        if dataset == SERVER_ERROR:
            return self._json(500, {"code": 500, "message": "Internal error"})
        # Kaggle answers with a redirect to a signed storage URL; the client follows it.
        self.send_response(302)
        self.send_header("Location", f"/files/{body.get('datasetSlug')}.zip")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.kaggle.paths.append(self.path)
        if not self.path.startswith("/files/"):
            return self._json(404, {"code": 404, "message": "Not found"})
        data = b"<html>Please sign in</html>" if self.kaggle.file_mode == "html" else self.kaggle.payload
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Last-Modified", formatdate(usegmt=True))  # the client parses it
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.kaggle.file_mode == "truncated" else data)

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_kaggle(synthetic_zip):
    server = FakeKaggle(synthetic_zip.read_bytes())
    yield server
    server.close()


def isolated_env(home: Path) -> dict[str, str]:
    """os.environ without any Kaggle setting, proxy or verbosity, and with HOME at `home`."""
    dropped = {"XDG_CONFIG_HOME", "VERBOSE", "VERBOSE_OUTPUT", ENDPOINT_VARIABLE,
               "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and k not in dropped}
    return {**env, "HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A throwaway HOME, and os.environ as isolated_env() has it (monkeypatch restores it)."""
    home = tmp_path / "home"
    home.mkdir()
    clean = isolated_env(home)
    for name in set(os.environ) - set(clean):
        monkeypatch.delenv(name)
    setenv(monkeypatch, clean)
    return home


def setenv(monkeypatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def write_kaggle_json(folder: Path, key: str = KEY) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kaggle.json").write_text(json.dumps({"username": USERNAME, "key": key}))
    (folder / "kaggle.json").chmod(0o600)  # else the client warns that others can read it


def credentials(kind: str, home: Path) -> dict[str, str]:
    """Put credentials where Kaggle users keep them; returns the environment variables to set."""
    if kind == "kaggle.json":
        write_kaggle_json(home / ".kaggle")
        return {}
    if kind == "KAGGLE_CONFIG_DIR":
        write_kaggle_json(home / "elsewhere")
        return {"KAGGLE_CONFIG_DIR": str(home / "elsewhere")}
    if kind == "KAGGLE_USERNAME+KEY":
        return {"KAGGLE_USERNAME": USERNAME, "KAGGLE_KEY": KEY}
    if kind == "KAGGLE_API_TOKEN":
        return {"KAGGLE_API_TOKEN": TOKEN}
    if kind == "KAGGLE_API_TOKEN file":
        (home / "token.txt").write_text(TOKEN + "\n")
        return {"KAGGLE_API_TOKEN": str(home / "token.txt")}
    if kind == "access_token":
        (home / ".kaggle").mkdir(exist_ok=True)
        (home / ".kaggle" / "access_token").write_text(TOKEN)
        return {}
    raise ValueError(kind)


def assert_no_secrets(*texts: str, folder: Path | None = None) -> None:
    for secret in SECRETS:
        assert all(secret not in text for text in texts)
        for path in (p for p in (folder.rglob("*") if folder else []) if p.is_file()):
            assert secret.encode() not in path.read_bytes(), path


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


KAGGLE = DataConfig(source="kaggle", dataset=DATASET)


# --- from Kaggle ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kaggle.json", "KAGGLE_CONFIG_DIR", "KAGGLE_USERNAME+KEY", "KAGGLE_API_TOKEN",
                                  "KAGGLE_API_TOKEN file", "access_token"])
def test_kaggle_download_keeps_the_zip_byte_for_byte(kind, home, fake_kaggle, synthetic_zip, tmp_path, capfd,
                                                     monkeypatch):
    setenv(monkeypatch, {**credentials(kind, home), ENDPOINT_VARIABLE: fake_kaggle.url})
    out = tmp_path / "project" / "data" / "raw" / "skin-cancer-mnist-ham10000.zip"
    assert download(KAGGLE, out) == out
    assert out.read_bytes() == synthetic_zip.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # staging folder and resume marker gone
    assert "/v1/datasets.DatasetApiService/DownloadDataset" in fake_kaggle.paths
    captured = capfd.readouterr()
    assert_no_secrets(captured.out, captured.err, folder=tmp_path / "project")


@pytest.mark.parametrize("kind", ["kaggle.json", "KAGGLE_API_TOKEN"])
def test_rejected_credentials(kind, home, fake_kaggle, tmp_path, capfd, monkeypatch):
    wrong = {"KAGGLE_API_TOKEN": "KGAT_hmnistFAKEtoken-revoked"} if kind == "KAGGLE_API_TOKEN" else {}
    if kind == "kaggle.json":
        write_kaggle_json(home / ".kaggle", key=KEY + "-old")
    setenv(monkeypatch, {**wrong, ENDPOINT_VARIABLE: fake_kaggle.url})
    with pytest.raises(UserError, match=r"rejected the credentials \(HTTP 401\).*kaggle.com/settings"):
        download(KAGGLE, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()
    captured = capfd.readouterr()
    assert "Authentication required" not in captured.out  # the client's help page stays hidden
    assert_no_secrets(captured.out, captured.err)


def test_rules_not_accepted(home, fake_kaggle, tmp_path, monkeypatch):
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: fake_kaggle.url})
    data = DataConfig(source="kaggle", dataset=RULES_NOT_ACCEPTED)
    with pytest.raises(UserError, match=f"HTTP 403.*https://www.kaggle.com/datasets/{RULES_NOT_ACCEPTED} .*rules"):
        download(data, tmp_path / "out.zip")


@pytest.mark.parametrize("dataset, message", [
    (NO_SUCH_DATASET, rf"^dataset {NO_SUCH_DATASET} not found on Kaggle \(HTTP 404\): check data.dataset in params.yaml$"),
    (SERVER_ERROR, rf"^Kaggle answered HTTP 500 for {SERVER_ERROR}: try again later, "
                   r"or set data.source in params.yaml to a local copy of the dataset$"),
])
def test_dataset_not_found_or_server_error(dataset, message, home, fake_kaggle, tmp_path, monkeypatch):
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: fake_kaggle.url})
    with pytest.raises(UserError, match=message):
        download(DataConfig(source="kaggle", dataset=dataset), tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_kaggle_unreachable_fails_fast(home, tmp_path, monkeypatch):
    nobody = f"http://127.0.0.1:{unused_port()}"
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: nobody})
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # counted, not timed: a busy machine is slow anyway
    with pytest.raises(UserError, match="cannot reach Kaggle.*data.source"):
        download(KAGGLE, tmp_path / "raw" / "out.zip")
    assert sum(sleeps) == 0, sleeps  # the API call is not retried with back-off sleeps
    assert list((tmp_path / "raw").iterdir()) == []


def test_no_credentials_never_calls_kaggle(home, fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv(ENDPOINT_VARIABLE, fake_kaggle.url)
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "someone"}')  # no key: not enough
    with pytest.raises(UserError, match=r"no Kaggle credentials found.*~/.kaggle/access_token.*KAGGLE_API_TOKEN"):
        download(KAGGLE, tmp_path / "out.zip")
    assert fake_kaggle.paths == []


def test_interrupted_download_leaves_nothing(home, fake_kaggle, tmp_path, monkeypatch):
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: fake_kaggle.url})
    fake_kaggle.file_mode = "truncated"
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the client's retries back off for ~1 minute
    out = tmp_path / "raw" / "out.zip"
    with pytest.raises(UserError, match="download of .* was interrupted.*run again"):
        download(KAGGLE, out)
    assert len(sleeps) == 5  # the client did retry (resuming) before giving up
    assert list(out.parent.iterdir()) == []


def test_download_that_is_not_a_zip_is_not_kept(home, fake_kaggle, tmp_path, monkeypatch):
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: fake_kaggle.url})
    fake_kaggle.file_mode = "html"
    out = tmp_path / "raw" / "out.zip"
    with pytest.raises(UserError, match=f"file Kaggle sent for {DATASET} is not a readable zip"):
        download(KAGGLE, out)
    assert list(out.parent.iterdir()) == []


def test_bad_endpoint_variable(home, tmp_path, monkeypatch):
    setenv(monkeypatch, {**credentials("kaggle.json", home), ENDPOINT_VARIABLE: "127.0.0.1:8080"})
    with pytest.raises(UserError, match=f"{ENDPOINT_VARIABLE} must be a base URL"):
        download(KAGGLE, tmp_path / "out.zip")


# --- from a local copy ---------------------------------------------------------------------------

def test_local_zip_is_hard_linked(synthetic_zip, tmp_path):
    out = download(DataConfig(source=str(synthetic_zip)), tmp_path / "raw" / "out.zip")
    assert out.read_bytes() == synthetic_zip.read_bytes()
    assert os.path.samefile(out, synthetic_zip)  # no 5 GB copy


def test_local_zip_is_copied_when_linking_fails(synthetic_zip, tmp_path, monkeypatch):
    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    out = download(DataConfig(source=str(synthetic_zip)), tmp_path / "raw" / "out.zip")
    assert out.read_bytes() == synthetic_zip.read_bytes()
    assert not os.path.samefile(out, synthetic_zip)


def test_relative_source_is_relative_to_the_working_directory(synthetic_zip, tmp_path, monkeypatch):
    (tmp_path / "copy.zip").write_bytes(synthetic_zip.read_bytes())
    monkeypatch.chdir(tmp_path)
    out = download(DataConfig(source="copy.zip"), Path("data/raw/out.zip"))
    assert (tmp_path / "data/raw/out.zip").read_bytes() == synthetic_zip.read_bytes()
    assert not out.is_absolute()


def test_local_folder_is_zipped_stored(tmp_path, capfd):
    folder = tmp_path / "ham10000"
    write_dataset(folder, n_lesions=42)
    out = download(DataConfig(source=str(folder)), tmp_path / "raw" / "out.zip")
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == sorted(files)
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        assert all(archive.read(name) == path.read_bytes() for name, path in files.items())
    assert "zipping" in capfd.readouterr().err  # the progress bar
    assert [p.name for p in out.parent.iterdir()] == ["out.zip"]


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="data.source: .*nowhere.zip does not exist"):
        download(DataConfig(source=str(tmp_path / "nowhere.zip")), tmp_path / "out.zip")


def test_source_that_is_not_a_zip(tmp_path):
    (tmp_path / "dataset.zip").write_text("not a zip")
    with pytest.raises(UserError, match=r"dataset.zip is not a zip file \(give the Kaggle zip or its unpacked folder\)$"):
        download(DataConfig(source=str(tmp_path / "dataset.zip")), tmp_path / "raw" / "out.zip")
    assert list((tmp_path / "raw").iterdir()) == []


def test_sources_that_are_not_ham10000(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("cats/cat.jpg", b"meow")
    (tmp_path / "parent" / "ham10000").mkdir(parents=True)
    for source in (tmp_path / "other.zip", tmp_path / "parent"):
        with pytest.raises(UserError, match=f"does not look like the HAM10000 Kaggle dataset.*{METADATA}"):
            download(DataConfig(source=str(source)), tmp_path / "raw" / "out.zip")



def test_sources_one_folder_down_name_the_folder(synthetic_zip, tmp_path):
    """A zip whose metadata sits in a folder, or a folder holding the dataset's folder: the
    message names the folder where the metadata was found, and what to do."""
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(synthetic_zip) as old, zipfile.ZipFile(nested, "w") as new:
        for name in old.namelist():
            new.writestr(f"ham10000/{name}", old.read(name))
    with pytest.raises(UserError, match=rf"^data.source: {nested} holds {METADATA} in its folder ham10000/, not at its "
                                        r"top level as the Kaggle zip does: unzip it and set data.source to the "
                                        r"unpacked ham10000 folder$"):
        download(DataConfig(source=str(nested)), tmp_path / "raw" / "out.zip")
    write_dataset(tmp_path / "outer" / "ham", n_lesions=42)
    with pytest.raises(UserError, match=rf"^data.source: {tmp_path / 'outer'} does not look like the HAM10000 Kaggle "
                                        rf"dataset \(no {METADATA} in it; it is in {tmp_path / 'outer' / 'ham'}: set "
                                        r"data.source to that folder\)$"):
        download(DataConfig(source=str(tmp_path / "outer")), tmp_path / "raw" / "out.zip")
    assert list((tmp_path / "raw").iterdir()) == []


@pytest.mark.parametrize("what", ["zip", "file in folder", "subfolder"])
def test_unreadable_sources_say_permission_denied(what, synthetic_zip, tmp_path, monkeypatch):
    folder = tmp_path / "ham10000"
    write_dataset(folder, n_lesions=42)
    if what == "zip":
        source = denied = tmp_path / "copy.zip"
        source.write_bytes(synthetic_zip.read_bytes())
    else:
        source = folder
        denied = folder / METADATA if what == "file in folder" else next(p for p in folder.iterdir() if p.is_dir())
    how = deny(denied, monkeypatch)
    with pytest.raises(UserError, match=rf"^cannot read {denied}: permission denied$"):
        download(DataConfig(source=str(source)), tmp_path / "raw" / "out.zip")
    assert list((tmp_path / "raw").iterdir()) == [], how


# --- the command line ----------------------------------------------------------------------------

def run_stage(project: Path, home: Path, source: str, dataset: str = DATASET,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m hmnist.stages.download` in `project`, with the real params.yaml pointed at `source`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=source, dataset=dataset)
    project.mkdir(exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "hmnist.stages.download"], cwd=project, capture_output=True, text=True,
                          env={**isolated_env(home), **(env or {})}, timeout=120)


def assert_user_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", ["missing path", "no credentials", "rejected", "not found", "unreachable"])
def test_cli_errors_are_one_line(case, tmp_path, fake_kaggle):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    source, dataset, env, pattern = "kaggle", DATASET, {ENDPOINT_VARIABLE: fake_kaggle.url}, ""
    if case == "missing path":
        source, pattern = "downloads/ham10000.zip", "downloads/ham10000.zip does not exist"
    elif case == "no credentials":
        pattern = "no Kaggle credentials found"
    elif case == "rejected":
        write_kaggle_json(home / ".kaggle", key=KEY + "-old")
        env["KAGGLE_API_TOKEN"], pattern = TOKEN + "-revoked", "HTTP 401"
    elif case == "not found":
        env.update(credentials("KAGGLE_USERNAME+KEY", home))
        dataset, pattern = NO_SUCH_DATASET, "HTTP 404"
    else:
        env.update(credentials("KAGGLE_API_TOKEN", home))
        env[ENDPOINT_VARIABLE] = f"http://127.0.0.1:{unused_port()}"
        pattern = "cannot reach Kaggle"
    result = run_stage(project, home, source, dataset, env)
    assert_user_error(result, pattern)
    assert_no_secrets(result.stdout, result.stderr, folder=project)
    assert not (project / "data/raw/skin-cancer-mnist-ham10000.zip").exists()


def test_cli_downloads_from_kaggle(tmp_path, fake_kaggle, synthetic_zip):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    env = {**credentials("KAGGLE_API_TOKEN", home), ENDPOINT_VARIABLE: fake_kaggle.url, "VERBOSE": "1"}
    result = run_stage(project, home, "kaggle", env=env)
    assert result.returncode == 0, result.stderr
    assert (project / "data/raw/skin-cancer-mnist-ham10000.zip").read_bytes() == synthetic_zip.read_bytes()
    assert "wrote data/raw/skin-cancer-mnist-ham10000.zip" in result.stdout
    assert_no_secrets(result.stdout, result.stderr, folder=project)  # even with VERBOSE=1


def test_cli_zips_a_local_folder(tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    write_dataset(project / "ham10000", n_lesions=42)
    result = run_stage(project, home, "ham10000")
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(project / "data/raw/skin-cancer-mnist-ham10000.zip") as archive:
        assert METADATA in archive.namelist()


def test_cli_checks_params_before_any_work(tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sorce"] = "kaggle"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "hmnist.stages.download"], cwd=project, capture_output=True,
                            text=True, env=isolated_env(home), timeout=120)
    assert_user_error(result, r"unknown key 'data\.sorce'")
    assert not (project / "data").exists()


def test_source_with_home_and_variables(synthetic_zip, tmp_path, monkeypatch):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets/ham.zip").write_bytes(synthetic_zip.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HAM_DATA", str(tmp_path / "datasets"))
    for source in ("~/datasets/ham.zip", "$HAM_DATA/ham.zip"):
        out = download(DataConfig(source=source), tmp_path / "raw" / "out.zip")
        assert out.read_bytes() == synthetic_zip.read_bytes()
    with pytest.raises(UserError, match=rf"data.source: {tmp_path}/datasets/none.zip does not exist"):
        download(DataConfig(source="~/datasets/none.zip"), tmp_path / "raw" / "out.zip")


def test_only_the_clients_no_credentials_exit_is_http_401(home, monkeypatch, tmp_path):
    """The kaggle client exits after its help page when no credentials worked: that is Kaggle
    rejecting them. Any other exit is reported in the client's own words, not as a 401."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    from hmnist.stages.download import _authenticated_api

    def exits(printed):
        def authenticate(self):
            print(printed)
            raise SystemExit(1)
        return authenticate

    monkeypatch.setattr(KaggleApi, "authenticate", exits("Authentication required to call the Kaggle API."))
    with pytest.raises(UserError, match=r"^Kaggle rejected the credentials \(HTTP 401\)"):
        _authenticated_api(tmp_path)
    monkeypatch.setattr(KaggleApi, "authenticate", exits("Invalid config file: expecting a mapping"))
    with pytest.raises(UserError, match=r"^the kaggle client stopped while authenticating \(exit code 1\): "
                                        r"Invalid config file: expecting a mapping$"):
        _authenticated_api(tmp_path)
