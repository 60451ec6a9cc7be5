#!/usr/bin/env bash
# The adapter's cost at real scale: `invdiff bench` on the SD-1.5-class checkpoint (exact SD-1.5 configs, random
# seeded weights, built offline) with a trained adapter, eager and OpenVINO, batch 1 at 256x256, interleaved rounds.
# The mini model's step is ~1 ms, where the adapter's second call and its ~100 nodes are 6-10 % of a step; here the
# UNet's step is ~1,000x longer and the adapter is the same design (width 48 by the 5 % parameter budget: 148k).
#
# Usage: bash bench/sd_adapter_cost.sh   (OUT=runs/sd-cost, ROUNDS=3, SIZE=256, BACKENDS=openvino)
# Needs ~16 GiB of memory (eager SD-1.5 + two OpenVINO-compiled SD-1.5 denoisers) and ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
INVDIFF="${INVDIFF:-.venv/bin/invdiff}"
OUT="${OUT:-runs/sd-cost}"
ROUNDS="${ROUNDS:-3}"
SIZE="${SIZE:-256}"
BACKENDS="${BACKENDS:-openvino}"
mkdir -p "$OUT"
[ -d "$OUT/sd15" ] || "$INVDIFF" model build-sd --variant sd15 --out "$OUT/sd15" --seed 0
[ -d "$OUT/data" ] || "$INVDIFF" data make shapes-habitats --out "$OUT/data" --size 256 --n-train 12 --n-test 4 --seed 0
[ -f "$OUT/groups.json" ] || "$INVDIFF" groups --model "$OUT/sd15" --data "$OUT/data" --out "$OUT/groups" \
    --recipe paper --batch-size 4
[ -d "$OUT/adapter" ] || "$INVDIFF" train --model "$OUT/sd15" --data "$OUT/data" --groups "$OUT/groups" \
    --out "$OUT/adapter" --recipe paper --steps 4 --batch-size 2 --checkpoint-every 1000
[ -d "$OUT/export" ] || "$INVDIFF" export --model "$OUT/sd15" --adapter "$OUT/adapter" --out "$OUT/export" \
    --min-size "$SIZE" --max-size "$SIZE" --max-batch 1
[ -d "$OUT/export-base" ] || "$INVDIFF" export --model "$OUT/sd15" --out "$OUT/export-base" \
    --min-size "$SIZE" --max-size "$SIZE" --max-batch 1
/usr/bin/time -f "bench wall %e s, peak RSS %M KiB" "$INVDIFF" bench --model "$OUT/sd15" --adapter "$OUT/adapter" \
    --export "$OUT/export" --base-export "$OUT/export-base" --backends "$BACKENDS" --batch-sizes 1 --steps 2 \
    --rounds "$ROUNDS" --repeats 1 --height "$SIZE" --width "$SIZE" --adapter-weight 1.0 --json "$OUT/bench.json"
