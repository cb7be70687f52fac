#!/usr/bin/env bash
# Build the shipped DriveSim bases on one GPU machine, from what gpu/pack-bases.sh prepared.
#   device run, carry [".gpu", ".whl"]:  bash gpu/build-bases.sh
# Each build's export (weights, card), stage metrics and timings come back in $OUT as tar parts of
# at most 15 MiB (gpu/unpack-bases.sh joins them here). The builds run inside BUDGET_S seconds so
# that what finished still comes back when a run is cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
VARIANT=${VARIANT:-gpu}
PACK=${PACK:-.gpu}
WORK=${WORK:-runs/gpu-bases}
BUDGET_S=${BUDGET_S:-540}
start=$SECONDS
. gpu/env.sh
mkdir -p "$WORK/data"
tar xJf "$PACK/bases-data.tar.xz" -C "$WORK/data" || exit 1
status=0
for name in teacher student-base; do
    left=$((BUDGET_S - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "skipped $name: ${left}s of the budget left" | tee -a "$OUT/build.log"
        status=1
        continue
    fi
    timeout "$left" "$PYTHON" -m drivekd reproduce --profile "drivesim-internvl-$name" --variant "$VARIANT" \
        --data-from "$WORK/data" --workers 8 --out "$WORK/$name" >>"$OUT/build.log" 2>&1 || status=1
    # whatever exists comes back: the export once written, and every stage's metrics and timings
    (cd "$WORK/$name" && tar cf - --ignore-failed-read export timings.jsonl scores.json build.json \
        stages/*/metrics.jsonl stages/*/config.yaml 2>/dev/null) | split -b 15m - "$OUT/$name.tar.part-"
    echo "$name: $((SECONDS - start)) s since start" | tee -a "$OUT/build.log"
done
exit $status
