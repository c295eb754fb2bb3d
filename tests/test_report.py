"""hmnist report on two tiny runs of the synthetic archive (a commit and an experiment): its
sections, galleries, verdicts (those of `hmnist compare --json`), recipe rows, errors, and the
page in a real browser with the network cut off."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hmnist.config import CLASSES
from hmnist.bootstrap import recipe_intervals
from hmnist.gallery import gallery_rows
from hmnist.config import CLASS_COLUMNS
from hmnist.runs import CHECKPOINT, Run, read_run

from conftest import BIN, PIPELINE, make_project, run, run_here, run_stages

PER_KIND = 2
RESAMPLES = "200"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, synthetic_zip) -> Path:
    """A project with a committed run (HEAD, train.seed 0) and an experiment `seed1`."""
    root = make_project(tmp_path_factory.mktemp("report") / "project", synthetic_zip)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["models"]["resnet9"]["epochs"] = 1
    params["evaluate"]["bootstrap"] = 200
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Each run's stages in this process, then DVC records them as `dvc repro` and `dvc exp run`
    # would (dvc.lock, the cache, the experiment's ref): their stage processes would import torch
    # and timm again for seconds of work each. The pipeline and experiments through DVC's own
    # commands are test_pipeline's.
    run_stages(root, PIPELINE)
    run(["dvc", "commit", "-f", "-q"], root)
    assert "up to date" in run(["dvc", "status"], root).stdout.lower()
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "seed 0"], root)
    params["train"]["seed"] = 1  # as `dvc exp run -S train.seed=1` sets it
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stages(root, ("check_params", "train", "evaluate", "export"))  # what that change re-runs
    run(["dvc", "exp", "save", "-q", "-n", "seed1"], root)  # commits the stages' outputs, then the experiment
    assert "up to date" in run(["dvc", "status"], root).stdout.lower()
    assert run(["dvc", "exp", "list", "--name-only"], root).stdout.split() == ["seed1"]
    return root


def hmnist(*args, cwd):
    return run([str(BIN / "hmnist"), *map(str, args)], cwd, check=False)


@pytest.fixture(scope="module")
def page(two_runs) -> tuple[Path, str]:
    result = hmnist("report", "HEAD", "seed1", "--gallery", PER_KIND, "--resamples", RESAMPLES, "--device", "cpu",
                    cwd=two_runs)
    assert result.returncode == 0, result.stderr
    assert "wrote report.html" in result.stdout
    path = two_runs / "report.html"
    return path, path.read_text()


def sections(text: str) -> list[str]:
    return re.findall(r'<section class="run".*?</section>', text, flags=re.S)


def test_sections_and_galleries(two_runs, page):
    _, text = page
    found = sections(text)
    assert [re.search(r"<h2>Run (.*?)</h2>", s).group(1) for s in found] == ["HEAD", "seed1"]
    for section, spec in zip(found, ["HEAD", "seed1"]):
        assert section.count("<figcaption>") >= 4 and "no plots/" not in section  # the four plots
        expected = gallery_rows(read_run(spec, str(two_runs)), PER_KIND)
        for name in CLASSES:
            gallery = re.search(rf'<div class="gallery" data-class="{name}">(.*?)</div>', section, flags=re.S).group(1)
            assert gallery.count('class="example right"') == len(expected[name]["right"]), (spec, name)
            assert gallery.count('class="example wrong"') == len(expected[name]["wrong"]), (spec, name)
            assert gallery.count("<img") == 2 * sum(map(len, expected[name].values()))  # each beside its map
        assert sum(len(rows) for kinds in expected.values() for rows in kinds.values()) > 0
        # the run's own model card (export stage), embedded
        card = Run(spec, str(two_runs)).read("export/MODEL_CARD.md")
        embedded = re.search(r'<details class="card"><summary>Model card \(export/MODEL_CARD.md\)</summary><pre>(.*?)'
                             r"</pre></details>", section, flags=re.S).group(1)
        assert html.unescape(embedded) == card and "## Limitations and ethical considerations" in card


def test_calibration_and_operating_points_table(two_runs, page):
    _, text = page
    table = re.search(r'<table class="operating-points">(.*?)</table>', text, flags=re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    assert header[:4] == ["run", "calibration", "ECE", "Brier"]
    assert "mel@sens0.80: sensitivity" in header and "malignant@sens0.90: specificity" in header
    rows = re.findall(r'<tr class="operating-point">(.*?)</tr>', table, flags=re.S)
    assert len(rows) == 2
    assert [re.findall(r"<td[^>]*>(.*?)</td>", row)[0] for row in rows] == ["HEAD", "seed1"]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[1])
    metrics = json.loads((two_runs / "metrics/metrics.json").read_text())  # the workspace holds seed1's results
    op = metrics["operating_points"]["mel@sens0.80"]
    assert cells[header.index("mel@sens0.80: sensitivity")] == (
        f"{op['sensitivity']:.4f} [{op['sensitivity_low']:.4f}, {op['sensitivity_high']:.4f}]")
    assert cells[1] == metrics["calibration"]
    assert cells[3].startswith(f"{metrics['brier_uncalibrated']:.4f} &rarr; {metrics['brier']:.4f} [")


def test_self_contained(page):
    _, text = page
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_verdicts_are_those_of_compare(two_runs, page):
    _, text = page
    # in this process (conftest.run_here: its numbers are what counts here, not its start-up)
    result = run_here([BIN / "hmnist", "compare", "HEAD", "seed1", "--json", "--resamples", RESAMPLES], two_runs)
    expected = json.loads(result.stdout)["metrics"]
    rows = dict(re.findall(r'<tr class="verdict" data-metric="(\w+)">(.*?)</tr>', text, flags=re.S))
    assert set(rows) == set(expected)
    for metric, row in expected.items():
        cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[metric])
        assert cells[3] == f"{row['difference']:+.4f}" and cells[5] == row["verdict"], (metric, cells)
        assert cells[4] == f"[{row['low']:+.4f}, {row['high']:+.4f}]"
    assert "one run per side" in text


def test_recipe_row_and_params(two_runs):
    from hmnist.commands.report import report

    text = report([["HEAD", "seed1"]], repo=str(two_runs), per_kind=1, resamples=200, device="cpu")
    row = re.findall(r'<tr class="recipe">(.*?)</tr>', text, flags=re.S)
    assert len(row) == 1 and len(sections(text)) == 2  # one row for the recipe, a section per run
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row[0])
    header = re.findall(r"<th>(.*?)</th>", re.search(r'<table class="runs">(.*?)</tr>', text, flags=re.S).group(1))
    assert "train.seed" in header and cells[header.index("train.seed")] == "0/1"
    frames = [read_run(spec, str(two_runs)) for spec in ("HEAD", "seed1")]
    labels = frames[0]["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    mean, low, high = recipe_intervals(labels, [f[CLASS_COLUMNS].to_numpy(float) for f in frames],
                                       frames[0]["lesion_id"].to_numpy(), 200, 0)["balanced_accuracy"]
    assert cells[header.index("balanced_accuracy")] == f"{mean:.4f} [{low:.4f}, {high:.4f}]"
    assert low <= mean <= high


def test_missing_run_and_checkpoint(two_runs):
    result = hmnist("report", "HEAD", "no-such-run", cwd=two_runs)
    assert result.returncode == 2 and "'no-such-run' is not an experiment" in result.stderr
    # HEAD's checkpoint gone from the DVC cache (never pulled); the workspace holds seed1's
    cached = Run("HEAD", str(two_runs)).local_file(CHECKPOINT)
    aside = cached.with_name(cached.name + ".aside")
    cached.rename(aside)
    try:
        result = hmnist("report", "HEAD", "seed1", cwd=two_runs)
    finally:
        aside.rename(cached)
    assert result.returncode == 2
    assert result.stderr.startswith("error: HEAD's models/model.pt is not in the DVC cache") and \
        "dvc exp pull" in result.stderr and "dvc pull" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr



def test_output_path_checked_before_any_run_is_read(tmp_path, capsys):
    """-o an existing folder or a place no file can be made: one line before the runs are read
    (they do not exist here, and that error would come first otherwise)."""
    from hmnist.commands import report as report_module

    cases = {str(tmp_path): f"cannot write {tmp_path}: it is a folder (give a file in it, e.g. {tmp_path / 'report.html'})"}
    if Path("/proc/self").is_dir():
        cases["/proc/x.html"] = "cannot write /proc/x.html: cannot create a file in /proc (no files can be made there)"
    for out, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            report_module.main(["no-such-run", "-o", out, "--repo", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err == f"error: {message}\n", err


# -- in a real browser ---------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const probe = {images: images.length,
                 broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
                 resources: performance.getEntriesByType("resource").map(r => r.name)};
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script></body>"""


