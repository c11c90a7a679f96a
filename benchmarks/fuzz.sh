#!/usr/bin/env bash
# The long mode of the bad-input fuzzer (tests/test_fuzz.py, issue 13): N cases (default 10000)
# for every reader and every command's entry point, with random seeds, then a table of the cases
# each property ran. Not for CI (which runs the short seeded mode): at 10000 cases the readers
# take minutes each and the entry points far longer (lm-eval alone is ~3 s a case).
#   benchmarks/fuzz.sh [N] [pytest args, e.g. -k "not entry"]
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-10000}"
shift $(($# > 0 ? 1 : 0))
python=python
[ -x .venv/bin/python ] && python=.venv/bin/python
counts="$(mktemp)"
TEMPER_FUZZ_EXAMPLES="$n" TEMPER_FUZZ_COUNTS="$counts" \
  "$python" -m pytest -q -p no:cacheprovider -o timeout=0 tests/test_fuzz.py -k "fuzz" "$@"
status=$?
echo
echo "cases run per property (long mode, asked for $n; a failed property is not listed):"
sort "$counts" | awk '{c = $NF; $NF = ""; printf "  %-24s %8d\n", $0, c}'
rm -f "$counts"
exit $status
