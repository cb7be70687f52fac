#!/usr/bin/env bash
# Join what gpu/build-bases.sh sent back, then check each export on this machine before shipping it:
#   gpu/unpack-bases.sh FILES_DIR [DEST]     (DEST default runs/gpu-bases-returned)
# then, if they match: drivekd models install-base DEST/NAME/export/drivesim-internvl-NAME
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:?usage: gpu/unpack-bases.sh FILES_DIR [DEST]}
DEST=${2:-runs/gpu-bases-returned}
PYTHON=${PYTHON:-.venv/bin/python}
VARIANT=${VARIANT:-gpu}
# the held-out and check sets gpu/pack-bases.sh generated (else they are generated again)
[ -z "${DATA_FROM:-}" ] && [ -d "runs/gpu-pack/$VARIANT" ] && DATA_FROM=runs/gpu-pack/$VARIANT
for name in teacher student-base; do
    ls "$FILES/$name.tar.part-"* >/dev/null 2>&1 || { echo "$name: nothing came back"; continue; }
    mkdir -p "$DEST/$name"
    cat "$FILES/$name.tar.part-"* | tar xf - -C "$DEST/$name"
    export_dir="$DEST/$name/export/drivesim-internvl-$name"
    if [ -f "$export_dir/card.json" ]; then
        "$PYTHON" -m drivekd models verify-base "$export_dir" --work "$DEST/$name/verify" \
            ${DATA_FROM:+--data-from "$DATA_FROM"}
    else
        echo "$name: no finished export (see its stages' metrics in $DEST/$name)"
    fi
done
