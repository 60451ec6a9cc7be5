#!/usr/bin/env bash
# The recorded CPU benchmark: mini-SD + adapter, 20 steps, fp32, batch 1 and 16, backends eager (always),
# onnxruntime and openvino, and the peers optimum-ort and openvino (from .venv-peers, `make peers-venv`), each in
# its own persistent process, timed in interleaved rounds. Results: bench/results/cpu.json + cpu.png
# (table in bench/README.md).
#
# Usage: bash bench/run_cpu.sh [MODEL_DIR] [extra `invdiff bench` flags, e.g. --adapter DIR --export DIR]
#   MODEL_DIR defaults to the shipped model `colored-digits` (invdiff_rt/assets/models/colored-digits); pass a
#   model folder when it is not shipped. Without --adapter a fresh adapter of the default architecture is timed
#   (a trained one costs the same). Run it on a quiet machine: other jobs on the same cores distort every number.
set -euo pipefail
cd "$(dirname "$0")/.."

INVDIFF="${INVDIFF:-.venv/bin/invdiff}"
[ -x "$INVDIFF" ] || INVDIFF=invdiff

if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    MODEL="$1"
    shift
elif [ -f invdiff_rt/assets/models/colored-digits/model_index.json ]; then
    MODEL=colored-digits
else
    echo "error: the built-in model colored-digits is not shipped here; pass a model folder: $0 MODEL_DIR" >&2
    exit 2
fi

PEERS=()
if [ -x .venv-peers/bin/python ]; then
    PEERS=(--peers optimum-ort,openvino --peers-python .venv-peers/bin/python)
fi

mkdir -p bench/results
"$INVDIFF" bench --model "$MODEL" --backends onnxruntime,openvino --batch-sizes 1,16 --steps 20 --warmup 1 \
    --repeats 3 --rounds 10 --precision fp32 "${PEERS[@]}" --json bench/results/cpu.json \
    --plot bench/results/cpu.png "$@"
