#!/usr/bin/env bash
# The test command: lint, type-check, then the CPU test suite (parity goldens included).
# Needs ../shared beside the checkout (the golden fixtures and the reference tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -n 2 "$@"
