#!/usr/bin/env bash
# The two set-up commands of the README. Each creates (or reuses) .venv inside the repository and
# installs the pinned dependencies before running:
#   ./run.sh demo   the main job on the embedded default: `drivekd reproduce --profile quick`
#   ./run.sh test   lint and the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3}
# pip byte-compiles every file it installs, all of torch and transformers included, which is most of
# an install's time; installed with --no-compile, a module is compiled when first imported and kept in
# .venv, which needs Python allowed to write byte-code (some machines set PYTHONDONTWRITEBYTECODE).
unset PYTHONDONTWRITEBYTECODE

setup() {
    local stamp
    stamp="$VENV/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
        # torch is pinned in the lock file to the CPU build's version, so pip never reaches for a
        # multi-GB CUDA wheel.
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-compile -r requirements.lock
        "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e .
        # compile what drivekd imports once, here, rather than in each of the first processes at once
        "$VENV/bin/python" -c 'import importlib, pkgutil, drivekd
for m in pkgutil.walk_packages(drivekd.__path__, "drivekd."): importlib.import_module(m.name)'
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

case "${1:-}" in
    demo)
        setup
        shift
        # the whole Drive-KD study at the quick profile; run it again to resume a killed one
        "$VENV/bin/drivekd" reproduce --profile quick --out "${DEMO_OUT:-runs/quick}" "$@"
        ;;
    test)
        setup
        shift
        "$VENV/bin/ruff" check drivekd tests experiments scripts
        "$VENV/bin/python" -m pytest -q -n 2 "$@"
        ;;
    *)
        echo "usage: ./run.sh demo | test" >&2
        exit 64
        ;;
esac
