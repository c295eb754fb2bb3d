"""Stage `check_params`: params.yaml checked whole, before split, train and evaluate run.

DVC removes a stage's outputs before it runs the stage's command, so a stage that stops on a
bad value (`dvc exp run -S models.resnet9.lr=-1`) has already lost the model, metrics and
plots it made last time. This stage runs first: it depends on params.yaml as a file, so any
edit re-runs it (even one DVC's own params comparison misses: to it `epochs: true` equals
`epochs: 1`), and split depends on its output, so split, train and evaluate wait for it. A bad
value stops the run here, their outputs untouched. The output is a fixed text: it never
re-runs anything after it.

Stages that DVC may order before it (download, prepare) still check params.yaml themselves.
"""
from __future__ import annotations

from hmnist.config import PARAMS_FILE, load_params
from hmnist.data import PARAMS_CHECKED
from hmnist.errors import UserError, cli

# the output's whole text: the same whatever the params, so it never re-runs a later stage
CHECKED = "params.yaml passed the checks of hmnist.config\n"


@cli
def main() -> None:
    try:
        load_params()
    except UserError as e:
        raise UserError(f"{e} (checked before any later stage ran, so their outputs are as they were: "
                        f"`git checkout {PARAMS_FILE}` takes back this and any other `-S` values)") from None
    PARAMS_CHECKED.parent.mkdir(parents=True, exist_ok=True)
    PARAMS_CHECKED.write_text(CHECKED)


if __name__ == "__main__":
    main()
