# Sourced by the GPU scripts: the wheels the GPU machine's image lacks (gpu/pack-bases.sh downloads
# them into .whl), this checkout on PYTHONPATH, quiet progress bars, the machine in $OUT/machine.txt.
: "${OUT:?set OUT to the folder whose files come back}"
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-15} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/drivekd-site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/drivekd-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
    echo "$(nproc) CPU threads"
} >"$OUT/machine.txt" 2>&1
