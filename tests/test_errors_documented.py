"""Every error message in the Errors reference (docs/errors.md) is exercised by some test, or
listed here as untested: a message without a test is visible, and a new one cannot slip in unseen."""
import re

from conftest import REPO

ERRORS_PAGE = REPO / "docs" / "errors.md"

# Documented messages no test provokes yet, each with why. Writing a test for one means
# removing it here (the test below fails while it is still listed).
UNTESTED = {
    ' at it (a commit), or re-run its failed stage':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    ' it, or run ':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    "'{list}' names a run twice: a recipe's runs must be different runs (seeds)":
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    "'{list}': an empty run name in the comma-separated list":
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    ', where the fix is ':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    'cannot make the --explain folder {dir}: {reason}':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    'cannot write {dir}/{image}.png: {reason}':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    'dvc exp pull origin {run}':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    'pretrained: true':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    '{run} has no models/model.pt (its stage never finished there): {the fix}':
        'documented by issues 18 and 21 after this list was made: no test matched by text yet',
    'cannot read params.yaml: {reason}':
        'an unreadable params.yaml (permissions; root reads anything)',
    'dataset {dataset} not found on Kaggle (HTTP 404): check data.dataset in params.yaml':
        'no test yet',
    'Kaggle answered HTTP {status} for {dataset}: try again later, or set data.source ...':
        'no test yet',
    'could not save the download in {folder}: {reason}':
        'no test yet',
    'cannot write data/prepared/{file}: {reason}':
        'a write that fails after the space was allocated',
    'lesions with more than one dx cannot be split by lesion: {ids}':
        'no test yet',
    "data/split.csv not found: run 'dvc repro split' first":
        'no test yet (the launcher checks it now)',
    "data/folds.csv not found: run 'dvc repro split' first":
        'no test yet',
    "data/folds.csv does not match data/split.csv: run 'dvc repro split'":
        'no test yet',
    "data/folds.csv has no fold {k}: run 'dvc repro split' (with cv.folds above {k})":
        'no test yet',
    'stopped by SIGTERM':
        'no test yet',
    'an operation of this model has no deterministic implementation on this device ({detail}): set train.deterministic to false':
        'every CPU operation has a deterministic kernel: needs CUDA',
    '{arch} has no stochastic depth: set its drop_path_rate to 0':
        'no test yet',
    "the prepared cache is {n}px but the model was trained on {m}px: run 'dvc repro'":
        'no test yet',
    '{path} is checkpoint version N, this hmnist reads version 1':
        'no test yet',
    '{path} predicts classes ..., not the ISIC 2018 ones (...)':
        'no test yet',
    "two inputs would both be image '{stem}' in the submission: {a} and {b}; rename or leave out one of them":
        'tested through a variable: the text search cannot see it',
    '{path}: not a JPEG or PNG file: ...':
        "tested through predict's constants",
    '{path}: cannot decode it as an image: {reason}':
        "tested through predict's constants",
    '{path}: cannot read it: {reason}':
        "tested through predict's constants",
    '(skip unreadable files with --skip-bad)':
        'tested through predict.SKIP_HINT',
    'cannot write {out}: {reason}':
        'no test yet',
    "{b} reads {n}px images but {a} {m}px: an ensemble's checkpoints must come from one cache size":
        'no test yet',
    '{A} and {B} disagree on the dx (or lesion_id) of image {id}: they come from different metadata':
        'no test yet',
    '{spec}: image {id} is listed twice':
        'no test yet',
    '{spec} is not a readable CSV file: ...':
        'no test yet',
}


def documented() -> list[str]:
    """The messages (backticked) of docs/errors.md's bullets that begin with one."""
    bullets: list[str] = []
    for line in ERRORS_PAGE.read_text().splitlines():
        if line.startswith("- "):
            bullets.append(line)
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
    return [m for bullet in bullets if bullet.startswith("- `")
            for m in re.findall(r"`([^`]{12,})`", bullet.replace("\\`", "'")) if " " in m]  # not a name


def pieces(message: str) -> list[str]:
    """The literal parts of a message, between its placeholders ({...}, ..., N)."""
    parts = re.split(r"\{[^}]*\}|\.\.\.|\b[NMKBRC]\b", message)
    return [p.strip(" :;,().") for p in parts if len(p.strip(" :;,().")) >= 10]


def is_tested(message: str, tests: str) -> bool:
    """A stretch of 20 characters of the message's own words (or a shorter part whole) appears
    in a test: tests match a distinctive part, often with a regular expression for the rest."""
    return not pieces(message) or any(piece[i:i + 20] in tests for piece in pieces(message)
                                      for i in range(max(1, len(piece) - 19)))


def test_every_documented_error_is_tested_or_listed():
    tests = "".join(path.read_text() for path in (REPO / "tests").glob("*.py") if path.name != __name__ + ".py")
    tests = tests.replace("\\", "").replace("`", "'")  # regular expressions escape ( . ? and such
    tests = re.sub(r"\"\s*\n\s*f?r?\"", "", tests)  # implicitly joined string literals, as one string
    messages = documented()
    assert len(messages) > 60  # the section was read
    untested = [m for m in messages if not is_tested(m, tests)]
    assert sorted(set(untested)) == sorted(UNTESTED), (
        "documented errors without a test (write one, or list it in UNTESTED with why): "
        f"{sorted(set(untested) - set(UNTESTED))}; listed but tested now or no longer documented: "
        f"{sorted(set(UNTESTED) - set(untested))}")
