#!/usr/bin/env bash
# Prepare the GPU build of the shipped bases, on this (CPU) machine: the GPU machine has no simulator
# and no network, so the datasets are generated here and travel with the wheels it lacks.
#   gpu/pack-bases.sh             # then, on the GPU: bash gpu/build-bases.sh (carry .gpu and .whl)
# DATA_FROM=DIR reuses datasets generated earlier (e.g. runs/bases); otherwise generating them takes
# about an hour on 2 cores. VARIANT=smoke packs the dry run's few scenes.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-gpu}
WORK=${WORK:-runs/gpu-pack/$VARIANT}
PACK=${PACK:-.gpu}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$WORK" "$PACK"
for name in teacher student-base; do
    # the student's build reuses the teacher's held-out and check sets when no DATA_FROM is given
    "$PYTHON" -m drivekd reproduce --profile "drivesim-internvl-$name" --variant "$VARIANT" --data-only \
        --out "$WORK/$name" --data-from "${DATA_FROM:-$WORK}"
done
# each generated dataset once (the two builds share their held-out and check sets); drills are
# derived on the GPU machine in seconds
"$PYTHON" - "$WORK" "$PACK/bases-data.tar.xz" <<'PY'
import json, sys, tarfile
from pathlib import Path

work, target = Path(sys.argv[1]), Path(sys.argv[2])
seen = {}
for card in sorted(work.glob("*/data/*/card.json")):
    config = json.loads(card.read_text())["config"]
    seen.setdefault(json.dumps(config, sort_keys=True), card.parent)
tmp = target.with_suffix(".tmp")
with tarfile.open(tmp, "w:xz") as tar:
    for config, folder in seen.items():
        c = json.loads(config)
        tar.add(folder, arcname=f"{c['task']}-{c['seed']}-{c['scenes']}")
tmp.replace(target)
print(f"{target}: {len(seen)} datasets, {target.stat().st_size / 2**20:.1f} MiB")
PY
if [ "$WHEELS" != none ]; then
    # what the GPU machine's image lacks or holds in another version (python 3.12 there)
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" transformers==5.23.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing_extensions==4.16.0
fi
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
extra=$(du -cb "$PACK" $([ "$WHEELS" != none ] && echo "$WHEELS") | tail -1 | cut -f1)
echo "travels: $(( (tracked + extra) / 1048576 )) MiB of the device's 64 (tracked files, $PACK, $WHEELS)"
