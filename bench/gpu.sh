#!/usr/bin/env bash
# Item 2 of BENCHMARKS.md on a GPU host, in one command (a lent machine is timed): the hand loop, fit() eager with
# bf16, and fit() under torch.compile with CUDA graphs, printed and saved to OUT_DIR (default: the current directory).
#     bench/gpu.sh [OUT_DIR]
# It uses the python3 that holds a CUDA torch. Where that python lacks pydantic (which kiln.spec needs), it installs
# the wheels found in .whl/ (BENCHMARKS.md, section 2, says how to make them) into a scratch directory first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
mkdir -p "$out"
if ! python3 -c 'import pydantic' 2>/dev/null; then
  compgen -G ".whl/*.whl" >/dev/null || { echo "python3 has no pydantic and .whl/ holds no wheels" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kiln-site .whl/*.whl
  export PYTHONPATH=/tmp/kiln-site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/gpu.txt"
python3 -m bench.loop --device cuda --repeats 3 --compile reduce-overhead 2>&1 | tee "$out/loop.txt"
