#!/usr/bin/env bash
# The real-size check on one GPU: the GPU-marked tests; one distillation step at real size (an
# InternVL3-1B-shaped student, an InternVL3-8B-shaped teacher, random weights, 6 cameras at 448 px:
# SFT, teacher cache, sum / agp / amortised agp with the cached and the live teacher, exact AGP without
# the gradient buffer (combine.gram: modules), SFT and AGP with
# the student sharded by FSDP2 (one process: the path at real size), SFT and AGP with every layer
# checkpointed (train.activation_checkpointing), eager vs
# text-row capture); `bench cache` at the InternVL3-1B/2B shapes (6 cameras, 20 questions a frame);
# `bench infer` on both shapes in bf16 beside the paper's deployment columns.
#   device run, carry [".whl"]:  bash gpu/check-real-size.sh
# Results come back in $OUT (machine.txt, tests.log, cache.json, cache.log, scale.log, scale.json,
# infer.log, infer.json).
# PAIR=tiny SMALL=tiny-internvl-student LARGE=tiny-internvl-teacher DEVICE=cpu runs it here (the
# tests run it so, with fewer PHASES); BUDGET_S keeps what finished coming back if time runs out.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-540}
DEVICE=${DEVICE:-cuda}
PAIR=${PAIR:-internvl-8b}
CAMERAS=${CAMERAS:-6}
WORK=${WORK:-runs/gpu-real}
PHASES=${PHASES:-sft cache sum-cached agp-cached agp-bf16-cached agp-reuse-cached agp-modules-cached sft-fsdp agp-fsdp-cached agp-live sum-live capture-none capture-eager capture-rows sft-ac agp-ac-cached}
REPEATS=${REPEATS:-3}
TESTS=${TESTS:-tests/test_gpu.py}
CACHE_PAIR=${CACHE_PAIR:-internvl}
CACHE_QUESTIONS=${CACHE_QUESTIONS:-20}
SMALL=${SMALL:-$WORK/scale/models/internvl3-1b}
LARGE=${LARGE:-$WORK/scale/models/internvl3-8b}
start=$SECONDS
. gpu/env.sh
left() { echo $((BUDGET_S - (SECONDS - start))); }
status=0

# 1. the device paths themselves (a minute): autocast steps, CUDA peak memory, capture vs eager
marker=$([ "$DEVICE" = cpu ] && echo "not gpu" || echo gpu)
if [ "$TESTS" != none ]; then
    timeout "$(left)" "$PYTHON" -m pytest -q -p no:cacheprovider -m "$marker" $TESTS >"$OUT/tests.log" 2>&1 || status=1
fi
echo "tests: $((SECONDS - start)) s" | tee -a "$OUT/tests.log"

# 2. the teacher cache at real shapes (InternVL3-1B student, -2B teacher, random weights): bytes and
# teacher seconds per question with each frame's prefix run and stored once and without, fp8's error
# (on a CPU: the shipped tiny pair). Before the scale phases, which may use up the budget.
timeout "$(left)" "$PYTHON" -m drivekd bench cache --json $([ "$DEVICE" = cpu ] || echo --real-shapes) \
    --pair "$CACHE_PAIR" --cameras "$CAMERAS" --questions-per-frame "$CACHE_QUESTIONS" --frames 1 \
    --lossy-questions 2 --lossy-batch 1 --device "$DEVICE" --work "$WORK/cache-bench" \
    >"$OUT/cache.json" 2>"$OUT/cache.log" || status=1
echo "cache: $((SECONDS - start)) s" | tee -a "$OUT/cache.log"

# 3. real-size steps, each phase in its own process (writes the checkpoints bench infer reads)
timeout "$(left)" "$PYTHON" -m drivekd bench scale --out "$WORK/scale" --pair "$PAIR" --cameras "$CAMERAS" \
    --device "$DEVICE" $(printf -- "--phase %s " $PHASES) --json "$OUT/scale.json" >"$OUT/scale.log" 2>&1 || status=1
echo "scale: $((SECONDS - start)) s" | tee -a "$OUT/scale.log"

# 4. deployment figures, bf16, batch 1, on the 6-camera prompt
timeout "$(left)" "$PYTHON" -m drivekd bench infer --models "$SMALL" --models "$LARGE" --device "$DEVICE" \
    --dtype "$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)" --data "$WORK/scale/data/$PAIR-${CAMERAS}cam" \
    --new-tokens 64 --repeats "$REPEATS" --json "$OUT/infer.json" >"$OUT/infer.log" 2>&1 || status=1
"$PYTHON" - "$OUT/infer.json" >>"$OUT/infer.log" 2>&1 <<'PY' || status=1
import json, sys

# the paper's deployment columns for its 1B student and 8B teacher (InternVL3, one GPU)
paper = [("1B", 4.1, 45.7, 0.45), ("8B", 18.3, 32.6, 1.58)]
rows = json.load(open(sys.argv[1]))["models"]
print("\n| model | peak GB (paper) | tok/s (paper) | first token s (paper) |\n|---|---|---|---|")
for row, (size, mem, speed, first) in zip(rows, paper):
    print(f"| {row['name']} | {row['peak_mem_mb'] / 1024:.1f} ({mem}) | {row['tok_per_s']:.1f} ({speed}) | "
          f"{row['first_token_s']:.3f} ({first}) |")
small = rows[0]
print(f"target for the 1B shape: >= {2 * 45.7:.1f} tok/s and <= {0.45 / 2:.3f} s first token: "
      f"{'met' if small['tok_per_s'] >= 91.4 and small['first_token_s'] <= 0.225 else 'not met'}")
PY
echo "infer: $((SECONDS - start)) s" | tee -a "$OUT/infer.log"
exit $status
