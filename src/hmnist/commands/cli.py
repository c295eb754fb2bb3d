"""The `hmnist` command: one subcommand per task a user runs outside the DVC pipeline.

    hmnist predict --checkpoint models/model.pt PATH... [--out predictions.csv]
    hmnist compare A B [--json]
    hmnist report A [B ...] [-o report.html]

A subcommand is a module with `add_arguments(parser)` and `run(args)`, listed in SUBCOMMANDS;
the same module's `main()` serves `python -m hmnist.<module>` with the same arguments.
"""
from __future__ import annotations

import argparse
import importlib

from hmnist.errors import cli, description

# name -> (module, one-line help). Modules keep their heavy imports (torch, timm) inside
# functions, so building the parser, and `hmnist --help`, stays fast.
SUBCOMMANDS = {
    "predict": ("hmnist.commands.predict", "classify image files and write an ISIC 2018 submission CSV"),
    "compare": ("hmnist.commands.compare", "B - A per test metric, with a 95%% paired lesion-bootstrap interval"),
    "report": ("hmnist.commands.report", "one offline HTML page: runs, paired differences, plots, class-activation maps"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmnist", description="HAM10000 skin-lesion classification.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, summary) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=summary, description=description(module.__doc__, summary))
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
