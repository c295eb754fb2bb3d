"""Stage `download`: the HAM10000 Kaggle zip, fetched from Kaggle or taken from a local copy.

    python -m hmnist.stages.download    # reads data.source and data.dataset from params.yaml

`data.source: kaggle` downloads `data.dataset` with the official `kaggle` client, using the
credentials Kaggle users already have (KAGGLE_API_TOKEN, ~/.kaggle/access_token, kaggle.json,
KAGGLE_USERNAME + KAGGLE_KEY). Any other value is a path to the zip or to its unpacked folder.
The zip is kept as it is: the prepare stage reads images straight out of it.

HMNIST_KAGGLE_ENDPOINT=http://host:port sends the client's API calls to that base URL instead of
https://api.kaggle.com: for a mirror, and for the fake server the tests run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from hmnist.config import DataConfig, load_params, user_path
from hmnist.data import ARCHIVE, METADATA
from hmnist.errors import UserError, cli

ENDPOINT_VARIABLE = "HMNIST_KAGGLE_ENDPOINT"
KAGGLE_API = "https://api.kaggle.com"
TOKEN_PAGE = "https://www.kaggle.com/settings"
AUTH_HELP = "Authentication required"  # how the client's help begins when no credentials worked


def download(data: DataConfig, out: Path) -> Path:
    """Put the dataset's zip at `out`, from Kaggle or from `data.source`, and return `out`.

    Everything is staged in a hidden folder beside `out` and renamed into place only once it is a
    readable zip, so an interrupted run never leaves a file that DVC would cache as the dataset.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        staged = Path(staging) / out.name
        if data.source == "kaggle":
            downloaded = _from_kaggle(data.dataset, Path(staging))
            _check_zip(downloaded, f"the file Kaggle sent for {data.dataset}",
                       unreadable="run again", not_ham="check data.dataset in params.yaml")
            os.replace(downloaded, staged)
        else:
            _from_local(user_path(data.source), staged)
        os.replace(staged, out)  # same folder, so an atomic rename
    return out


def _from_local(source: Path, staged: Path) -> None:
    """Hard-link the user's zip (5 GB need not be copied), or zip their unpacked folder."""
    if not source.exists():
        raise UserError(f"data.source: {source} does not exist "
                        f"(give the Kaggle zip, its unpacked folder, or 'kaggle')")
    if source.is_dir():
        if not (source / METADATA).is_file():
            # one or two folders down: a folder holding the unpacked dataset's folder
            nested = sorted(source.glob(f"*/{METADATA}")) + sorted(source.glob(f"*/*/{METADATA}"))
            found = f"; it is in {nested[0].parent}: set data.source to that folder" if nested else ""
            raise UserError(f"data.source: {source} does not look like the HAM10000 Kaggle dataset "
                            f"(no {METADATA} in it{found})")
        _zip_folder(source, _folder_files(source), staged)  # every file checked readable before minutes of zipping
        return
    _check_readable(source)  # zipfile.is_zipfile says False for a file it may not open
    if not zipfile.is_zipfile(source):
        raise UserError(f"data.source: {source} is not a zip file (give the Kaggle zip or its unpacked folder)")
    _check_zip(source, f"data.source: {source}", unreadable="download it again",
               not_ham="give the Kaggle zip or its unpacked folder",
               nested="unzip it and set data.source to the unpacked {folder} folder")
    try:
        os.link(source, staged)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, staged)


def _check_readable(path: Path) -> None:
    """A file the user named (or holds in data.source) that this process may not open is one
    line naming it, not a PermissionError traceback or a misleading "not a zip file"."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None


def _folder_files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted (the same folder, the same zip), each checked readable.
    os.walk, not Path.rglob: rglob skips a subfolder it may not list without a word, and the
    prepare stage would then report its images as missing from the metadata's archive."""
    def refuse(error: OSError) -> None:
        if isinstance(error, PermissionError):
            raise UserError(f"cannot read {error.filename}: permission denied")
        raise UserError(f"cannot read {error.filename}: {error.strerror or error}")  # e.g. a folder gone meanwhile

    files = sorted(Path(root, name) for root, _, names in os.walk(folder, onerror=refuse) for name in names)
    files = [path for path in files if path.is_file()]
    for path in files:  # opening 10,015 files costs well under a second; zipping them, minutes
        _check_readable(path)
    return files


