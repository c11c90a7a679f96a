#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on CPU; GPU tests are skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# Two workers (pytest-xdist): the tests run one thread each, so a 2-core machine runs two at once.
python -m pytest -q -p no:cacheprovider -n "${TEMPER_TEST_WORKERS:-2}" --dist loadgroup "$@"
