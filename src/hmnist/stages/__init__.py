"""The DVC stages, one module each: check_params, download, prepare, split, train, evaluate
(`python -m hmnist.stages.<name>`).

Stages meet only through the files DVC tracks: none imports another stage or a command; each
stands on the library modules one level up (config, data, models, engine, augment, metrics,
distributed, errors). tests/test_structure.py holds them to it.
"""
