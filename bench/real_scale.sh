#!/usr/bin/env bash
# Real scale (issue 13): SD-1.5-class and SD-2.1-style checkpoints (exact SD configs, random seeded weights, built
# offline) through every stage on the CPU machine; prints a table of wall seconds and peak RSS per stage.
#
# Usage: nice -n 5 bash bench/real_scale.sh            (OUT=runs/real-scale, VARIANTS="sd15 sd21", STEPS=2)
# Every stage runs in its own process under /usr/bin/time; a failed stage is recorded (FAIL) and the rest go on.
# sd15 runs everything (fp32 + fp16 export, check at batch 1 and 2 at 512x512 and 384x512, generate 2 + 2 images,
# TensorRT build plan); sd21 (v-prediction) runs groups, train, the fp32 export, check at batch 1 on the
# non-square size and generate 2 images there. Logs: $OUT/logs/<stage>.log; table: $OUT/table.md.
set -uo pipefail
cd "$(dirname "$0")/.."

INVDIFF="${INVDIFF:-.venv/bin/invdiff}"
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-runs/real-scale}"
VARIANTS="${VARIANTS:-sd15 sd21}"
STEPS="${STEPS:-2}"
H2=384; W2=512  # the non-square size (H x W)
mkdir -p "$OUT/logs"
TABLE="$OUT/table.md"
[ -n "${ONLY:-}" ] && [ -f "$TABLE" ] || printf '| stage | status | wall s | peak RSS GiB |\n|---|---|---|---|\n' > "$TABLE"

stage() {  # stage NAME CMD...: run, time, record one table row (ONLY=regex: run only matching stages)
    local name="$1"; shift
    if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ $ONLY ]]; then return 0; fi
    local log="$OUT/logs/$name.log" status=ok
    /usr/bin/time -f "%e %M" -o "$OUT/logs/$name.time" "$@" > "$log" 2>&1 || status="FAIL($?)"
    local wall rss
    read -r wall rss < <(tail -n 1 "$OUT/logs/$name.time")
    printf '| %s | %s | %s | %.2f |\n' "$name" "$status" "$wall" "$(echo "$rss / 1048576" | bc -l)" | tee -a "$TABLE"
    [ "$status" = ok ] || tail -n 3 "$log" | sed 's/^/    /'
}

parity() {  # worst rel-L2 per quantity of a check JSON
    "$PYTHON" - "$1" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
worst = {}
for r in rows:
    q = "noise_pred" if r["quantity"].startswith("noise_pred") else r["quantity"]
    key = (r["batch"], q)
    worst[key] = max(worst.get(key, 0.0), r["rel_l2"])
print("    " + ", ".join(f"b{b} {q} {v:.2e}" for (b, q), v in sorted(worst.items())))
PY
}

DATA="$OUT/data"
stage data "$INVDIFF" data make shapes-habitats --out "$DATA" --size 256 --n-train 12 --n-test 4 --seed 0

for V in $VARIANTS; do
    M="$OUT/$V"
    stage "$V build" "$INVDIFF" model build-sd --variant "$V" --out "$M" --seed 0
    "$PYTHON" -c "import sys,os; print('    unet weights (fp32 bytes):', os.path.getsize(sys.argv[1]))" \
        "$M/unet/diffusion_pytorch_model.safetensors"
    stage "$V groups (256 px, 12 images)" "$INVDIFF" groups --model "$M" --data "$DATA" --out "$OUT/$V-groups" \
        --recipe paper --batch-size 4
    stage "$V train (4 steps x 2)" "$INVDIFF" train --model "$M" --data "$DATA" --groups "$OUT/$V-groups" \
        --out "$OUT/$V-adapter" --recipe paper --steps 4 --batch-size 2 --checkpoint-every 1000
    E="$OUT/$V-export-fp32"
    stage "$V export fp32 + adapter" "$INVDIFF" export --model "$M" --adapter "$OUT/$V-adapter" --out "$E" \
        --min-size 256 --max-size 768 --max-batch 4
    ls -l "$E" | awk 'NR > 1 {print "    " $9, $5}'
    if [ "$V" = sd15 ]; then
        stage "$V export fp16 + adapter" "$INVDIFF" export --model "$M" --adapter "$OUT/$V-adapter" \
            --out "$OUT/$V-export-fp16" --precision fp16 --min-size 256 --max-size 768 --max-batch 4
        for SIZE in "512 512" "$H2 $W2"; do
            set -- $SIZE
            stage "$V check b1,b2 ${1}x${2}" "$INVDIFF" check --model "$M" --adapter "$OUT/$V-adapter" --export "$E" \
                --batch-sizes 1,2 --steps "$STEPS" --height "$1" --width "$2" --json "$OUT/$V-check-${1}x${2}.json"
            [ -f "$OUT/$V-check-${1}x${2}.json" ] && parity "$OUT/$V-check-${1}x${2}.json"
            stage "$V generate 2 @ ${1}x${2}" "$INVDIFF" generate --export "$E" --backend onnxruntime \
                --prompt "a photo of a cat" --num 2 --batch-size 2 --steps "$STEPS" --height "$1" --width "$2" \
                --out "$OUT/$V-images-${1}x${2}" --no-grid
        done
        stage "$V tensorrt build plan (fp16)" "$INVDIFF" build --onnx "$OUT/$V-export-fp16" --plan
        sed 's/^/    /' "$OUT/logs/$V tensorrt build plan (fp16).log"
    else
        stage "$V check b1 ${H2}x${W2}" "$INVDIFF" check --model "$M" --adapter "$OUT/$V-adapter" --export "$E" \
            --batch-sizes 1 --steps "$STEPS" --height "$H2" --width "$W2" --json "$OUT/$V-check-${H2}x${W2}.json"
        [ -f "$OUT/$V-check-${H2}x${W2}.json" ] && parity "$OUT/$V-check-${H2}x${W2}.json"
        stage "$V generate 2 @ ${H2}x${W2}" "$INVDIFF" generate --export "$E" --backend onnxruntime \
            --prompt "a photo of a cat" --num 2 --batch-size 2 --steps "$STEPS" --height "$H2" --width "$W2" \
            --out "$OUT/$V-images-${H2}x${W2}" --no-grid
    fi
done
echo
cat "$TABLE"
