#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on CPU; GPU tests are skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
