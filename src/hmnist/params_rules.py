"""The rules a params.yaml must meet beyond its types: ranges, choices, and settings that
cannot go together. config.parse_params applies them after building the dataclasses, so each
broken rule is one line naming the key (prefixed with the file by parse_params).
"""
from __future__ import annotations

import re

from hmnist.config import (BALANCE, CALIBRATION, CLASSES, CLIP_MODES, DEVICES, LEAKAGE_FIELDS, METADATA_FIELDS,
                           SCHEDULES, SELECT, TTA, CvConfig, EvaluateConfig, ModelConfig, OperatingPointConfig,
                           Params, TrainConfig)
from hmnist.errors import MAX_SEED, UserError


def need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(p: Params) -> None:
    """Raise UserError for the first rule `p` breaks, in the order of params.yaml's blocks."""
    need(p.model in p.models, f"model '{p.model}' is not one of models: {', '.join(p.models)}")
    _check_data(p)
    for name, m in p.models.items():
        _check_model(m, f"models.{name}")
    t = p.train
    _check_train(t)
    need(t.swa_epochs < p.model_config.epochs,
         f"train.swa_epochs must be below models.{p.model}.epochs ({p.model_config.epochs}): the schedule runs the "
         f"epochs before them, got {t.swa_epochs}")
    # timm's Mixup/CutMix mix images only: the metadata of the two images mixed would not follow
    need(not p.model_config.metadata or (t.mixup == 0 and t.cutmix == 0),
         f"models.{p.model}.metadata cannot be used with train.mixup or train.cutmix (they mix the images, "
         f"not the metadata): set both to 0, or metadata to []")
    _check_evaluate(p.evaluate)
    _check_cv(p.cv)
    need(t.calibration in CALIBRATION,
         f"train.calibration must be one of {', '.join(CALIBRATION)}, got {t.calibration!r}")
    _check_operating_points(t.operating_points)
    for key, seed in (("split.seed", p.split.seed), ("train.seed", t.seed),
                      ("evaluate.bootstrap_seed", p.evaluate.bootstrap_seed)):
        need(0 <= seed <= MAX_SEED, f"{key} must be between 0 and {MAX_SEED} (2**32 - 1), got {seed}")


def _check_data(p: Params) -> None:
    """The data, prepare and split blocks."""
    need(p.data.source.strip() != "", "data.source must be 'kaggle' or a path to the dataset")
    need(p.data.dataset.count("/") == 1, f"data.dataset must be owner/name, got {p.data.dataset!r}")
    need(p.prepare.size >= 16, f"prepare.size must be at least 16, got {p.prepare.size}")
    need(p.prepare.workers >= 0, f"prepare.workers must be >= 0, got {p.prepare.workers}")
    for name in ("val", "test"):
        value = getattr(p.split, name)
        need(0 < value < 1, f"split.{name} must be between 0 and 1 (exclusive), got {value}")
    need(p.split.val + p.split.test < 1,
         f"split.val + split.test must be below 1 (train gets the rest), got {p.split.val + p.split.test:g}")


