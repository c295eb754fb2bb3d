"""Stage `train`: fit `models.${model}` on the train split (fold k's training folds with
`--fold k`), keep the epoch `train.select` picks, and write models/model.pt (models/foldK.pt),
the dvclive curves and plots/training_curves.png. The training itself is `hmnist.trainer`'s.

After every epoch the full training state is saved under models/.resume/, so an interrupted
run continues where it stopped. With `train.devices` above 1, this process starts one worker
process per device through torchrun (hmnist.distributed) and waits for them; each runs this
module's main() and trains on its share of every batch, and rank 0 alone writes.
"""
from __future__ import annotations

import logging
import sys

from hmnist import collectives, distributed
from hmnist.config import Params, load_params
from hmnist.data import PREPARED, fold_paths, fold_split, load_folds, load_prepared, load_split
from hmnist.errors import cli
from hmnist.resume import remove_abandoned_states, resume_key

log = logging.getLogger("hmnist.stages.train")  # not __name__: run with -m, that is "__main__", outside hmnist's logger


@cli
def main(argv: list[str] | tuple[str, ...] = ()) -> None:
    """`python -m hmnist.stages.train [--fold K]`: fold 0 is the train stage, fold k >= 1 train_fold@k."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hmnist.stages.train")
    parser.add_argument("--fold", type=int, default=0, help="which cross-validation fold validates (default 0)")
    fold = parser.parse_args(argv).fold
    params = load_params()
    processes = distributed.process_count(params.train.devices, params.train.device)
    if processes > 1 and not distributed.in_worker():
        # checked before any worker starts: each would load the cache and build a model first
        split = fold_split(load_split(), load_folds(), fold)
        collectives.shared_batch_size(params, int((split["split"] == "train").sum()), processes)
        # torchrun runs this main() in each worker, with the same fold
        distributed.launch("hmnist.stages.train", processes, params.train.device, [f"--fold={fold}"])
        return
    with distributed.worker(params.train.device) as ranks:
        _main(params, fold, ranks)


def _main(params: Params, fold: int, ranks: collectives.Ranks) -> None:
    split = fold_split(load_split(), load_folds(), fold)  # this fold's images are its val split
    out = fold_paths(fold)
    images, index = load_prepared(PREPARED)
    # imported here, not at the top, and after the files are read: a launcher process
    # (train.devices above 1) only starts the workers, and a missing or mismatched input is a
    # one-line error in a second; the training's imports (timm, torchvision, scikit-learn,
    # dvclive) take 3.7 s of the 5.9 s this module once spent starting up (BENCHMARKS.md, "The
    # test suite's time")
    from dvclive import Live

    from hmnist.models import save_checkpoint
    from hmnist.trainer import train

    resume_path = out.resume / f"{resume_key(params, split, images.shape)}.pt"
    if not ranks.main:  # only rank 0 writes; the others train and agree
        train(params, images, index, split, resume_path=resume_path)
        return
    removed = remove_abandoned_states(out.resume, keep=resume_path)
    if removed:
        log.info(f"removed {len(removed)} resume state(s) of earlier unfinished runs with other params: "
                 f"{', '.join(p.name for p in removed)}")
    with Live(str(out.live), dvcyaml=False, report=None, save_dvc_exp=False) as live:
        model, meta = train(params, images, index, split, resume_path=resume_path, live=live, curves=out.curves)
        live.summary["best/epoch"] = meta["best_epoch"]
        live.summary["best/ema"] = int(meta["kept_weights"] == "ema")  # 1: the EMA weights were kept
        live.summary["best/swa"] = int(meta["kept_weights"] == "swa")  # 1: the weight average (SWA) was kept
        live.summary["best/val_balanced_accuracy"] = meta["val_balanced_accuracy"]
        live.summary["best/val_accuracy"] = meta["val_accuracy"]
        live.summary["calibration/val_nll_uncalibrated"] = meta["val_nll_uncalibrated"]
        live.summary["calibration/val_nll"] = meta["val_nll"]
        live.summary["calibration/temperature"] = (meta["calibration"] or {}).get("temperature", 1.0)
        for op in meta["operating_points"]:
            live.summary[f"operating_points/{op['name']}/threshold"] = op["threshold"]
    save_checkpoint(out.checkpoint, model, {**meta, "fold": fold})
    resume_path.unlink(missing_ok=True)  # finished: a re-run with these params starts afresh
    print(f"saved {out.checkpoint}: {params.model} kept epoch {meta['best_epoch']} ({meta['kept_weights']} weights, "
          f"select {params.train.select}), "
          f"val balanced accuracy {meta['val_balanced_accuracy']:.4f}, calibration "
          f"{(meta['calibration'] or {}).get('method', 'none')} (val NLL {meta['val_nll_uncalibrated']:.4f} -> "
          f"{meta['val_nll']:.4f}), "
          f"{meta['train_images_per_second']:.0f} training images/s")


if __name__ == "__main__":
    main(sys.argv[1:])
