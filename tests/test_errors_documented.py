"""Every error message in the Errors reference (docs/errors.md) is exercised by some test, or
listed here as untested: a message without a test is visible, and a new one cannot slip in unseen.
And every message the code raises as a UserError is in that reference."""
import ast
import re

from conftest import REPO

ERRORS_PAGE = REPO / "docs" / "errors.md"

# Documented messages no test provokes yet, each with why. Writing a test for one means
# removing it here (the test below fails while it is still listed).
UNTESTED = {
    'cannot make the --explain folder {dir}: {reason}':
        'a folder that cannot be made (a file in the way, no permission): no test yet',
    'could not save the download in {folder}: {reason}':
        'no test yet',
    'cannot write data/prepared/{file}: {reason}':
        'a write that fails after the space was allocated',
    'stopped by SIGTERM':
        'no test yet',
    'an operation of this model has no deterministic implementation on this device ({detail}): set train.deterministic to false':
        'every CPU operation has a deterministic kernel: needs CUDA',
    "two inputs would both be image '{stem}' in the submission: {a} and {b}; rename or leave out one of them":
        'tested through a variable: the text search cannot see it',
    'cannot read --metadata {file}: {reason}':
        'a metadata file that exists but cannot be read (permissions, not text): no test yet',
    "ONNX Runtime cannot run {path}: ...":
        'a graph that onnx parses and whose hmnist metadata and shapes are right, yet ONNX Runtime refuses: none is cheap to make',
    "ONNX export and inference need the onnx, onnxruntime and onnxscript packages (...): pip install -e . (they are hmnist dependencies)":
        'they are dependencies of hmnist: the test environment has them',
}


def code_spans(text: str) -> list[str]:
    """Markdown's code spans of `text`. A span opens with a run of backticks and closes at the
    next run of the same length, so ``` `` `dvc pull` at it `` ``` is one span that holds
    backticks, not pieces of two messages with the prose between them taken for a third."""
    spans, i = [], 0
    while (start := text.find("`", i)) >= 0:
        fence = re.match(r"`+", text[start:]).group()
        end = re.compile(rf"(?<!`){fence}(?!`)").search(text, start + len(fence))
        if end is None:  # no closing run: literal backticks, as Markdown reads them
            i = start + len(fence)
            continue
        spans.append(text[start + len(fence):end.start()].strip())  # the padding beside a backtick
        i = end.end()
    return spans


# a params.yaml setting (`pretrained: true`) in a note: code, not a message
SETTING = re.compile(r"[\w.]+: [\w.]+")


def documented() -> list[str]:
    """The messages (backticked) of docs/errors.md's bullets that begin with one. A backtick
    inside a message (escaped, or in a double-backtick span) reads as the quote that tests
    write in its place."""
    bullets: list[str] = []
    for line in ERRORS_PAGE.read_text().splitlines():
        if line.startswith("- "):
            bullets.append(line)
        elif line.startswith("  ") and bullets:
            bullets[-1] += " " + line.strip()
    return [span.replace("`", "'") for bullet in bullets if bullet.startswith("- `")
            for span in code_spans(bullet.replace("\\`", "'"))
            if len(span) >= 12 and " " in span and not SETTING.fullmatch(span)]  # a message, not a name


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


# ---- every message the code raises is documented -----------------------------------------------

SOURCE = REPO / "src" / "hmnist"
MIN_KEY = 12  # shorter literal text ("cannot read ", " has no ") would match almost anywhere

# Raised messages the test cannot look for, each with why and where the docs have it: literal
# text shorter than MIN_KEY before and between the placeholders, or a message built elsewhere.
# (file, the message with {} for each placeholder, or the expression given to UserError): why.
UNMATCHABLE = {
    ("config.py", "cannot read {}: {}"):
        "'cannot read' alone is in several messages; documented as `cannot read params.yaml: {reason}`",
    ("config.py", "{}: {}"):
        "a message of the checks above, prefixed with the params file's path",
    ("config.py", "{} must be {}, got {}"):
        "the type check, all placeholders; documented as `params.yaml: models.deit.batch_size must be int, got 'big'`",
    ("distributed.py", "stopped by {}"):
        "'stopped by' is 10 characters; documented as `stopped by SIGTERM`",
    ("distributed.py", "message.removeprefix('UserError: ')"):
        "a worker's own UserError, raised again by the launcher as itself: one of the other messages",
    ("models.py", "checkpoint {} is a folder{}"):
        "'is a folder' is 11 characters; documented as `checkpoint {path} is a folder: give one of its checkpoints ...`",
    ("runs.py", "{} has no {}: {}"):
        "the missing file is a placeholder; documented as `{run} has no metrics/metrics.json`, "
        "`{run} has no models/model.pt ...` and the like",
    ("stages/download.py", "cannot read {}: {}"):
        "'cannot read' alone is in several messages; documented as `cannot read {path}: {reason}` under download",
    ("gallery.py", "{}'s {}: {}"):
        "the checkpoint's path is runs.CHECKPOINT, derived from data.py's (no literal); documented as "
        "`{run}'s models/model.pt: {a checkpoint error above}`",
    ("stages/prepare.py", "cannot read {}: {}"):
        "'cannot read' alone is in several messages; documented as `cannot read {zip}: {reason}`",
    ("stages/prepare.py", "error"):
        "a decoding worker's message (an image it cannot read or decode, a cache it cannot write), "
        "built in _decode_chunk: each is documented under prepare",
}


