"""Stage prepare: the decoded cache, its agreement with decode_image, and every input error."""
from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import hmnist.stages.prepare as prepare_module
from hmnist.config import CLASSES
from hmnist.errors import UserError
from hmnist.data import decode_image, load_prepared
from hmnist.stages.prepare import prepare
from hmnist.data import METADATA
from synthetic import image_folder

from conftest import tiny_params
from faults import dying_decoder

SIZE = 32


def metadata(archive: Path) -> pd.DataFrame:
    with zipfile.ZipFile(archive) as f:
        return pd.read_csv(io.BytesIO(f.read(METADATA)))


def member(image_id: str) -> str:
    return f"{image_folder(image_id)}/{image_id}.jpg"


def rewrite(src: Path, dest: Path, replace: dict[str, bytes] | None = None, drop=()) -> Path:
    """A copy of the zip src with some members replaced or left out."""
    replace = replace or {}
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dest, "w") as new:
        for name in old.namelist():
            if name not in drop:
                new.writestr(name, replace.get(name) or old.read(name))
    return dest


def jpeg(colour, size=(60, 45)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def assert_no_output(out: Path) -> None:
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"left behind: {left}"


@pytest.fixture(scope="module")
def prepared(synthetic_zip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(synthetic_zip, out, size=SIZE, workers=1)
    return out


def test_cache_shape_order_and_labels(prepared, synthetic_zip):
    images, index = load_prepared(prepared)
    meta = metadata(synthetic_zip).sort_values("image_id").reset_index(drop=True)
    assert isinstance(images, np.memmap) and images.mode == "r"
    assert images.shape == (len(meta), SIZE, SIZE, 3) and images.dtype == np.uint8
    assert list(index.columns) == ["image_id", "lesion_id", "dx", "label", "age", "sex", "localization"]
    assert index["image_id"].tolist() == meta["image_id"].tolist()  # sorted, one row per image
    assert index["lesion_id"].tolist() == meta["lesion_id"].tolist()
    assert index["label"].tolist() == [CLASSES.index(dx) for dx in meta["dx"]]
    assert set(index["dx"]) == set(CLASSES)
    assert images.std() > 0  # not left as zeros


def test_stage_pixels_equal_decode_image(prepared, synthetic_zip):
    images, index = load_prepared(prepared)
    with zipfile.ZipFile(synthetic_zip) as archive:
        for i, image_id in enumerate(index["image_id"]):
            np.testing.assert_array_equal(images[i], decode_image(archive.read(member(image_id)), SIZE))


def test_one_and_two_workers_write_identical_files(prepared, synthetic_zip, tmp_path):
    prepare(synthetic_zip, tmp_path, size=SIZE, workers=2)
    for name in ("images.npy", "index.csv"):
        assert (tmp_path / name).read_bytes() == (prepared / name).read_bytes(), name


def test_upper_case_folder_wins_and_each_image_is_read_once(synthetic_zip, tmp_path, monkeypatch):
    # The lower-case copies hold a different (black) image: any pixel from them shows up.
    with zipfile.ZipFile(synthetic_zip) as archive:
        names = archive.namelist()
    black = {n: jpeg((0, 0, 0)) for n in names if n.startswith("ham10000_images_part")}
    archive = rewrite(synthetic_zip, tmp_path / "dup.zip", replace=black)
    reads: list[str] = []
    original_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: reads.append(name) or original_read(self, name, pwd))
    prepare(archive, tmp_path / "out", size=SIZE, workers=1)  # in-process, so every read is seen
    image_reads = [r for r in reads if r != METADATA]
    images, index = load_prepared(tmp_path / "out")
    assert sorted(image_reads) == sorted(member(i) for i in index["image_id"])
    assert (images.reshape(len(images), -1).max(axis=1) > 60).all()  # none is the black copy


def test_lower_case_copy_used_when_upper_case_is_absent(synthetic_zip, tmp_path):
    image_id = metadata(synthetic_zip)["image_id"].iloc[3]
    upper = member(image_id)
    lower = upper.replace("HAM10000_images", "ham10000_images")
    archive = rewrite(synthetic_zip, tmp_path / "lower.zip", replace={lower: jpeg((0, 0, 255))}, drop=[upper])
    prepare(archive, tmp_path / "out", size=SIZE, workers=1)
    images, index = load_prepared(tmp_path / "out")
    blue = images[index["image_id"].tolist().index(image_id)]
    assert blue[..., 2].min() > 200 and blue[..., 0].max() < 60


def test_decode_image_squashes_the_whole_field_of_view():
    # a 600x450 frame whose outer 10% columns are red: a centre crop would lose them
    frame = np.full((450, 600, 3), 255, np.uint8)
    frame[:, :60] = frame[:, -60:] = (255, 0, 0)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
    pixels = decode_image(buffer.getvalue(), 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
    for column in (pixels[:, 5], pixels[:, -5]):
        assert (column[:, 0] > 200).all() and (column[:, 1] < 60).all()
    assert (pixels[:, 112] > 200).all()  # the white middle stays white


@pytest.mark.parametrize("data", [b"not an image", jpeg((9, 9, 9))[:300]], ids=["garbage", "truncated"])
def test_decode_image_rejects_undecodable_data(data):
    with pytest.raises(ValueError, match=r"\w"):
        decode_image(data, SIZE)


# ---- bad input: one UserError naming the problem, and no output -----------------------------

def _missing(src, dest):
    return dest


def _not_a_zip(src, dest):
    dest.write_text("<html>Kaggle says: please log in</html>")
    return dest


def _truncated(src, dest):
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def _no_metadata(src, dest):
    return rewrite(src, dest, drop=[METADATA])


def _no_dx_column(src, dest):
    csv = metadata(src).drop(columns="dx").to_csv(index=False).encode()
    return rewrite(src, dest, replace={METADATA: csv})


def _unknown_dx(src, dest):
    meta = metadata(src)
    meta.loc[5, "dx"] = "melanoma"
    return rewrite(src, dest, replace={METADATA: meta.to_csv(index=False).encode()})


def _duplicate_ids(src, dest):
    meta = metadata(src)
    meta = pd.concat([meta, meta.iloc[[2]]])
    return rewrite(src, dest, replace={METADATA: meta.to_csv(index=False).encode()})


def _absent_images(src, dest):
    ids = sorted(metadata(src)["image_id"])[:7]
    gone = [member(i) for i in ids] + [member(i).replace("HAM10000_images", "ham10000_images") for i in ids]
    return rewrite(src, dest, drop=gone)


def _corrupt_jpeg(src, dest):
    image_id = sorted(metadata(src)["image_id"])[-1]  # the last one: the others decode first
    return rewrite(src, dest, replace={member(image_id): b"\xff\xd8\xff\xe0 this is not a JPEG"})


def _damaged_member(src, dest):
    """Bytes flipped inside one stored image: the zip directory is intact, the CRC check fails."""
    image_id = sorted(metadata(src)["image_id"])[-1]
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        info = archive.getinfo(member(image_id))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # 30: the local header
    data[start + 100:start + 110] = bytes(10)
    dest.write_bytes(bytes(data))
    return dest


def _damaged_message(src):
    image_id = sorted(metadata(src)["image_id"])[-1]
    return rf"cannot read {member(image_id)} \(image {image_id}\) from .*Bad CRC-32.*download it again$"


def _corrupt_message(src):
    image_id = sorted(metadata(src)["image_id"])[-1]
    return rf"cannot decode image {image_id} \({member(image_id)} in "


BAD_INPUTS = {
    "missing": (_missing, lambda src: r"not found: run the download stage first"),
    "not_a_zip": (_not_a_zip, lambda src: r"is not a zip archive"),
    "truncated": (_truncated, lambda src: r"is truncated or damaged .*download it again"),
    "no_metadata": (_no_metadata, lambda src: rf"{METADATA} not found in the archive"),
    "no_dx_column": (_no_dx_column, lambda src: r"lacks column\(s\) dx: it needs image_id, lesion_id, dx \(has lesion_id, image_id, dx_type"),
    "unknown_dx": (_unknown_dx, lambda src: r"unknown dx label\(s\) 'melanoma' \(e\.g\. image ISIC_\d+\); known: mel, nv, bcc, akiec, bkl, df, vasc$"),
    "duplicate_ids": (_duplicate_ids, lambda src: r"lists 1 image_id\(s\) more than once: ISIC_\d+$"),
    "absent_images": (_absent_images, lambda src: r"^7 image\(s\) listed in HAM10000_metadata.csv are not in the archive .*: "
                                                  r"ISIC_0024306, ISIC_0024307, ISIC_0024308, ISIC_0024309, ISIC_0024310 and 2 more$"),
    "corrupt_jpeg": (_corrupt_jpeg, _corrupt_message),
    "damaged_member": (_damaged_member, _damaged_message),
}


# errors found while decoding come from the pool's workers too
@pytest.mark.parametrize("case, workers", [(case, 1) for case in BAD_INPUTS] + [("corrupt_jpeg", 2), ("damaged_member", 2)])
def test_bad_input_raises_user_error_and_leaves_no_output(case, workers, synthetic_zip, tmp_path):
    make, message = BAD_INPUTS[case]
    archive = make(synthetic_zip, tmp_path / "skin-cancer-mnist-ham10000.zip")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "images.npy").write_bytes(b"a previous run's output")  # must not survive a failed run
    with pytest.raises(UserError, match=message(synthetic_zip)) as error:
        prepare(archive, out, size=SIZE, workers=workers)
    assert "\n" not in str(error.value)
    assert_no_output(out)


def test_interrupted_run_leaves_no_output(synthetic_zip, tmp_path, monkeypatch):
    calls = []

    def interrupted(data, size):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return decode_image(data, size)

    monkeypatch.setattr(prepare_module, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic_zip, tmp_path, size=SIZE, workers=1)
    assert_no_output(tmp_path)


# ---- the command line -----------------------------------------------------------------------

def run_stage(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmnist.stages.prepare"], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def stage_dir(tmp_path, synthetic_zip) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(synthetic_zip), sort_keys=False))
    (tmp_path / "data/raw").mkdir(parents=True)
    return tmp_path


def test_cli_writes_the_cache(stage_dir, synthetic_zip, prepared):
    shutil.copy(synthetic_zip, stage_dir / "data/raw/skin-cancer-mnist-ham10000.zip")
    result = run_stage(stage_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (stage_dir / "data/prepared").iterdir()) == ["images.npy", "index.csv"]
    for name in ("images.npy", "index.csv"):  # params.yaml's size is the tests' SIZE
        assert (stage_dir / "data/prepared" / name).read_bytes() == (prepared / name).read_bytes()


@pytest.mark.parametrize("case", ["missing", "truncated", "unknown_dx", "corrupt_jpeg"])
def test_cli_reports_bad_input_in_one_line(case, stage_dir, synthetic_zip):
    make, message = BAD_INPUTS[case]
    make(synthetic_zip, stage_dir / "data/raw/skin-cancer-mnist-ham10000.zip")
    result = run_stage(stage_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (stage_dir / "data/prepared/images.npy").exists()


# ---- faults: a worker killed or raising, a full disk. None may hang -------------------------
# multiprocessing.Pool once hung here, and only beside a CPU hog: it waited for a dead worker's
# task, a race that load widened. The decoder pool is concurrent.futures' now, which fails every
# task the moment a worker dies, whatever the timing, so no hog is needed to catch a hang (one
# slowed the timed tests of the other pytest workers). Each test still repeats with the fault at
# other images, and pytest-timeout ends a hang: a guard far above a healthy run, even on a busy
# machine, not a speed limit.

ATTEMPTS = 5
CLI_ATTEMPTS = 3  # each starts Python and numpy: seconds on a loaded machine
DEADLINE = 60  # seconds for one attempt; a healthy one takes about one on a loaded machine


@pytest.mark.timeout(ATTEMPTS * DEADLINE)
@pytest.mark.parametrize("action, error, message", [("kill", UserError, "a decoding process died before prepare finished"),
                                                    ("raise", RuntimeError, "a bug in the decoder")])
def test_a_worker_killed_or_raising_mid_run_ends_the_stage_at_once(action, error, message, synthetic_zip,
                                                                   tmp_path, monkeypatch):
    for attempt in range(ATTEMPTS):
        out = tmp_path / str(attempt)
        monkeypatch.setattr(prepare_module, "decode_image", dying_decoder(tmp_path / f"flag{attempt}", 5 + 7 * attempt, action))
        with pytest.raises(error, match=message):  # a bug keeps its own exception, and so its traceback
            prepare(synthetic_zip, out, size=SIZE, workers=2)
        assert (tmp_path / f"flag{attempt}").exists()  # a worker did die or raise
        assert_no_output(out)


KILLING_STAGE = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import hmnist.stages.prepare
from faults import dying_decoder
hmnist.stages.prepare.decode_image = dying_decoder(Path("flag"), 9, "kill")
hmnist.stages.prepare.main()
"""


@pytest.mark.timeout(CLI_ATTEMPTS * DEADLINE)
@pytest.mark.parametrize("case", ["killed_worker", "corrupt_jpeg"])
def test_cli_reports_a_failed_worker_in_one_line(case, stage_dir, synthetic_zip):
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["prepare"]["workers"] = 2
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    archive = stage_dir / "data/raw/skin-cancer-mnist-ham10000.zip"
    if case == "killed_worker":
        shutil.copy(synthetic_zip, archive)
        command = [sys.executable, "-c", KILLING_STAGE.format(tests=str(Path(__file__).parent))]
        message = "error: a decoding process died before prepare finished"
    else:
        _corrupt_jpeg(synthetic_zip, archive)
        command = [sys.executable, "-m", "hmnist.stages.prepare"]
        message = "error: cannot decode image"
    for attempt in range(CLI_ATTEMPTS):
        (stage_dir / "flag").unlink(missing_ok=True)
        result = subprocess.run(command, cwd=stage_dir, capture_output=True, text=True, timeout=DEADLINE)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
        assert_no_output(stage_dir / "data/prepared")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs, where this test may mount one (root, and a kernel that lets it)."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.timeout(ATTEMPTS * DEADLINE)
def test_a_full_disk_is_one_line_before_decoding_and_leaves_nothing(small_disk, synthetic_zip, stage_dir):
    needed = len(metadata(synthetic_zip)) * 64 * 64 * 3 / 1e6  # at size 64, about twice what the disk holds
    for attempt in range(ATTEMPTS):
        with pytest.raises(UserError, match=rf"^no space left on device: the cache needs {needed:.1f} MB in "
                                            rf"{small_disk}, 1\.0 MB are free"):
            prepare(synthetic_zip, small_disk, size=64, workers=2)
        assert_no_output(small_disk)
    # the command line, as the issue found it: in one line, with the stage's own folder
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["prepare"]["size"] = 64
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(synthetic_zip, stage_dir / "data/raw/skin-cancer-mnist-ham10000.zip")
    (stage_dir / "data/prepared").symlink_to(small_disk)
    result = subprocess.run([sys.executable, "-m", "hmnist.stages.prepare"], cwd=stage_dir, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"error: no space left on device: the cache needs {needed:.1f} MB in data/prepared"), result.stderr
    assert_no_output(small_disk)


def test_a_disk_that_fills_after_the_check_is_the_same_one_line(synthetic_zip, small_disk, monkeypatch):
    # another process takes the space between the free-space check and the allocation
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(UserError, match=rf"^no space left on device: the cache needs .* MB in {small_disk}"):
        prepare(synthetic_zip, small_disk, size=64, workers=1)
    assert_no_output(small_disk)


def test_damaged_cache_is_named_with_its_recovery(prepared, tmp_path, monkeypatch):
    """A cache cut short (or with a garbled header) is one line naming the file, what is wrong,
    and the recovery: with a dvc.lock, the DVC cache object linked to it that must go too."""
    folder = tmp_path / "data/prepared"
    shutil.copytree(prepared, folder)
    images = folder / "images.npy"
    whole = images.read_bytes()
    monkeypatch.chdir(tmp_path)
    relative = Path("data/prepared/images.npy")

    images.write_bytes(whole[:len(whole) - 1000])
    with pytest.raises(UserError, match=rf"^{relative} is damaged \({len(whole) - 1000:,} bytes where its "
                                        rf"header's \d+x{SIZE}x{SIZE}x3 images need {len(whole):,}\): delete it, "
                                        r"and DVC's cache object linked to it if any \(docs/data.md#a-damaged-prepared-cache\), "
                                        r"then run dvc repro prepare$"):
        load_prepared(Path("data/prepared"))
    Path("dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {"outs": [
        {"path": "data/prepared/images.npy", "md5": "d5816f35916d1d9482fb0f1ec201101d", "size": len(whole)}]}}}))
    with pytest.raises(UserError, match=rf"and so is DVC's cache object when linked to it \(this project's cache.type\): "
                                        rf"rm -f {relative} \.dvc/cache/files/md5/d5/816f35916d1d9482fb0f1ec201101d, "
                                        r"then run dvc repro prepare$"):
        load_prepared(Path("data/prepared"))

    images.write_bytes(whole[:20])
    with pytest.raises(UserError, match=r"is damaged \(its .npy header is unreadable: "):
        load_prepared(Path("data/prepared"))
    header = whole[:whole.index(b"\n") + 1]
    images.write_bytes(header.replace(b"'|u1'", b"'<f4'") + whole[len(header):])
    with pytest.raises(UserError, match=r"is damaged \(its header says float32 \d+x32x32x3, not N x size x size x 3 uint8\)"):
        load_prepared(Path("data/prepared"))

    images.write_bytes(whole)
    index = pd.read_csv(folder / "index.csv")
    index.iloc[:-1].to_csv(folder / "index.csv", index=False)
    with pytest.raises(UserError, match=rf"images.npy holds {len(index)} images but index.csv lists {len(index) - 1}: "
                                        "run the prepare stage again"):
        load_prepared(Path("data/prepared"))
