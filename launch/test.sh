#!/usr/bin/env bash
# Builds (see build.sh) and runs the whole test suite with CTest; exits with CTest's status.
# Tests read real checkpoints from PIPEQUANT_TESTDATA (default: ../shared/testdata next to the repository).
# Extra arguments go to ctest, e.g. ./launch/test.sh -L unit
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${PIPEQUANT_BUILD_DIR:-$REPO/build}"

"$REPO/launch/build.sh" || { echo "test: build failed" >&2; exit 1; }

# Open MPI refuses to run as root and to start more ranks than cores unless told; CI machines do both.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
# the suite runs more ranks than cores: OpenMP threads that spin between parallel regions take the cores the other
# ranks need (a stories260K quantize: 2.6 s passive, 7.9 s spinning); results do not depend on it
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
if [ -z "${PIPEQUANT_TESTDATA:-}" ]; then
  PIPEQUANT_TESTDATA="$(cd "$REPO/.." && pwd)/shared/testdata"
fi
export PIPEQUANT_TESTDATA
echo "test: PIPEQUANT_TESTDATA=$PIPEQUANT_TESTDATA"
[ -d "$PIPEQUANT_TESTDATA" ] || echo "test: warning: $PIPEQUANT_TESTDATA does not exist; tests that need checkpoints will fail" >&2

LOG="$BUILD_DIR/ctest.log"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}

# CI logs are often cut to their tail: repeat the summary line (and the failures) last
summary="$(grep -E '[0-9]+% tests passed' "$LOG" | tail -n 1 || true)"
if [ "${CI:-}" = "true" ] || [ "$rc" -ne 0 ]; then
  echo "----"
  grep -E '^\s+[0-9]+ - .*\((Failed|Timeout|Not Run|SEGFAULT|Exception|Subprocess aborted|Child aborted)\)' "$LOG" || true
  echo "test: ${summary:-no ctest summary line (ctest exited with $rc)}"
fi
exit "$rc"
