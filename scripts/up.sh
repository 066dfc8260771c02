#!/usr/bin/env bash
# Command one: install if needed, then start API + worker + embedded broker + SQLite (kiln up).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/kiln up "$@"