def _zip_folder(folder: Path, files: list[Path], staged: Path) -> None:
    total = sum(path.stat().st_size for path in files)
    # ZIP_STORED: JPEGs do not compress, and deflating 5 GB would cost minutes for nothing.
    # strict_timestamps=False: files dated before 1980 (some copy tools do that) are not an error.
    with zipfile.ZipFile(staged, "w", zipfile.ZIP_STORED, strict_timestamps=False) as archive, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"zipping {folder}") as bar:
        for path in files:
            archive.write(path, path.relative_to(folder).as_posix())
            bar.update(path.stat().st_size)


def _check_zip(path: Path, what: str, unreadable: str, not_ham: str, nested: str | None = None) -> None:
    """Open the central directory (cheap, even for 5 GB) and look for the metadata table.

    Only a light check: the prepare stage decodes every image and says exactly what is wrong.
    `nested`, with {folder}: the fix when the table sits in a folder inside the zip (the Kaggle
    zip has it at the top level, and prepare reads the images by that layout).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{what} is not a readable zip file: {unreadable}") from None
    if METADATA in names:
        return
    below = sorted((name for name in names if name.endswith("/" + METADATA)), key=lambda name: (name.count("/"), name))
    if below and nested is not None:
        folder = below[0].rsplit("/", 1)[0]
        raise UserError(f"{what} holds {METADATA} in its folder {folder}/, not at its top level as the Kaggle zip "
                        f"does: {nested.format(folder=folder)}")
    raise UserError(f"{what} does not look like the HAM10000 Kaggle dataset (no {METADATA} "
                    f"at its top level): {not_ham}")


def _from_kaggle(dataset: str, staging: Path) -> Path:
    """Download `dataset` into `staging` with the kaggle client; returns the zip's path."""
    endpoint = os.environ.get(ENDPOINT_VARIABLE, "").rstrip("/")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise UserError(f"{ENDPOINT_VARIABLE} must be a base URL such as http://127.0.0.1:8080, got {endpoint!r}")
    config_dir = _kaggle_config_dir()
    # Checked before the kaggle package is imported: it would print a page of help and exit.
    if not _have_credentials(config_dir):
        raise UserError(
            f"no Kaggle credentials found: create an API token at {TOKEN_PAGE} and save it in "
            f"~/.kaggle/access_token or KAGGLE_API_TOKEN (or a legacy kaggle.json in {config_dir}), "
            f"or set data.source in params.yaml to a local copy of the dataset")
    import requests  # the kaggle client's own HTTP library, so its errors are these

    with _kaggle_endpoint(endpoint):
        try:
            api = _authenticated_api(config_dir)
            # force: staging is always empty, so nothing to skip; quiet=False: the client's progress bar
            api.dataset_download_files(dataset, path=str(staging), force=True, quiet=False, unzip=False)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else None
            raise UserError(_refusal(status, dataset)) from None
        except (requests.ConnectionError, requests.Timeout):
            raise UserError(f"cannot reach Kaggle ({endpoint or KAGGLE_API}): check the internet connection, "
                            f"or set data.source in params.yaml to a local copy of the dataset") from None
        except requests.RequestException as e:  # the transfer broke and the client's retries gave up
            raise UserError(f"the download of {dataset} was interrupted ({type(e).__name__}): run again") from None
        except OSError as e:  # requests' errors are OSErrors too, hence last: this is the disk
            raise UserError(f"could not save the download in {staging.parent}: {e.strerror or e}") from None
    return staging / f"{dataset.split('/')[1]}.zip"  # the client names the file after the dataset


