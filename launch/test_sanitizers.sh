#!/usr/bin/env bash
# The sanitizer pass of the test suite (launch/test.sh runs it after the main CTest run): builds a second tree with
# AddressSanitizer + UndefinedBehaviorSanitizer (CUDA off), runs its unit tests (ctest -L unit) and two end-to-end
# tests against its binary (e2e_demo: GPTQ, RTN and AWQ on 2 ranks, eval of the outputs, export, inspect;
# e2e_disk_faults with 3 ranks: the error paths of file-system faults and the resumes after them), and fails when
# any test fails or any sanitizer report was written, also from a run that a test expected to fail. Extra arguments
# go to both ctest runs.
#   PIPEQUANT_SANITIZE_BUILD_DIR  the tree (default build-asan/)
#   PIPEQUANT_SANITIZE_E2E        the end-to-end tests, a ctest -R pattern (default ^e2e_(demo|disk_faults)$)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAN_DIR="${PIPEQUANT_SANITIZE_BUILD_DIR:-$REPO/build-asan}"
E2E="${PIPEQUANT_SANITIZE_E2E:-^e2e_(demo|disk_faults)\$}"
JOBS="$(nproc 2>/dev/null || echo 2)"
REPORTS="$SAN_DIR/sanitizer-reports"
SUPP="$REPO/tests/sanitizers"

say() { echo "test_sanitizers: $*"; }

build() {
  local t0=$SECONDS
  # -O1: the optimization ASan is made for (a clean stack, no frames folded away) at 65% of -O2's compile time
  say "configure $SAN_DIR (-O1, -fsanitize=address,undefined, CUDA off)"
  cmake -S "$REPO" -B "$SAN_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -DPIPEQUANT_CUDA=OFF -DPIPEQUANT_SANITIZE=address,undefined \
    >"$SAN_DIR/configure.log" 2>&1 || { cat "$SAN_DIR/configure.log"; return 1; }
  cmake --build "$SAN_DIR" -j "$JOBS" || return 1
  say "build: $((SECONDS - t0)) s"
}

# Every report goes to a file under $REPORTS (log_path), so that a finding in a run a test expects to fail (a bad
# input, a disk fault) is not lost in that run's output; the ranks of an MPI job inherit these from mpiexec.
sanitizer_environment() {
  rm -rf "$REPORTS"
  mkdir -p "$REPORTS"
  # detect_leaks=1: leaks are findings (the libraries' own are suppressed in lsan.supp, ours never are).
  # fast_unwind_on_malloc=0: Open MPI, hwloc and libevent are built without frame pointers, so the fast unwinder
  #   stops one frame into them and a suppression by library name has nothing to match; the DWARF unwinder sees the
  #   whole stack (MPI_Init_thread, orte_init, ...).
  # check_initialization_order=1, strict_init_order=1: static initializers that read another file's globals.
  # allocator_may_return_null=1: a failed large allocation throws std::bad_alloc as without ASan, so that the
  #   "out of host memory" path (exit 3) is what runs, not ASan's allocation-size-too-big abort.
  # abort_on_error=0, exitcode=86: a finding ends the process with 86 (not a signal: mpiexec then reports the
  #   rank's exit code and the other ranks are ended cleanly).
  # Left at their defaults: detect_odr_violation (OpenBLAS, libgomp and the other libraries are not instrumented,
  #   so ASan registers no globals of theirs and none has been reported) and detect_stack_use_after_return (off).
  export ASAN_OPTIONS="detect_leaks=1:fast_unwind_on_malloc=0:check_initialization_order=1:strict_init_order=1:allocator_may_return_null=1:abort_on_error=0:exitcode=86:log_path=$REPORTS/asan"
  # print_suppressions=0: the suppressed libraries' leaks are not listed on every exit
  export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
  # -fno-sanitize-recover=all already makes every UBSan finding fatal; these add the stack and the same log files
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan"
}

run_tests() {
  local t0=$SECONDS rc=0
  say "unit tests"
  ctest --test-dir "$SAN_DIR" --output-on-failure -j2 -L unit "$@" 2>&1 | tee "$SAN_DIR/ctest-unit.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  say "unit tests: $((SECONDS - t0)) s"
  t0=$SECONDS
  say "end-to-end tests: $E2E"
  # e2e_disk_faults with 3 ranks only: under ASan each of its ~70 runs costs 3-4 s more (most of it LSan's exit
  # check and the unwinding above), and its 1-rank cases differ only in how the job ends
  PIPEQUANT_DISK_FAULT_RANKS="${PIPEQUANT_DISK_FAULT_RANKS:-3}" \
    ctest --test-dir "$SAN_DIR" --output-on-failure -j2 -R "$E2E" "$@" 2>&1 | tee "$SAN_DIR/ctest-e2e.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  say "end-to-end tests: $((SECONDS - t0)) s"
  return "$rc"
}

# Fails when any report file was written; prints the first lines of each (the finding and the top of its stack).
check_reports() {
  local files=()
  mapfile -t files < <(find "$REPORTS" -type f -size +0 | sort)
  if [ "${#files[@]}" -eq 0 ]; then
    say "no sanitizer reports"
    return 0
  fi
  local f
  for f in "${files[@]}"; do
    echo "==== $f"
    head -n 40 "$f"
  done
  say "${#files[@]} sanitizer report(s) under $REPORTS" >&2
  return 1
}

main() {
  local rc=0
  mkdir -p "$SAN_DIR"
  build || { say "build failed" >&2; return 1; }
  sanitizer_environment
  run_tests "$@" || rc=1
  check_reports || rc=1
  [ "$rc" -eq 0 ] && say "passed" || say "FAILED" >&2
  return "$rc"
}

main "$@"
