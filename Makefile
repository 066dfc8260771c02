# Shortcuts for the two README commands (scripts/ work without make, too).
.PHONY: up test lint
up:
	scripts/up.sh
test:
	scripts/test.sh
lint:
	scripts/bootstrap.sh && .venv/bin/ruff check .
