#!/usr/bin/env bash
# The suites of `make test`: the main correctness suite, and beside it the CUDA simulator suite
# followed by the benchmark smoke run (every benchmark once, --benchmark-disable).
#
# tests/cudasim runs in its own process (NUMBA_ENABLE_CUDASIM=1 must be set before numba loads)
# and is mostly single-threaded Python (each simulated GPU thread); the main suite spends most of
# a fresh clone's time compiling Numba kernels, also on one core. On a 2-core machine the main
# suite (~15 min on a fresh clone) outlasts the other two together (~7 + ~4 min), so they run
# side by side with it. Each one's output is printed whole (the others' after the main one's);
# the exit status is nonzero if any failed.
set -uo pipefail
PY=${1:-.venv/bin/python}
log=$(mktemp -t fastnorm-side.XXXXXX)
trap 'rm -f "$log"' EXIT
(
  echo "== tests/cudasim (NUMBA_ENABLE_CUDASIM=1) =="
  NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest tests/cudasim -q -p no:cacheprovider
  simulated=$?
  echo "== bench smoke (pytest bench --benchmark-disable) =="
  "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable
  smoke=$?
  echo "== simulator suite: exit $simulated; bench smoke: exit $smoke =="
  [ "$simulated" -eq 0 ] && [ "$smoke" -eq 0 ]
) >"$log" 2>&1 &
side=$!
"$PY" -m pytest tests -q
main=$?
wait "$side"
others=$?
cat "$log"
echo "== main suite: exit $main; simulator suite and bench smoke: exit $others =="
[ "$main" -eq 0 ] && [ "$others" -eq 0 ]