def module_strings(path) -> dict[str, str]:
    """Module-level string constants (`METADATA = "HAM10000_metadata.csv"`, `SPLIT =
    Path("data/split.csv")`), and those imported from other hmnist modules."""
    tree = ast.parse(path.read_text())
    strings: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hmnist."):
            other = module_strings(SOURCE.joinpath(*node.module.split(".")[1:]).with_suffix(".py"))
            strings.update({alias.asname or alias.name: other[alias.name] for alias in node.names
                            if alias.name in other})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "Path"
                    and len(value.args) == 1):
                value = value.args[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                strings[node.targets[0].id] = value.value
    return strings


def literal_parts(expr: ast.expr, strings: dict[str, str]) -> list[str] | None:
    """A message's literal text, split at its placeholders; None if `expr` is not a message
    written out here (a variable, a helper's result). A placeholder naming a module constant
    is the constant's text, as the docs write it."""
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)  # f"...".rstrip()
            and isinstance(expr.func.value, (ast.Constant, ast.JoinedStr))):
        expr = expr.func.value
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if not isinstance(expr, ast.JoinedStr):
        return None
    parts = [""]
    for value in expr.values:
        if isinstance(value, ast.Constant):
            parts[-1] += value.value
        elif isinstance(value.value, ast.Name) and value.value.id in strings and value.conversion == -1:
            parts[-1] += strings[value.value.id]
        else:
            parts.append("")
    return parts


def message_expressions(path) -> list[ast.expr]:
    """What each `UserError(...)` in a module is given, following two indirections: a helper
    of the module that returns the message (`UserError(_refusal(status, dataset))`), and a
    local function's parameter (`def need(ok, message): ... raise UserError(message)`), whose
    callers' arguments are the messages."""
    tree = ast.parse(path.read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]

    def enclosing(node):  # the innermost function around it (the last to start), if any
        around = [f for f in functions.values() if any(n is node for n in ast.walk(f))]
        return max(around, key=lambda f: f.lineno) if around else None

    found = []
    for call in calls:
        if call.func.id != "UserError" or not call.args:
            continue
        given = call.args[0]
        if (isinstance(given, ast.Call) and isinstance(given.func, ast.Name) and given.func.id in functions):
            found += [r.value for r in ast.walk(functions[given.func.id]) if isinstance(r, ast.Return) and r.value]
            continue
        if isinstance(given, ast.Name) and (function := enclosing(call)):
            names = [a.arg for a in function.args.args]
            if given.id in names:
                position = names.index(given.id)
                found += [c.args[position] for c in calls
                          if c.func.id == function.name and len(c.args) > position]
                continue
        found.append(given)
    return found


def raised_messages() -> list[tuple[str, str, str | None]]:
    """(file, the message with {} for each placeholder, the text docs/errors.md must hold) for
    each message given to a UserError; the text is None where there is none to look for."""
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        strings = module_strings(path)
        where = str(path.relative_to(SOURCE))
        for expr in message_expressions(path):
            parts = literal_parts(expr, strings)
            if parts is None:
                found.append((where, ast.unparse(expr), None))
                continue
            # a trailing ", got" only introduces the value echoed back ("... must be at least 1, got 0")
            stretches = [re.sub(r",? got$", "", part.strip(" .,:;(")) for part in parts]
            key = next((re.sub(r"\s+", " ", s) for s in stretches if len(s) >= MIN_KEY), None)
            found.append((where, "{}".join(parts), key))
    return found


def test_every_raised_error_is_documented():
    """Each message a UserError carries has its literal text up to the first placeholder (or,
    when that is too short to tell it apart, its first longer stretch between placeholders) in
    docs/errors.md, so no error a user can meet is missing from the reference."""
    page = re.sub(r"\s+", " ", ERRORS_PAGE.read_text().replace("\\`", "`"))
    messages = raised_messages()
    assert len(messages) > 140  # the code was read, the messages passed through need() included
    missing = sorted({f"{where}: {key!r}" for where, _, key in messages if key and key not in page})
    assert not missing, "raised but not in docs/errors.md (document each, with its fix): " + "; ".join(missing)
    unmatchable = {(where, template) for where, template, key in messages if key is None}
    assert sorted(unmatchable) == sorted(UNMATCHABLE), (
        "messages with no literal text to look for (list each in UNMATCHABLE, with why): "
        f"{sorted(unmatchable - set(UNMATCHABLE))}; listed but now matchable or gone: "
        f"{sorted(set(UNMATCHABLE) - unmatchable)}")


def test_every_raised_error_shows_its_real_ending():
    """Issue 28: the reference listed `lr must be positive` where the line reads
    `models.deit.lr must be positive, got -1.0`, and cut others short. Each message, as the code
    writes it, is a backticked message of docs/errors.md: its literal text in order, each
    placeholder filled in any way (`{reason}`, `...`, an example value), and one at its end
    (the value it got, the reason) shown there too. A subject placeholder at the start may be
    left out (`... is not a readable zip file: download it again`)."""
    page = re.sub(r"\s+", " ", ERRORS_PAGE.read_text().replace("\\`", "'").replace("``", "`"))
    cut = []
    for path in sorted(SOURCE.rglob("*.py")):
        strings = module_strings(path)
        for expr in message_expressions(path):
            parts = literal_parts(expr, strings)
            if parts is None:
                continue
            literal = [re.escape(re.sub(r"\s+", " ", part).replace("`", "'")) for part in parts]
            # a placeholder: one or more characters; a message ending in one ends in "[^`]+?`"
            pattern = "`[^`]*?" + "[^`]+?".join(literal[1:] if not parts[0] else literal) + "`"
            if not re.search(pattern, page):
                cut.append(f"{path.relative_to(SOURCE)}: {'{}'.join(parts)!r}")
    assert not cut, "messages docs/errors.md does not show whole (write each out, ending included): " + "; ".join(cut)
