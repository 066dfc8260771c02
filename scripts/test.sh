#!/usr/bin/env bash
# Command two: install if needed, then run the whole suite with real processes and services.
# Defaults: an embedded redis-server and SQLite. Set KILN_TEST_DATABASE_URL / KILN_TEST_BROKER_URL
# to run the same suite against PostgreSQL / Redis servers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