def _check_model(m: ModelConfig, where: str) -> None:
    need(m.arch.strip() != "", f"{where}.arch must name a timm architecture")
    need(m.resize >= 16, f"{where}.resize must be at least 16, got {m.resize}")
    need(m.batch_size >= 1, f"{where}.batch_size must be at least 1, got {m.batch_size}")
    need(m.epochs >= 1, f"{where}.epochs must be at least 1, got {m.epochs}")
    need(m.lr > 0, f"{where}.lr must be positive, got {m.lr}")
    need(m.weight_decay >= 0, f"{where}.weight_decay must be >= 0, got {m.weight_decay}")
    need(0 <= m.drop_path_rate < 1, f"{where}.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    need(0 < m.layer_decay <= 1, f"{where}.layer_decay must be in (0, 1] (1 = off), got {m.layer_decay}")
    need(m.warmup_epochs is None or m.warmup_epochs >= 0,
         f"{where}.warmup_epochs must be >= 0 or null (train.warmup_epochs), got {m.warmup_epochs}")
    need(m.schedule is None or m.schedule in SCHEDULES,
         f"{where}.schedule must be one of {', '.join(SCHEDULES)} or null (train.schedule), got {m.schedule!r}")
    need(m.clip_grad is None or m.clip_grad >= 0,
         f"{where}.clip_grad must be >= 0 or null (train.clip_grad), got {m.clip_grad}")
    need(m.tta in TTA, f"{where}.tta must be one of {', '.join(TTA)}, got {m.tta!r}")
    check_fields(m.metadata, f"{where}.metadata")
    need(0 <= m.metadata_dropout < 1, f"{where}.metadata_dropout must be in [0, 1), got {m.metadata_dropout}")
    # the fused model has no timm layer grouping (yet): layer decay would be silently ignored
    need(not m.metadata or m.layer_decay == 1,
         f"{where}.layer_decay must be 1 (off) with metadata: the fused model has no layer grouping")


def _check_train(t: TrainConfig) -> None:
    need(t.device in DEVICES or re.fullmatch(r"cuda:\d+", t.device) is not None,
         f"train.device must be one of {', '.join(DEVICES)} or cuda:K, got {t.device!r}")
    need(t.devices == "all" or (isinstance(t.devices, int) and t.devices >= 1),
         f"train.devices must be a number of processes (at least 1) or all, got {t.devices!r}")
    need(t.balance in BALANCE, f"train.balance must be one of {', '.join(BALANCE)}, got {t.balance!r}")
    need(0 <= t.balance_power <= 1, f"train.balance_power must be between 0 and 1, got {t.balance_power}")
    need(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    need(t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}")
    need(0 < t.crop_area_min <= 1, f"train.crop_area_min must be in (0, 1], got {t.crop_area_min}")
    need(0 <= t.rotation <= 180, f"train.rotation must be between 0 and 180 degrees, got {t.rotation}")
    need(0 <= t.color_jitter < 1, f"train.color_jitter must be in [0, 1), got {t.color_jitter}")
    for name in ("mixup", "cutmix"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0 (a Beta alpha; 0 = off), got {getattr(t, name)}")
    need(0 <= t.mixup_prob <= 1, f"train.mixup_prob must be between 0 and 1, got {t.mixup_prob}")
    need(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}")
    need(t.select in SELECT, f"train.select must be one of {', '.join(SELECT)}, got {t.select!r}")
    need(t.swa_epochs >= 0, f"train.swa_epochs must be >= 0 (0 = off), got {t.swa_epochs}")
    need(t.swa_lr > 0, f"train.swa_lr must be positive (a factor of the model's peak lr), got {t.swa_lr}")
    # the average is the model kept: no epoch to choose, and no second average beside it
    need(t.swa_epochs == 0 or (t.select == "last" and t.ema_decay == 0),
         f"train.swa_epochs needs train.select: last and train.ema_decay: 0 (the weight average is the model "
         f"kept), got select {t.select}, ema_decay {t.ema_decay:g}")
    need(t.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = off), got {t.clip_grad}")
    need(t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    need(t.clip_mode in CLIP_MODES, f"train.clip_mode must be one of {', '.join(CLIP_MODES)}, got {t.clip_mode!r}")


def _check_evaluate(e: EvaluateConfig) -> None:
    check_fields(e.remove_metadata, "evaluate.remove_metadata")
    need(e.batch_size >= 1, f"evaluate.batch_size must be at least 1, got {e.batch_size}")
    need(e.bootstrap == 0 or e.bootstrap >= 100,
         f"evaluate.bootstrap must be 0 (no intervals) or at least 100 resamples, got {e.bootstrap}")


def _check_cv(cv: CvConfig) -> None:
    need(1 <= cv.folds <= 20, f"cv.folds must be between 1 and 20, got {cv.folds}")
    others = list(range(1, cv.folds))
    need(cv.other_folds == others,
         f"cv.other_folds must be {others} for cv.folds={cv.folds} (one train_fold stage each; DVC cannot "
         f"count to cv.folds by itself): dvc exp run -S cv.folds={cv.folds} "
         f"-S 'cv.other_folds={str(others).replace(' ', '')}'")


def _check_operating_points(points: list[OperatingPointConfig]) -> None:
    names = [op.name for op in points]
    for i, op in enumerate(points):
        where = f"train.operating_points[{i}]"
        # the name is a CSV column and a metrics key: no separators, nothing a shell or DVC would split
        need(re.fullmatch(r"[A-Za-z0-9_.@+-]+", op.name) is not None,
             f"{where}.name must be letters, digits and _ . @ + - only, got {op.name!r}")
        need(names.count(op.name) == 1, f"{where}.name {op.name!r} is used twice: each operating point needs its own")
        unknown = [c for c in op.classes if c not in CLASSES]
        need(bool(op.classes) and not unknown and len(set(op.classes)) == len(op.classes),
             f"{where}.classes must be distinct classes of {', '.join(CLASSES)}, got {op.classes!r}")
        need(len(op.classes) < len(CLASSES), f"{where}.classes cannot be every class: every image would be flagged")
        need(0 < op.sensitivity < 1, f"{where}.sensitivity must be between 0 and 1 (exclusive), got {op.sensitivity}")


def check_fields(fields: list[str], where: str) -> None:
    for name in fields:
        if name in LEAKAGE_FIELDS:
            raise UserError(f"{where} lists {name!r}, which must never reach a model: it is the label, a proxy "
                            f"for it or an identifier (allowed: {', '.join(METADATA_FIELDS)})")
        if name not in METADATA_FIELDS:
            raise UserError(f"{where} lists unknown field {name!r} (allowed: {', '.join(METADATA_FIELDS)})")
    if len(set(fields)) != len(fields):
        raise UserError(f"{where} lists a field twice: {fields!r}")
