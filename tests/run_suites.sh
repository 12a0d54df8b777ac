#!/usr/bin/env bash
# The correctness suites of `make test`, the CUDA simulator one alongside the main one.
#
# tests/cudasim runs in its own process (NUMBA_ENABLE_CUDASIM=1 must be set before numba loads)
# and is mostly single-threaded Python (each simulated GPU thread); the main suite spends most of
# a fresh clone's time compiling Numba kernels, also on one core. Run one after the other they
# took ~21 minutes on a 2-core machine (14.6 + 6.6), side by side they overlap. Each suite's
# output is printed whole (the simulator's after the main one's); the exit status is nonzero if
# either failed.
set -uo pipefail
PY=${1:-.venv/bin/python}
log=$(mktemp -t fastnorm-cudasim.XXXXXX)
trap 'rm -f "$log"' EXIT
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest tests/cudasim -q -p no:cacheprovider >"$log" 2>&1 &
sim=$!
"$PY" -m pytest tests -q
main=$?
wait "$sim"
simulated=$?
echo "== tests/cudasim (NUMBA_ENABLE_CUDASIM=1) =="
cat "$log"
echo "== main suite: exit $main; simulator suite: exit $simulated =="
[ "$main" -eq 0 ] && [ "$simulated" -eq 0 ]