def chromium_offline(profile: Path) -> list[str]:
    """The command prefix that runs headless Chromium cut off from the network, with its own
    profile folder (two browsers on one profile hand the page to each other: xdist workers run
    side by side); skips with the reason when that cannot be had (the browser test must never
    pass without a browser)."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it as root)")
    cut = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if cut.returncode != 0:
        pytest.skip(f"cannot cut the network off for the browser (unshare -n: {cut.stderr.strip()})")
    return ["unshare", "-n", browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}"]


def open_offline(chromium: list[str], page: Path, netlog: Path) -> tuple[dict, list[str]]:
    """Chromium's view of `page` after load (PROBE's findings), and every URL outside files that
    asked the network for on the page's behalf (from its net log)."""
    dom = subprocess.run([*chromium, f"--log-net-log={netlog}", "--virtual-time-budget=10000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, flags=re.S)
    assert found, f"no probe output from Chromium: {dom.stderr[-2000:]}"
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # the page's requests carry its network isolation key (a file:// top frame); the browser's own
    # (component updater, network time: off the network here anyway) carry none
    urls = {e["params"]["url"] for e in log["events"] if e["type"] == start_job
            and "file://" in e["params"].get("network_isolation_key", "")}
    return (json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")),
            sorted(u for u in urls if not u.startswith(("file://", "data:"))))


def test_in_a_browser_offline(page, tmp_path):
    chromium = chromium_offline(tmp_path / "profile")
    path, text = page
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE))
    result, requested = open_offline(chromium, probe, tmp_path / "netlog.json")
    assert result["images"] == text.count("<img") and result["images"] > 0
    assert result["broken"] == [], result["broken"]
    assert result["resources"] == []  # nothing fetched beside the page itself (data: URIs are not fetches)
    assert requested == [], requested
    # the control: the same page with one outside picture, which the net log must show asked for
    control = tmp_path / "control.html"
    control.write_text(text.replace("</body>", '<img alt="outside" src="http://hmnist.invalid/x.png">' + PROBE))
    result, requested = open_offline(chromium, control, tmp_path / "control.json")
    assert result["broken"] == ["outside"] and requested == ["http://hmnist.invalid/x.png"], (result, requested)

    shot = tmp_path / "shot.png"
    subprocess.run([*chromium, f"--screenshot={shot}", "--window-size=1280,1600", path.as_uri()],
                   capture_output=True, text=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1280)
    ink = (pixels.min(axis=2) < 200).mean()  # share of pixels that are not white or near it
    colours = len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0))
    assert ink > 0.02 and pixels.std() > 10 and colours > 100, (ink, pixels.std(), colours)


def test_runs_table_shows_each_interval_metric_with_its_interval(two_runs, page):
    """The runs table's headline columns: every metric evaluate gives an interval for, with that
    interval (metrics.json's, for a run alone), ECE included."""
    from hmnist.bootstrap import INTERVAL_METRICS
    from hmnist.runs import number

    _, text = page
    table = re.search(r'<table class="runs">(.*?)</table>', text, flags=re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = re.findall(r'<tr class="recipe">(.*?)</tr>', table, flags=re.S)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[1])  # seed1, whose metrics.json the workspace holds
    metrics = json.loads((two_runs / "metrics/metrics.json").read_text())
    for name in (*INTERVAL_METRICS, "ece"):  # ECE's interval comes with the calibration (issue 27)
        expected = f"{number(metrics[name])} [{number(metrics[name + '_low'])}, {number(metrics[name + '_high'])}]"
        assert cells[header.index(name)] == expected, name
