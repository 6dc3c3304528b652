#!/usr/bin/env bash
# Create .venv with the CPU build of torch and geopixel (editable) plus its dev tools.
# torch goes first and stays pinned by ../shared/constraints.txt (or constraints.txt here):
# an unpinned torch resolves to a multi-GB CUDA build. Never install torchvision beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=../shared/constraints.txt
[ -f "$constraints" ] || constraints=constraints.txt
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip uv
find_links=$(.venv/bin/pip config get global.find-links 2>/dev/null || true)
if [ -n "$find_links" ]; then export UV_FIND_LINKS="$find_links"; fi
.venv/bin/uv pip install --python .venv/bin/python -q -c "$constraints" "torch==2.13.0"
.venv/bin/uv pip install --python .venv/bin/python -q -c "$constraints" -e ".[dev]"
