#!/usr/bin/env bash
# Issue 18, point 6, issue 31, point 3 and issue 34: the training-speed table (benchmarks/train_speed.py) on a
# CUDA GPU for SD 1.5, SD 2.1, SDXL, SD3 medium and FLUX.1-dev, built from their published configs with
# random weights (nothing downloaded), at fp32, bf16 and fp16 (FLUX.1-dev: bf16 and fp16, see
# PRECISION_FLUX); 20 steps after 5 warm-up steps, batch 1, native resolution (SD3/Flux: 1024), all
# blocks.  Expected time: about 8 minutes for sd15, sd21 and sdxl, then about 5 for sd3 and 10 for
# flux (estimates, not yet run: each builds and saves its model — Flux.1: 34 GB of bf16 on disk — and
# loads it once per loop and precision), so about 25 minutes in all, at most the sum of the limits
# below (34 minutes).  Where one command may run only 10 minutes, run ARCHS="sd15 sd21 sdxl", ARCHS=sd3
# and ARCHS=flux as three commands.  Then the train-many packed-batch row (issue 34): training samples
# per second of ten mini-model concepts one at a time and N at a time in one batch
# (benchmarks/train_many.py --rates-only; MANY_STEPS steps, default 100, PACKS default 1,2,5,10; limit
# LIMIT_MANY, default 300 s; estimated 1 to 2 minutes, not yet run); MANY=0 leaves it out.
#
# Assumes a machine without network, and installs nothing from it:
#   * Python: $PYTHON if set, else the first of .venv/bin/python, python3, python whose torch sees a GPU.
#   * textinv: imported from this checkout (PYTHONPATH), not installed.
#   * Packages that Python lacks (GPU images often have torch and transformers but not diffusers):
#     wheels in .whl/ are installed with pip --no-index into a temporary folder.  Fetch them where
#     there is network, e.g. from the repository root:
#       pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp
#     (add transformers>=5.24 and its tokenizers if the machine's transformers is older than textinv needs).
#
#   bash benchmarks/gpu_check.sh
#   STEPS=10 WARMUP=3 ARCHS="sd15 sdxl" PRECISION=bf16,fp16 bash benchmarks/gpu_check.sh
# Per-architecture time limits (seconds): LIMIT_SD15, LIMIT_SD21, LIMIT_SDXL, LIMIT_SD3, LIMIT_FLUX;
# rows measured before a limit is reached are already printed.  flux runs PRECISION_FLUX (default
# bf16,fp16) instead of PRECISION: FLUX.1-dev in fp32 is 67 GB of weights before any training, more
# than an 80 GB card holds with its training.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
ARCHS=${ARCHS:-"sd15 sd21 sdxl sd3 flux"}
PRECISION=${PRECISION:-fp32,bf16,fp16}
declare -A LIMIT=([sd15]=${LIMIT_SD15:-100} [sd21]=${LIMIT_SD21:-120} [sdxl]=${LIMIT_SDXL:-240}
                  [sd3]=${LIMIT_SD3:-480} [flux]=${LIMIT_FLUX:-1080})
declare -A PRECISIONS=([flux]=${PRECISION_FLUX:-bf16,fp16})

sees_gpu() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ] || ! sees_gpu "$PY"; then
    echo "gpu_check: no Python whose torch sees a CUDA GPU (set PYTHON=...)" >&2
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NEEDED="import diffusers, transformers, accelerate, safetensors, PIL, tqdm, click, textinv.training"
if ! "$PY" -c "$NEEDED" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d /tmp/textinv-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
if ! "$PY" -c "$NEEDED"; then
    echo "gpu_check: a package is missing (see above); bring it as a wheel in .whl/" >&2
    exit 1
fi
"$PY" -c 'import torch, diffusers as d, transformers as t
print(f"torch {torch.__version__}, diffusers {d.__version__}, transformers {t.__version__}")'

status=0
for arch in $ARCHS; do
    echo
    echo "== $arch (limit ${LIMIT[$arch]:-240} s)"
    timeout --signal=INT --kill-after=20 "${LIMIT[$arch]:-240}" \
        "$PY" benchmarks/train_speed.py --arch "$arch" --device cuda --precision "${PRECISIONS[$arch]:-$PRECISION}" \
        --steps "$STEPS" --warmup "$WARMUP"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "== $arch: stopped (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
        status=1
    fi
done

if [ "${MANY:-1}" != 0 ]; then
    echo
    echo "== train-many packed batch (limit ${LIMIT_MANY:-300} s)"
    timeout --signal=INT --kill-after=20 "${LIMIT_MANY:-300}" \
        "$PY" benchmarks/train_many.py --rates-only --device cuda --concepts 10 --steps "${MANY_STEPS:-100}" \
        --batch 4 --packs "${PACKS:-1,2,5,10}"
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "== train-many packed batch: stopped (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
        status=1
    fi
fi
exit $status
