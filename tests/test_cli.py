"""The `hmnist` command's own parser: what `--help` shows."""
from __future__ import annotations

import importlib
import re

import pytest

from hmnist.commands import cli


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_help_shows_each_commands_whole_first_paragraph(name, capsys):
    """`hmnist compare --help` once stopped at '... with a 95%': the description was the
    docstring's first line, and its first sentence wraps. It is the whole first paragraph."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([name, "--help"])
    assert stopped.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse re-wraps it to the terminal's width
    doc = importlib.import_module(cli.SUBCOMMANDS[name][0]).__doc__
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    assert paragraph.endswith("."), paragraph
    assert re.search(r"\bhmnist \w+ \[-h\].*? " + re.escape(paragraph) + " ", shown), shown
