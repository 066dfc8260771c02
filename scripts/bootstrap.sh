#!/usr/bin/env bash
# Create .venv and install kiln with its worker and dev extras. Torch is pinned and installed first:
# an unpinned torch would pull gigabytes of CUDA wheels onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${KILN_TORCH_VERSION:-2.13.0}
stamp=.venv/.kiln-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==$TORCH_VERSION"

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "kiln needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv || {
  echo "could not create a virtualenv; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
  exit 1
}
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
.venv/bin/python -m pip install --quiet -e '.[worker,dev]'
echo "$want" > "$stamp"
