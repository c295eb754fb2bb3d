#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md, as one command on a lent GPU machine (run from the repo root).
#   OUT=results bash benchmarks/gpu.sh            # full size, on a CUDA GPU (about 8 minutes)
#   COMPILE=1 OUT=results bash benchmarks/gpu.sh  # and torch.compile measured too (3 more)
#   SMALL=1 OUT=/tmp/r bash benchmarks/gpu.sh      # a rehearsal on a CPU, tiny sizes
# The machine needs torch and timm; dvc and dvclive may come as wheels in .whl/ (no internet there).
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
W=$(mktemp -d)
if [ -n "${SMALL:-}" ]; then
  B="--device cpu --steps 2 --warmup 1 --images 128 --size 64 --resize 64 --batch-size 8 --notebook-images 64 --notebook-workers 2"
  $PY -c "import sys, yaml; sys.path.insert(0, 'tests'); from conftest import tiny_params
print(yaml.safe_dump(tiny_params('unused'), sort_keys=False))" > "$W/tiny.yaml"
  R="--images 120 --params $W/tiny.yaml"
else
  B=""; R="--images 10015"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee "$OUT/versions.txt"
$PY -m dvc version 2>&1 | head -3 | tee -a "$OUT/versions.txt"
step() { local name=$1; shift; echo "== $name"; local s=$(date +%s); timeout "$@"; echo "== $name: exit $? in $(( $(date +%s) - s )) s"; }
step deit 150 $PY benchmarks/train_step.py --model deit --ways model,pipeline,input --steps 200 --rounds 5 --warmup 20 --profile 10 $B --json "$OUT/deit.json"
step notebook 150 $PY benchmarks/train_step.py --model deit --ways pipeline,notebook --notebook-workers 16 --steps 100 --rounds 3 $B --workdir "$W" --json "$OUT/deit_notebook.json"
step swin 90 $PY benchmarks/train_step.py --model swin --ways model,pipeline --steps 50 --rounds 3 $B --json "$OUT/swin.json"
step resnet9 90 $PY benchmarks/train_step.py --model resnet9 --ways model,pipeline,input --steps 100 --rounds 3 $B --json "$OUT/resnet9.json"
step gpu-tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
[ -n "${COMPILE:-}" ] && step compile 200 $PY benchmarks/train_step.py --model deit --ways model,pipeline --compile --steps 200 --rounds 3 $B --json "$OUT/deit_compile.json"
step repro 330 $PY benchmarks/repro.py $R --json "$OUT/repro.json"
rm -rf "$W"
