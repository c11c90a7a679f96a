#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on CPU; GPU tests are skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# Two workers (pytest-xdist): the tests run one thread each (tests/conftest.py), so a 2-core machine runs two at once.
# numpy's BLAS and the processes tests start take one thread too: BLAS threads that outnumber the cores spin-wait (a
# test of scipy fits, 35 s alone, ran past its 300 s limit beside the other worker).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" \
  MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
python -m pytest -q -p no:cacheprovider -n "${TEMPER_TEST_WORKERS:-2}" --dist loadgroup "$@"
