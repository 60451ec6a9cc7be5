#!/usr/bin/env bash
# GPU check of the fused step: eager fp32 / eager fp16 (diffusers way) / fused fp16 + CUDA graphs (+ torch.compile),
# SD-1.5-architecture UNet with random weights, batch 1/4/8 with CFG. Finishes within 8 minutes on an H100.
#
# The GPU machine has torch + CUDA but no diffusers and no network, so diffusers travels as wheels in .whl/
# (git-ignored; pass it along, e.g. the device tool's carry=[".whl"]). Download them once on a machine with network:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl \
#       diffusers==0.42.1 huggingface-hub==2.4.0 hf-xet httpx2 httpcore2 h11 anyio sniffio idna certifi \
#       fsspec pyyaml tqdm click regex safetensors importlib_metadata zipp requests urllib3 charset-normalizer \
#       filelock packaging typing-extensions pillow
#
# (about 20 MB). They are installed with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and put on
# PYTHONPATH; when diffusers is already importable nothing is installed.
#
# Usage: bash bench/gpu_check.sh [extra args for bench/gpu_check.py]    (results: bench/results/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
SITE="${INVDIFF_SITE:-/tmp/site}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-470}"   # hard stop under 8 minutes, whatever happens

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: diffusers is not importable and .whl/ has no wheels; download them as described in $0" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import diffusers; print('diffusers', diffusers.__version__, 'from', diffusers.__file__)"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

mkdir -p bench/results
exec timeout --signal=INT --kill-after=15 "$LIMIT_S" \
    "$PY" bench/gpu_check.py --device cuda --batches 1,4,8 --warmup 10 --repeats 50 \
    --compile --compile-cap-s 150 --out bench/results/gpu_check.json "$@"