def _refusal(status: int | None, dataset: str) -> str:
    if status == 401:
        return f"Kaggle rejected the credentials (HTTP 401): check them, or create a new API token at {TOKEN_PAGE}"
    if status == 403:
        return (f"Kaggle refused access to {dataset} (HTTP 403): open https://www.kaggle.com/datasets/{dataset} "
                f"and accept its rules/license, then run again")
    if status == 404:
        return f"dataset {dataset} not found on Kaggle (HTTP 404): check data.dataset in params.yaml"
    return (f"Kaggle answered HTTP {status} for {dataset}: try again later, "
            f"or set data.source in params.yaml to a local copy of the dataset")


def _kaggle_config_dir() -> Path:
    """Where the kaggle client looks for kaggle.json; its rule, repeated so we can check first."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    legacy = Path.home() / ".kaggle"
    if legacy.exists() or not sys.platform.startswith("linux"):
        return legacy
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"


def _have_credentials(config_dir: Path) -> bool:
    """Whether any credential the kaggle client accepts is present. Only checks; never shows one."""
    def non_empty(path: Path) -> bool:
        return path.is_file() and path.read_bytes().strip() != b""

    token = os.environ.get("KAGGLE_API_TOKEN", "")  # the token itself, or a file holding it
    if token and (non_empty(Path(token)) or not Path(token).exists()):
        return True
    # The client reads these from ~/.kaggle whatever KAGGLE_CONFIG_DIR says; credentials.json is
    # what `kaggle auth login` leaves.
    tokens = ("access_token", "access_token.txt", "credentials.json")
    if any(non_empty(Path.home() / ".kaggle" / name) for name in tokens):
        return True
    try:
        legacy = json.loads((config_dir / "kaggle.json").read_text())
    except (OSError, ValueError):
        legacy = {}
    legacy = legacy if isinstance(legacy, dict) else {}
    # as in the client, KAGGLE_USERNAME and KAGGLE_KEY override the file's entries one by one
    username = os.environ.get("KAGGLE_USERNAME") or legacy.get("username")
    key = os.environ.get("KAGGLE_KEY") or legacy.get("key")
    return bool(username and key)


def _authenticated_api(config_dir: Path):
    # Any import from the kaggle package runs kaggle/__init__.py, which authenticates a module-level
    # client and prints help when that fails: noise here, since we authenticate our own below.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    api.config = str(config_dir / "kaggle.json")  # the class fixed its path at import; follow the env now
    # VERBOSE=1 makes the client print every request's headers, and with them the credentials.
    api.args = [arg for arg in api.args if arg not in ("--verbose", "-v")]
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # on failure it prints its help page, then exits
            api.authenticate()
    except SystemExit as e:
        if AUTH_HELP in said.getvalue():
            # no method worked, and we saw credentials: Kaggle rejected them (a token is checked
            # with Kaggle here; a kaggle.json key only with the download itself)
            raise UserError(_refusal(401, "")) from None
        # another of the client's exits: say what it said rather than guess at a cause
        words = next((line.strip() for line in said.getvalue().splitlines() if line.strip()), "no message")
        raise UserError(f"the kaggle client stopped while authenticating (exit code {e.code}): {words}") from None
    print(said.getvalue(), end="")  # e.g. its warning that kaggle.json is readable by other users
    return api


@contextlib.contextmanager
def _kaggle_endpoint(url: str):
    """Send the kaggle client to `url` instead of https://api.kaggle.com while inside the block."""
    if not url:
        yield
        return
    from kagglesdk import kaggle_env

    # The client takes no base URL: each time one is built, it looks its environment up in this
    # table. PROD is the environment the kaggle API object asks for, and the one whose URLs are
    # plain {base}/v1/{service}/{method}. Every other part of the download runs unchanged.
    table = kaggle_env._env_to_endpoint
    saved = table[kaggle_env.KaggleEnv.PROD]
    table[kaggle_env.KaggleEnv.PROD] = url
    try:
        yield
    finally:
        table[kaggle_env.KaggleEnv.PROD] = saved


@cli
def main() -> None:
    params = load_params()
    out = download(params.data, ARCHIVE)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
