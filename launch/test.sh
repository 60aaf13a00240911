#!/usr/bin/env bash
# Builds (see build.sh) and runs the whole test suite with CTest, then the sanitizer pass (launch/test_sanitizers.sh:
# the unit tests and two end-to-end tests built with AddressSanitizer + UndefinedBehaviorSanitizer); exits non-zero
# when anything failed. Tests read real checkpoints from PIPEQUANT_TESTDATA (default: ../shared/testdata next to the
# repository). Extra arguments go to ctest, e.g. ./launch/test.sh -L unit
#
# Switches (environment):
#   PIPEQUANT_SLURM       required: start the local Slurm cluster (slurm/local_cluster.sh, root) for e2e_slurm and
#                         fail when it cannot start or the test skips; auto (default): start it when root, else
#                         e2e_slurm skips; off: leave Slurm alone. CI=true makes the default required.
#   PIPEQUANT_SANITIZERS  1: run the sanitizer pass, 0: skip it. Default 1 for the whole suite, 0 when extra
#                         arguments select tests.
#   PIPEQUANT_BUILD_DIR, PIPEQUANT_SANITIZE_BUILD_DIR: the two build trees (default build/ and build-asan/).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${PIPEQUANT_BUILD_DIR:-$REPO/build}"
if [ "${CI:-}" = "true" ]; then SLURM_MODE="${PIPEQUANT_SLURM:-required}"; else SLURM_MODE="${PIPEQUANT_SLURM:-auto}"; fi
if [ "$#" -gt 0 ]; then SANITIZERS="${PIPEQUANT_SANITIZERS:-0}"; else SANITIZERS="${PIPEQUANT_SANITIZERS:-1}"; fi
FAILURES=()  # one line per failed part, repeated at the end
SLURM_STARTED=0
T_SUITE=$SECONDS

say() { echo "test: $*"; }

setup_environment() {
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
  say "PIPEQUANT_TESTDATA=$PIPEQUANT_TESTDATA"
  [ -d "$PIPEQUANT_TESTDATA" ] || say "warning: $PIPEQUANT_TESTDATA does not exist; tests that need checkpoints will fail" >&2
}

slurm_answers() { command -v sinfo >/dev/null 2>&1 && sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)'; }

# Starts the local one-node cluster for e2e_slurm, unless one already answers (then it is left as it is).
start_slurm() {
  local t0=$SECONDS log="$BUILD_DIR/slurm-start.log"
  case "$SLURM_MODE" in
    off) say "Slurm: off (PIPEQUANT_SLURM=off); e2e_slurm skips"; return 0 ;;
    required) export PIPEQUANT_SLURM_REQUIRED=1 ;;  # e2e_slurm fails instead of skipping
    auto) ;;
    *) say "PIPEQUANT_SLURM=$SLURM_MODE: expected required, auto or off" >&2; FAILURES+=("PIPEQUANT_SLURM=$SLURM_MODE"); return 0 ;;
  esac
  if slurm_answers; then say "Slurm: a cluster already answers; using it"; return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    if [ "$SLURM_MODE" = required ]; then
      say "Slurm: required but not root: slurm/local_cluster.sh needs root" >&2
      FAILURES+=("the Slurm cluster could not be started (not root)")
    else
      say "Slurm: not root, no cluster started; e2e_slurm skips (PIPEQUANT_SLURM=required makes this a failure)"
    fi
    return 0
  fi
  say "Slurm: starting the local cluster (log: $log)"
  if "$REPO/slurm/local_cluster.sh" start >"$log" 2>&1; then
    SLURM_STARTED=1
    say "Slurm: cluster up in $((SECONDS - t0)) s"
  elif [ "$SLURM_MODE" = required ]; then
    tail -n 20 "$log" >&2
    say "Slurm: the local cluster did not start (PIPEQUANT_SLURM=required); e2e_slurm will fail" >&2
    FAILURES+=("the Slurm cluster did not start (see $log)")
  else
    tail -n 5 "$log" >&2
    say "Slurm: the local cluster did not start; e2e_slurm skips (PIPEQUANT_SLURM=required makes this a failure)"
  fi
}

stop_slurm() {
  [ "$SLURM_STARTED" = 1 ] || return 0
  SLURM_STARTED=0
  "$REPO/slurm/local_cluster.sh" stop >>"$BUILD_DIR/slurm-start.log" 2>&1 || say "Slurm: stopping the cluster failed" >&2
  say "Slurm: cluster stopped"
}

# The main tree's CTest run; its log is $BUILD_DIR/ctest.log.
run_ctest() {
  local log="$BUILD_DIR/ctest.log" rc t0=$SECONDS
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  say "ctest: $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then FAILURES+=("ctest exited with $rc"); fi
  return 0
}

# CI logs are often cut to their tail: repeat the summary line, the failures and the timings last
print_summary() {
  local log="$BUILD_DIR/ctest.log" summary
  summary="$(grep -E '[0-9]+% tests passed' "$log" 2>/dev/null | tail -n 1 || true)"
  echo "----"
  grep -E '^\s+[0-9]+ - .*\((Failed|Timeout|Not Run|SEGFAULT|Exception|Subprocess aborted|Child aborted)\)' "$log" || true
  grep -E 'e2e_slurm .*(Passed|Skipped|Failed|Not Run)' "$log" | sed 's/^ */test: /' || true
  say "${summary:-no ctest summary line}"
  local f
  for f in "${FAILURES[@]}"; do say "FAILED: $f"; done
  say "total $((SECONDS - T_SUITE)) s"
}

main() {
  "$REPO/launch/build.sh" || { say "build failed" >&2; exit 1; }
  setup_environment
  trap stop_slurm EXIT
  start_slurm
  run_ctest "$@"
  stop_slurm
  if [ "$SANITIZERS" = 1 ]; then
    local t0=$SECONDS
    "$REPO/launch/test_sanitizers.sh" || FAILURES+=("the sanitizer pass (launch/test_sanitizers.sh)")
    say "sanitizer pass: $((SECONDS - t0)) s"
  else
    say "sanitizer pass skipped (PIPEQUANT_SANITIZERS=0, or tests selected by arguments)"
  fi
  if [ "${CI:-}" = "true" ] || [ "${#FAILURES[@]}" -gt 0 ]; then print_summary; fi
  [ "${#FAILURES[@]}" -eq 0 ]
}

main "$@"
